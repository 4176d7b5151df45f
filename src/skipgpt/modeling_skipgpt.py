"""Remote code of a ``skipgpt export`` folder: plain transformers loads it as a routed model.

``skipgpt export`` copies this file, unchanged, into the exported folder beside the skipgpt core
modules it imports (its relative-import closure: ``layer``, ``routing``, ``fast``, ...), and
names it in ``config.json``::

    "model_type": "llama",                                  # the stock architecture, unchanged
    "auto_map": {"AutoModelForCausalLM": "modeling_skipgpt.SkipGPTForCausalLM"},
    "skipgpt": {"router_config": {...θ...}, "removed_modules": [...], ...}

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` then builds the stock
model of ``model_type`` with its own weights (``model.safetensors``, the stock keys), puts the
same ``RoutedDecoderLayer`` that skipgpt uses around every decoder layer, and loads
``routers.safetensors``: ``generate`` and ``forward`` skip work (the fast path) with θ of the
folder. Without ``trust_remote_code`` the same folder loads as the dense stock model.

The returned model is the stock class (e.g. ``LlamaForCausalLM``), so pipelines and ``generate``
treat it as any other; its routing is reached through ``model.skipgpt_state`` (a
``RoutingState``: ``settings.threshold`` is θ, ``stats`` counts decisions). Its layers hold the
routers, so ``save_pretrained`` would write keys plain transformers cannot read: it is refused.
Inside skipgpt this module is importable too (``skipgpt.modeling_skipgpt``).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import cached_file

from .adapters import get_adapter
from .config import SkipGPTConfig
from .layer import RoutedDecoderLayer, added_parameters, real_token_hook, route_layer
from .removal import apply_removal
from .routing import RoutingState

__all__ = ["SkipGPTForCausalLM", "install_routing", "CONFIG_KEY", "ROUTERS_FILE", "AUTO_MAP"]

CONFIG_KEY = "skipgpt"  # the key of config.json that holds the routing record
ROUTERS_FILE = "routers.safetensors"  # keys ``layers.{i}.{module}.net.{j}.{weight|bias}``
AUTO_MAP = {"AutoModelForCausalLM": "modeling_skipgpt.SkipGPTForCausalLM"}
# what ``from_pretrained`` passes on to the download of ``routers.safetensors``
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


class _RoutedView:
    """What ``removal.apply_removal`` reads of a routed model (``SkipGPTModel``'s names)."""

    def __init__(self, model: nn.Module, layers: list[RoutedDecoderLayer], state: RoutingState):
        self.hf_model, self.routed_layers, self.routing_settings = model, layers, state.settings


def install_routing(
    model: nn.Module, config: SkipGPTConfig, routers: dict[str, torch.Tensor] | None = None, removed=()
) -> RoutingState:
    """Route every decoder layer of the HF causal LM ``model`` in place; returns its ``RoutingState``.

    ``routers``: the router (and substitute) tensors of ``routers.safetensors`` (``layer.added_parameters``),
    loaded exactly (names and shapes must match); None keeps the initial routers. ``removed``:
    LLM-Drop's (layer, module) pairs that never run. Each layer's routers stay float32 on its
    layer's device. A forward pre-hook records which tokens are real (the attention mask), so
    padding never counts in the statistics.
    """
    adapter = get_adapter(model.config.model_type)
    layers = adapter.layers(model)
    state = RoutingState(len(layers), config)
    hidden = model.config.get_text_config(decoder=True).hidden_size
    for i, layer in enumerate(layers):
        routed = route_layer(layer, i, adapter, config, hidden, state, next(layer.parameters()).device)
        routed.train(layer.training)  # a new module trains; the model may be in eval mode
        layers[i] = routed
    if routers is not None:
        own = added_parameters(layers)
        if set(own) != set(routers) or any(own[k].shape != routers[k].shape for k in own):
            raise ValueError(
                f"{ROUTERS_FILE} does not fit this model's routers ({len(own)} tensors expected)"
            )
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(routers[k])
    if removed:
        apply_removal(_RoutedView(model, list(layers), state), removed)

    model.register_forward_pre_hook(real_token_hook(state), with_kwargs=True)
    model.skipgpt_state = state
    model.save_pretrained = model.push_to_hub = _refuse_save
    return state


def _refuse_save(*args, **kwargs):
    raise NotImplementedError(
        "this model was loaded routed from a skipgpt export: copy the export folder instead, "
        "or load it with trust_remote_code=False to save the dense weights"
    )


class SkipGPTForCausalLM:
    """The ``auto_map`` entry of an exported folder: the stock causal LM of ``config.model_type``,
    routed (``install_routing``) with the routers and θ of the folder. Not a model class of its
    own: ``from_pretrained`` returns the stock class's instance."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM") -> None:
        """Called by the auto class when it loads remote code; the model built is the stock class."""

    @staticmethod
    def _stock_class(config):
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
        record = _record(config)
        if record.get("adapter"):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds an unmerged LoRA adapter ({record['adapter']}/): "
                "export it with `skipgpt export --merge` to load it in plain transformers, or load it "
                "with skipgpt.load_model"
            )
        kwargs.pop("trust_remote_code", None)
        model = cls._stock_class(config).from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, **kwargs
        )
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        routers = load_file(cached_file(pretrained_model_name_or_path, ROUTERS_FILE, **hub))
        _install(model, record, routers)
        return model

    @classmethod
    def _from_config(cls, config, **kwargs):
        """The stock model with freshly initialised weights and routers (``from_config``)."""
        kwargs.pop("trust_remote_code", None)
        model = cls._stock_class(config)._from_config(config, **kwargs)
        _install(model, _record(config), None)
        return model

    from_config = _from_config


def _record(config) -> dict:
    record = getattr(config, CONFIG_KEY, None)
    if not isinstance(record, dict) or not isinstance(record.get("router_config"), dict):
        raise ValueError(f"config.json has no '{CONFIG_KEY}' routing record: not a skipgpt export")
    return record


def _install(model: nn.Module, record: dict, routers) -> None:
    config = SkipGPTConfig.from_dict(record["router_config"])
    removed = [tuple(pair) for pair in record.get("removed_modules") or []]
    install_routing(model, config, routers, removed)
