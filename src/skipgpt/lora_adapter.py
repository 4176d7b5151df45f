"""A peft LoRA adapter on a model: attach a saved one, find it again, forget it.

The core of what loading a folder with ``adapter/`` needs, without training code (that is in
``skipgpt.train.lora``: ``add_lora``, ``finetune_lora``, ``merge_lora``). The ``PeftModel`` handle
is kept in the model's ``__dict__``, outside the module tree, so that its parameters are not
registered twice. peft is imported only when an adapter is attached.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import SkipGPTError

__all__ = ["attach_adapter", "get_peft", "remember_peft", "forget_peft"]

_PEFT_ATTR = "_skipgpt_peft"


def get_peft(model: nn.Module):
    """The ``PeftModel`` attached to ``model`` (``attach_adapter``, ``train.lora.add_lora``), or None."""
    return model.__dict__.get(_PEFT_ATTR)


def remember_peft(model: nn.Module, peft_model) -> None:
    model.__dict__[_PEFT_ATTR] = peft_model


def forget_peft(model: nn.Module) -> None:
    model.__dict__.pop(_PEFT_ATTR, None)


def attach_adapter(
    model: nn.Module, path: str | Path, *, hf: nn.Module | None = None, trainable: bool = False
):
    """Restore the saved adapter folder ``path`` into ``model`` (in place); returns the PeftModel.

    ``hf``: the Hugging Face model the LoRA layers go into when ``model`` wraps one (a
    ``SkipGPTModel`` passes its ``hf_model``); default ``model`` itself.
    """
    from peft import PeftModel

    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise SkipGPTError(f"{path} is not a LoRA adapter folder (no adapter_config.json)")
    peft_model = PeftModel.from_pretrained(model if hf is None else hf, str(path), is_trainable=trainable)
    remember_peft(model, peft_model)
    return peft_model
