"""The ``README.md`` of an exported folder: what loads with and without remote code, and how."""

from __future__ import annotations

from ..checkpoint import FolderRecord
from ..version import __version__

__all__ = ["DENSE_WARNING", "model_card"]

DENSE_WARNING = (
    "**Without `trust_remote_code=True` this folder loads as the DENSE base model: "
    "the routers are ignored and no computation is skipped.**"
)


def model_card(record: FolderRecord, *, merged: bool, adapter: bool) -> str:
    """Markdown for ``record`` (the exported folder's record; ``metadata["export"]`` filled)."""
    export = record.metadata.get("export", {})
    base = export.get("original_base_model") or record.base_model
    lines = [
        "---",
        "library_name: transformers",
        "tags: [skipgpt, token-routing]",
        "---",
        "",
        f"# skipgpt export of `{base}`",
        "",
    ]
    if record.routed:
        cfg = record.router_config
        lines += [
            f"A causal LM with per-token routers before the attention and the MLP of every decoder "
            f"layer (skipgpt {__version__}, folder kind `{record.kind}`): a token skips a module when "
            f"its router's p(execute) < θ = {cfg.threshold:.6g} (trained for a target sparsity of "
            f"{cfg.target_sparsity:g}, routed modules: {', '.join(cfg.modules)}).",
            "",
            "## Loading",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)  # routed',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
            "model.skipgpt_state.settings.threshold = 0.6  # θ, the compute dial (optional)",
            "```",
            "",
            "`trust_remote_code=True` runs `modeling_skipgpt.py` and the skipgpt core modules shipped "
            "in this folder (not an installed skipgpt): they build the stock architecture, route its "
            "layers and load `routers.safetensors`; `forward` and `generate` run only the executing "
            "tokens. Decision counts are in `model.skipgpt_state.stats`.",
            "",
            DENSE_WARNING,
            "",
            'With skipgpt installed, `skipgpt.load_model("PATH")` loads it routed as a `SkipGPTModel`.',
        ]
        if record.removed_modules:
            lines += ["", f"LLM-Drop: modules never run: {[list(p) for p in record.removed_modules]}."]
        if adapter:
            lines += [
                "",
                "This folder holds an unmerged LoRA adapter (`adapter/`): plain transformers refuses to "
                "load it routed; use `skipgpt.load_model`, or export with `--merge`.",
            ]
    elif merged:
        lines += ["A dense model with its LoRA adapter merged in: a plain Hugging Face model folder."]
    else:
        lines += [
            "A dense model with a LoRA adapter (`adapter/`, peft). The weights in this folder are the "
            'base model\'s; load with `skipgpt.load_model("PATH")`, or with peft.',
        ]
    lines += [
        "",
        "## Files",
        "",
        "- `config.json`, `model.safetensors`, tokenizer: the stock model ("
        + ("LoRA merged" if merged else "base weights")
        + ")",
    ]
    if record.routed:
        lines += [
            "- `routers.safetensors`: the routers; `config.json` key `skipgpt`: router config and θ",
            "- `modeling_skipgpt.py` + skipgpt core modules: the remote code (`auto_map`)",
        ]
    lines += ["- `skipgpt_config.json`: the skipgpt folder record", ""]
    return "\n".join(lines)
