"""skipgpt: dynamic, token-aware layer skipping that really saves compute (SkipGPT, arXiv 2506.04179)."""

__version__ = "0.1.0"

from .config import SkipGPTConfig  # noqa: E402
from .errors import SkipGPTError  # noqa: E402
from .loading import load_model  # noqa: E402
from .model import SkipGPTModel, get_skipgpt_model  # noqa: E402

__all__ = ["SkipGPTConfig", "SkipGPTError", "SkipGPTModel", "get_skipgpt_model", "load_model", "__version__"]
