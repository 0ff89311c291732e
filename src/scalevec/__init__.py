"""scalevec: pre-training decoder LLMs with the scale-vector strategies of arXiv 2605.26895.

Configuration loads eagerly (it needs no torch); the model-side names load on first use, so
`import scalevec.config` and `scalevec --help` never import torch.
"""

import importlib

from ._version import __version__
from .config import Config, ConfigError, ModelConfig, OptimConfig, load_config
from .strategy import Strategy, strategy

_LAZY = {"apply_strategy": "apply", "unapply": "apply", "param_info": "apply", "param_groups": "optim",
         "fold_scales": "export.fold", "Decoder": "model", "build_model": "model", "Optimizers": "optim",
         "evaluate": "evaluate"}
__all__ = ["Config", "ConfigError", "ModelConfig", "OptimConfig", "Strategy", "load_config", "strategy", *_LAZY,
           "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'scalevec' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
