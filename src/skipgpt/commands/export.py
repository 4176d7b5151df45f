"""``skipgpt export``: a self-contained copy of a trained model, LoRA merged with ``--merge``.

The output is a Hugging Face model folder and a skipgpt folder at once (``skipgpt.export``)::

    config.json           the stock config (its model_type) + "auto_map" -> modeling_skipgpt.SkipGPTForCausalLM
                          + "skipgpt" (router config with θ, removed modules)
    model.safetensors     the stock model's weights (LoRA folded in with --merge), tokenizer files
    modeling_skipgpt.py   + the skipgpt core modules it imports (the remote code), README.md (card)
    routers.safetensors   copied unchanged
    skipgpt_config.json   base_model_in_folder "." (the folder itself: it can move)
    adapter/              only without --merge (peft adapter, unchanged)

``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` loads it routed (skipgpt
not installed), without remote code it is the dense stock model, ``skipgpt.load_model(out)``
gives the ``SkipGPTModel``. Weights are written with safetensors, not ``save_pretrained``, so a
base loaded from GGUF (the offline SmolLM2) exports too. A dense + LoRA folder exported with
``--merge`` becomes a plain HF model folder (no routers); ``--merge`` without an adapter is refused.

What is copied is checked first, so that a truncated or mismatched file is refused in one line
instead of shipped: the config parses, the routers load into the model (names, shapes) and
every router and adapter value is finite. The output is locked for the export (one writer) and
written complete beside its place, then renamed in.
"""

from __future__ import annotations

from .common import DTYPES, add_json_arg, add_model_arg, emit

__all__ = ["add_parser", "run", "export_model", "HF_DIR"]

HF_DIR = "hf"  # 0.1.0's export layout kept the HF weights in this sub-folder (still read)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a self-contained copy of a skipgpt folder (base weights + routers); --merge folds LoRA in",
    )
    add_model_arg(p)
    p.add_argument("--output", required=True, help="new output folder")
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge the LoRA adapter into the base weights (no peft needed to load)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the written base weights (the routers stay float32); export runs on the CPU "
        "(default: %(default)s)",
    )
    add_json_arg(p)
    p.set_defaults(func=run)


def _check_finite(tensors: dict, what: str) -> None:
    import torch

    from ..errors import SkipGPTError

    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SkipGPTError(f"{what} holds non-finite values ({name})")


def _check_copied(stage, src, hf, config, routed: bool, adapter: bool) -> None:
    """Refuse (one line) copied routers that do not load into ``hf`` wrapped with ``config``
    (truncated, other names or shapes) or hold NaN/inf, and adapter weights that do not load
    or are not finite. Checks the copies in ``stage``: exactly what is shipped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..checkpoint import ADAPTER_DIR, ROUTERS_NAME
    from ..errors import SkipGPTError
    from ..model import SkipGPTModel

    if routed:
        wrapped = SkipGPTModel(hf, config)
        try:
            wrapped.load_routers(stage / ROUTERS_NAME)
            _check_finite(wrapped.router_state_dict(), f"router file {src / ROUTERS_NAME}")
        except SkipGPTError as e:  # name the source, not the copy in the stage
            raise SkipGPTError(str(e).replace(str(stage), str(src)) + "; nothing exported") from None
        finally:
            wrapped.unwrap()
    if adapter:
        for f in sorted((stage / ADAPTER_DIR).glob("*.safetensors")):
            try:
                tensors = load_file(str(f))
            except (SafetensorError, OSError, ValueError) as e:
                raise SkipGPTError(
                    f"adapter file {src / ADAPTER_DIR / f.name} is corrupt or truncated ({str(e).splitlines()[0]})"
                ) from None
            _check_finite(tensors, f"adapter file {src / ADAPTER_DIR / f.name}")


def export_model(source: str, output: str, merge: bool = False, dtype: str = "float32") -> dict:
    """Export the skipgpt folder ``source`` to the new folder ``output`` (atomically, locked), the
    base weights in ``dtype`` (a torch dtype name; routers stay float32).

    Returns ``{"output", "kind": "routed"|"hf", "merged", "adapter", "base_model"}``.
    """
    from ..outputs import lock_output, release_output

    lock_output(output)
    try:
        return _export(source, output, merge, dtype)
    except BaseException:
        release_output(output)
        raise


def _export(source: str, output: str, merge: bool, dtype: str) -> dict:
    import shutil
    from pathlib import Path

    import torch

    from .. import checkpoint
    from ..checkpoint import ADAPTER_DIR, ROUTERS_NAME
    from ..errors import SkipGPTError
    from ..export import model_card, write_hf_folder
    from ..loading import load_model
    from ..model import SkipGPTModel
    from ..outputs import prepare_output_dir, recover_dir, staged_dir
    from ..specs import load_base_model
    from ..train.lora import merge_lora
    from ..version import __version__

    src = Path(source)
    if not checkpoint.is_skipgpt_dir(src):
        raise SkipGPTError(
            f"{source} is not a skipgpt output folder (no {checkpoint.CONFIG_NAME}); export takes the output of "
            "train-router or finetune-lora"
        )
    record = checkpoint.read(src)
    has_adapter = record.adapter is not None
    if merge and not has_adapter:
        raise SkipGPTError(
            f"--merge needs a LoRA adapter, and {source} (a {record.kind} folder) has none; export it without --merge"
        )
    recover_dir(output)  # what a killed export left beside the folder (we hold its lock)
    out = prepare_output_dir(output, allow_existing_ours=False)
    if out.exists() and any(out.iterdir()):
        raise SkipGPTError(f"output folder {out} is not empty; give a new folder")
    routed, config = record.routed, record.router_config
    if merge:
        model, tokenizer = load_model(str(src), dtype=getattr(torch, dtype))
        model = merge_lora(model)
        hf = model.unwrap() if isinstance(model, SkipGPTModel) else model
    else:  # the clean base weights; the adapter (if any) is copied as it is
        hf, tokenizer = load_base_model(record.base_spec, dtype=getattr(torch, dtype))

    new = record.replace(
        base_model=str(out.resolve()),  # for humans; loaders use base_model_in_folder
        base_model_in_folder=".",
        metadata={
            **record.metadata,
            "export": {
                "source": str(src.resolve()),
                "merged": merge,
                "original_base_model": record.base_model,
            },
        },
    )
    unmerged_adapter = has_adapter and not merge
    routing = None
    if routed:  # config.json's "skipgpt": what the remote code needs to route the stock model
        routing = {
            "skipgpt_version": __version__,
            "kind": record.kind,
            "base_model": record.base_model,
            "router_config": config.to_dict(),
            "removed_modules": [[i, m] for i, m in record.removed_modules],
            "adapter": ADAPTER_DIR if unmerged_adapter else None,
        }
    card = model_card(
        new.replace(adapter=ADAPTER_DIR if unmerged_adapter else None), merged=merge, adapter=unmerged_adapter
    )
    with staged_dir(out) as stage:
        write_hf_folder(stage, hf, tokenizer, routing, card)
        if not routed and merge:  # dense + LoRA, merged: just a HF model folder
            return {
                "output": str(out),
                "kind": "hf",
                "merged": True,
                "adapter": False,
                "base_model": str(out),
            }
        if routed:
            shutil.copy2(src / ROUTERS_NAME, stage / ROUTERS_NAME)
        if unmerged_adapter:
            shutil.copytree(src / ADAPTER_DIR, stage / ADAPTER_DIR)
        _check_copied(stage, src, hf, config, routed, adapter=unmerged_adapter)
        checkpoint.write(stage, new)
    return {
        "output": str(out),
        "kind": "routed" if routed else "dense+adapter",
        "merged": merge,
        "adapter": unmerged_adapter,
        "base_model": new.base_model,
    }


def run(args) -> int:
    result = export_model(args.model, args.output, merge=args.merge, dtype=args.dtype)
    what = {
        "hf": "a Hugging Face model folder",
        "routed": "routers + HF weights",
        "dense+adapter": "HF weights",
    }
    extra = " + LoRA adapter" if result["adapter"] else (" (LoRA merged)" if result["merged"] else "")
    emit(args, result, f"exported {args.model} to {result['output']}: {what[result['kind']]}{extra}")
    return 0
