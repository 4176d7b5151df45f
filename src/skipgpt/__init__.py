"""skipgpt: dynamic, token-aware layer skipping that really saves compute (SkipGPT, arXiv 2506.04179)."""

from .config import SkipGPTConfig
from .errors import SkipGPTError
from .loading import load_model
from .model import SkipGPTModel, get_skipgpt_model
from .version import __version__

__all__ = ["SkipGPTConfig", "SkipGPTError", "SkipGPTModel", "get_skipgpt_model", "load_model", "__version__"]
