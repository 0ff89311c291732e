"""Taking a model out: folding scale vectors into weights."""

from .fold import fold_scales

__all__ = ["fold_scales"]
