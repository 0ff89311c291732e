"""scalevec: pre-training decoder LLMs with the scale-vector strategies of arXiv 2605.26895."""

from .apply import apply_strategy, param_info
from .config import Config, ConfigError, ModelConfig, OptimConfig, load_config
from .export import fold_scales
from .model import Decoder, build_model
from .optim import Optimizers, param_groups
from .strategy import Strategy, strategy

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Decoder", "ModelConfig", "OptimConfig", "Optimizers", "Strategy", "apply_strategy",
           "build_model", "fold_scales", "load_config", "param_groups", "param_info", "strategy", "__version__"]
