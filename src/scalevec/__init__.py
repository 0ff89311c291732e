"""scalevec: pre-training decoder LLMs with the scale-vector strategies of arXiv 2605.26895."""

from .config import Config, ConfigError, ModelConfig, load_config
from .export import fold_scales
from .model import Decoder, build_model
from .strategy import Strategy, strategy

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "ModelConfig", "Decoder", "Strategy", "build_model", "fold_scales",
           "load_config", "strategy", "__version__"]
