"""Taking a model out: folding scale vectors into weights (`fold.py`), transformers checkpoints (`hf.py`)."""

from ..errors import BadInput


class ExportError(BadInput):
    """A checkpoint cannot be written or read as asked; one line naming the problem and the options."""
