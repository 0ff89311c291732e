"""Taking a model out: folding scale vectors into weights (`fold.py`), transformers checkpoints (`hf.py`)."""

from ..errors import BadInput


class ExportError(BadInput):
    """A run cannot be exported as asked (no transformers form, a bad --family, --dtype or --to); one line naming
    the problem and the options."""
