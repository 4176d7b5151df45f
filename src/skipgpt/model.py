"""Wrap a Hugging Face causal LM with routers; statistics; save/load; unwrap.

``get_skipgpt_model(model, config)`` replaces every decoder layer, in place, by a
``RoutedDecoderLayer`` around it and returns a ``SkipGPTModel`` that forwards calls (and
``generate``) to the HF model, as peft's ``PeftModel`` does. Only the routers are new
parameters, with ``skip_to="adapter"`` also the substitutes; they carry ``routers`` /
``substitutes`` in their name and are all that ``save_pretrained`` writes
(``routers.safetensors``, substitutes under the ``substitutes.`` prefix), beside
``skipgpt_config.json`` that records how to rebuild the base model. ``from_pretrained`` takes such a folder or a Hub repo id, ``push_to_hub`` uploads
one with a model card (``skipgpt.hub``).

No silent corruption: while it is wrapped, the HF model's own ``save_pretrained`` and
``push_to_hub`` refuse in one line (they would write ``base_layer.*`` / ``routers.*`` keys that
plain transformers loads as missing, i.e. random weights); ``unwrap()`` lifts the guard.
Its ``state_dict()`` is left as torch makes it (routed keys): right for ``load_state_dict`` into
a wrapped model of the same config, and never written as an HF checkpoint by skipgpt.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import checkpoint
from .adapters import get_adapter
from .checkpoint import ADAPTER_DIR, ROUTERS_NAME, FolderRecord, resolve_base_spec
from .config import MODULES, SkipGPTConfig
from .errors import SkipGPTError
from .layer import RoutedDecoderLayer, added_parameters, real_token_hook, route_layer
from .lora_adapter import attach_adapter, get_peft
from .outputs import staged_dir
from .removal import apply_removal
from .routing import EXECUTIONS, OverridePolicy, RoutingPolicy, RoutingState
from .substitutes import SUBSTITUTE_PREFIX, substitute_ranks
from .version import __version__

__all__ = ["SkipGPTModel", "get_skipgpt_model", "ROUTERS_NAME", "resolve_base_spec"]

# the HF model's methods that would write an incomplete checkpoint while it is wrapped
_GUARDED = ("save_pretrained", "push_to_hub")
# transformers options of save_pretrained that SkipGPTModel.save_pretrained does not take: they
# are about full model weights, which a skipgpt folder does not hold
_HF_SAVE_OPTIONS = ("state_dict", "max_shard_size", "variant", "save_function", "is_main_process")

# what SkipGPTModel.routing() may change (RoutingSettings fields; ``override`` becomes a policy)
_ROUTING_SETTINGS = ("threshold", "enabled", "policy", "execution", "keep_decisions", "tau", "removed")


def _device_of(layer: nn.Module, model: nn.Module) -> torch.device:
    """The device of ``layer``'s parameters (the model's first parameter's when it has none)."""
    for p in layer.parameters():
        return p.device
    return next(model.parameters()).device


def _inputs_to(device: torch.device):
    """A forward pre-hook (``with_kwargs``) that sends every tensor argument to ``device`` (what
    accelerate's hook on a decoder layer does for a model split by ``device_map``)."""
    from accelerate.utils import send_to_device

    def hook(module, args, kwargs):
        return send_to_device(args, device), send_to_device(kwargs, device)

    return hook


def get_skipgpt_model(model: nn.Module, config: SkipGPTConfig, base_spec: str | None = None) -> SkipGPTModel:
    """Put an attention router and an MLP router on every decoder layer of ``model`` (in place).

    ``base_spec`` is how to load ``model`` again (a model spec, see ``skipgpt.specs``); it is
    recorded by ``save_pretrained`` so that ``SkipGPTModel.from_pretrained`` can rebuild it.
    """
    return SkipGPTModel(model, config, base_spec=base_spec)


class SkipGPTModel(nn.Module):
    """A causal LM whose decoder layers are routed.

    ``hf_model`` (also ``get_base_model()``, as in peft) is the wrapped Hugging Face causal LM.
    Attribute access falls through to it, so ``model.base_model`` means what it means in
    transformers: the backbone (e.g. ``LlamaModel``), not the causal LM.
    """

    def __init__(self, model: nn.Module, config: SkipGPTConfig, base_spec: str | None = None):
        super().__init__()
        if isinstance(model, SkipGPTModel):
            raise SkipGPTError("model is already a SkipGPTModel")
        self.adapter = get_adapter(getattr(model.config, "model_type", type(model).__name__))
        layers = self.adapter.layers(model)
        if any(isinstance(layer, RoutedDecoderLayer) for layer in layers):
            raise SkipGPTError("model already has routed layers; unwrap() it first")
        self.hf_model = model
        # a copy: θ is set on this model's config (``set_threshold``), never on a caller's object
        self.skipgpt_config = config = config.replace()
        self.base_spec = base_spec or getattr(model.config, "_name_or_path", None)
        beyond = [list(pair) for pair in config.protected_modules if pair[0] >= len(layers)]
        if beyond:
            raise SkipGPTError(f"protected_modules {beyond} name layers beyond the model's {len(layers)}")
        # routing settings (θ lives in config.threshold), per-forward scratch, statistics
        self.state = RoutingState(len(layers), config)
        hidden = model.config.get_text_config(decoder=True).hidden_size  # multimodal: the LM's
        # device_map="auto" over several devices: each routed layer takes its inputs to its device
        split = len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1
        # Parameters per (layer, branch): the weights of a parameter-weighted budget.
        self.branch_params: dict[tuple[int, str], int] = {}
        for i, layer in enumerate(layers):
            for branch in MODULES:
                n = sum(p.numel() for m in self.adapter.branch_modules(layer, branch) for p in m.parameters())
                self.branch_params[(i, branch)] = n
            # each router beside its layer (device_map="auto" splits layers across GPUs), float32
            device = _device_of(layer, model)
            routed = route_layer(layer, i, self.adapter, config, hidden, self.state, device)
            if split:  # accelerate's hook on the base layer does not run: the routed layer calls its parts
                routed.register_forward_pre_hook(_inputs_to(device), with_kwargs=True)
            layers[i] = routed
        # Parameters a skipping token still runs: its module's substitute (none: plain skipping)
        self.substitute_params: dict[tuple[int, str], int] = {
            (i, m): sum(p.numel() for p in sub.parameters())
            for i, layer in enumerate(layers)
            for m, sub in layer.substitutes.items()
        }
        self.train(model.training)
        self._hook = model.register_forward_pre_hook(real_token_hook(self.state), with_kwargs=True)
        _install_guards(model)

    # -- plumbing ----------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("hf_model"), name)

    def _apply(self, fn, recurse: bool = True):
        """``to``/``half``/``bfloat16``/``cuda``... on the wrapper: the base model follows, the routers
        (and substitutes) move device but keep their dtype (float32, as ``load_model(dtype=...)`` builds them). To
        change the routers' dtype, cast them directly: ``for r in model.router_modules(): r.to(dtype)``."""
        own = [*self.router_modules(), *(layer.substitutes for layer in self.routed_layers)]  # float32 both
        params = [p for r in own for p in r.parameters()]
        keep = {id(t) for t in params + [p.grad for p in params if p.grad is not None]}
        keep |= {id(b) for r in own for b in r.buffers()}

        def keep_router_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in keep and out.dtype != t.dtype:  # drop the cast (not cast back: exact)
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_router_dtype, recurse)

    def router_modules(self) -> list[nn.Module]:
        """The router module of every routed layer (``layer.routers``), in layer order."""
        return [layer.routers for layer in self.routed_layers]

    def get_base_model(self) -> nn.Module:
        """The wrapped Hugging Face causal LM (its decoder layers routed)."""
        return self.hf_model

    def forward(self, *args, **kwargs):
        return self.hf_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.hf_model.generate(*args, **kwargs)

    @property
    def routed_layers(self) -> list[RoutedDecoderLayer]:
        return list(self.adapter.layers(self.hf_model))

    # -- what trains and what is saved -------------------------------------------------------
    def router_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter skipgpt adds, by the name it is saved under: ``layers.{i}.{module}.{param}``
        for the routers, ``substitutes.layers.{i}.{module}.{param}`` for the substitutes (none
        unless a module skips to an adapter)."""
        return added_parameters(self.routed_layers)

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.router_state_dict().values())

    def mark_only_routers_trainable(self) -> None:
        """Freeze the base model; the routers and the substitutes train, except the constant
        routers of ``protected_modules``."""
        for p in self.hf_model.parameters():
            p.requires_grad_(False)
        for p in self.router_parameters():
            p.requires_grad_(True)
        self.freeze_protected_routers()

    def freeze_protected_routers(self) -> None:
        """The routers of ``protected_modules`` (constant: execute) take no gradient."""
        for layer in self.routed_layers:
            for m, router in layer.routers.items():
                if (layer.layer_idx, m) in self.skipgpt_config.protected_modules:
                    router.requires_grad_(False)

    # -- routing controls --------------------------------------------------------------------
    @property
    def routing_settings(self):
        """The ``RoutingSettings`` every routed layer reads (θ, τ, policy, execution, ...)."""
        return self.state.settings

    @property
    def routing_stats(self):
        """The ``RoutingStats``: decisions added up since ``reset_stats``."""
        return self.state.stats

    def set_temperature(self, tau: float) -> None:
        self.state.settings.tau = float(tau)

    def set_threshold(self, theta: float) -> float:
        """Set θ (validated): what inference uses from now on and what ``save_pretrained`` writes."""
        self.state.settings.threshold = theta
        return self.state.settings.threshold

    @contextlib.contextmanager
    def routing(self, **changes: Any):
        """Temporarily change routing: ``threshold``, ``enabled`` (False = dense), ``policy`` (a
        ``routing.RoutingPolicy``), ``override`` (a callable ``(layer_idx, module, hidden) ->
        (B, T) gate``, run as an ``OverridePolicy``; a policy is taken as it is), ``execution`` ('fast' or 'masked'),
        ``keep_decisions``."""
        settings = self.state.settings
        if "override" in changes:
            fn = changes.pop("override")
            if "policy" in changes:
                raise SkipGPTError("give routing() a policy or an override, not both")
            changes["policy"] = fn if fn is None or isinstance(fn, RoutingPolicy) else OverridePolicy(fn)
        for k in changes:
            if k not in _ROUTING_SETTINGS:
                raise SkipGPTError(f"unknown routing setting {k!r}; accepted: {sorted(_ROUTING_SETTINGS)}")
        if changes.get("execution", "fast") not in EXECUTIONS:
            raise SkipGPTError(f"execution {changes['execution']!r}; accepted: {list(EXECUTIONS)}")
        old = {k: getattr(settings, k) for k in changes}
        for k, v in changes.items():
            setattr(settings, k, v)
        try:
            yield self
        finally:
            for k, v in old.items():
                setattr(settings, k, v)

    def dense(self):
        """Context manager: every module executes, routers are not even evaluated, and modules
        removed for good (LLM-Drop, ``train-router --remove-layers``) run again: the base model."""
        return self.routing(enabled=False, removed=frozenset())

    # -- sparsity ----------------------------------------------------------------------------
    def budget_weights(self, budget: str) -> dict[tuple[int, str], float]:
        """(layer, module) -> its weight in a sparsity budget: 1 per routed module (``'modules'``)
        or the parameters a skip of it saves (``'params'``, attention and MLP of every layer: its
        parameter count less its substitute's, which a skipping token still runs)."""
        if budget == "params":
            return {k: float(v - self.substitute_params.get(k, 0)) for k, v in self.branch_params.items()}
        return {k: 1.0 for k in self.branch_params if k[1] in self.skipgpt_config.modules}

    def realised_sparsity(self, budget: str | None = None) -> torch.Tensor:
        """Differentiable skip rate of the last forward, averaged over (layer, module).

        ``budget='modules'``: every routed decision counts 1 (the paper's knob);
        ``'params'``: each module counts by its parameters, over all attention and MLP
        parameters of the decoder layers.
        """
        weights, total = self._budget(budget)
        rates = self.state.scratch.skip_rates
        if not rates:
            raise SkipGPTError("no routing decisions recorded; run a forward with routing enabled first")
        return torch.as_tensor(sum(w * rates[k] for k, w in weights.items() if k in rates) / total)

    def removed_sparsity(self, budget: str | None = None) -> float:
        """The share of ``realised_sparsity`` that the modules removed for good (``removed``)
        make up on their own: what no routing can bring below."""
        weights, total = self._budget(budget)
        return sum(weights.get(k, 0.0) for k in self.state.settings.removed) / total

    def _budget(self, budget: str | None) -> tuple[dict[tuple[int, str], float], float]:
        """The weights of ``budget`` (default: the config's) and the total a sparsity is out of:
        for 'params' all attention + MLP parameters (a substitute's count as executed)."""
        budget = budget or self.skipgpt_config.budget
        weights = self.budget_weights(budget)
        total = sum(self.branch_params.values()) if budget == "params" else sum(weights.values())
        return weights, total

    def reset_stats(self) -> None:
        self.state.stats.reset()

    def sparsity_stats(self) -> dict[str, Any]:
        """Skip rates accumulated since ``reset_stats()`` (padding excluded).

        Returns ``module`` (all routed decisions), ``attn``, ``mlp``, ``params`` (parameter
        weighted over all attention+MLP parameters), ``params_net`` (the same less the
        parameters of the substitutes that skipping tokens run; = ``params`` without
        substitutes) and ``per_layer`` rates.
        """
        skipped, counted = self.state.stats.skipped, self.state.stats.counted
        rate = {k: skipped[k] / counted[k] for k in counted if counted[k] > 0}

        def mean(keys):
            keys = [k for k in keys if k in counted]
            num, den = sum(skipped[k] for k in keys), sum(counted[k] for k in keys)
            return num / den if den else 0.0

        params = {k: float(v) for k, v in self.branch_params.items()}
        net = self.budget_weights("params")
        out = {
            "module": mean([k for k in params if k[1] in self.skipgpt_config.modules]),
            "attn": mean([k for k in params if k[1] == "attn"]),
            "mlp": mean([k for k in params if k[1] == "mlp"]),
            "params": sum(w * rate.get(k, 0.0) for k, w in params.items()) / sum(params.values()),
            "params_net": sum(w * rate.get(k, 0.0) for k, w in net.items()) / sum(params.values()),
            "per_layer": {m: [rate.get((i, m), 0.0) for i in range(self.state.num_layers)] for m in MODULES},
        }
        return out

    # -- save / load -------------------------------------------------------------------------
    def save_pretrained(
        self,
        output_dir: str | Path,
        metadata: dict[str, Any] | None = None,
        *,
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **hub_kwargs: Any,
    ) -> Path:
        """Write ``skipgpt_config.json`` and ``routers.safetensors`` into ``output_dir`` as one unit.

        The new folder is written complete beside the old one and swapped in (``outputs.staged_dir``):
        a kill leaves the old model or the new one, never new routers beside an old config. What
        else the old folder held is kept (the training checkpoint), except a LoRA ``adapter/``,
        which belonged to the old routers.

        ``safe_serialization`` must stay True (routers are always safetensors); ``push_to_hub``
        then uploads the folder to ``repo_id`` (default: the folder's name) with a model card,
        ``hub_kwargs`` as ``push_to_hub`` takes them. transformers' options about full weights
        (``max_shard_size``, ``state_dict``, ...) are refused in one line: use ``skipgpt export``.
        """
        from .outputs import fault_point, prepare_output_dir

        if not safe_serialization:
            raise SkipGPTError("skipgpt saves routers as safetensors only; drop safe_serialization=False")
        hf_only = sorted(set(hub_kwargs) & set(_HF_SAVE_OPTIONS))
        if hf_only:
            raise SkipGPTError(
                f"save_pretrained writes the routers only; {', '.join(hf_only)}: transformers option(s) "
                "for full weights; call model.unwrap() then save_pretrained, or skipgpt export"
            )
        unknown = sorted(set(hub_kwargs) - set(_PUSH_OPTIONS))
        if unknown:
            raise SkipGPTError(
                f"save_pretrained got unknown option(s) {', '.join(unknown)}; accepted: metadata, "
                f"safe_serialization, push_to_hub, repo_id, {', '.join(_PUSH_OPTIONS)}"
            )
        output_dir = prepare_output_dir(output_dir)
        record = self.folder_record(metadata)
        tensors = {
            k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.router_state_dict().items()
        }
        with staged_dir(output_dir, drop=(ADAPTER_DIR,)) as stage:
            save_file(tensors, str(stage / ROUTERS_NAME), metadata={"format": "pt", "skipgpt": __version__})
            fault_point("final:files")
            checkpoint.write(stage, record)
        if push_to_hub:
            self.push_to_hub(repo_id or Path(output_dir).name, metadata=metadata, **hub_kwargs)
        return output_dir

    def push_to_hub(
        self,
        repo_id: str,
        *,
        metadata: dict[str, Any] | None = None,
        base_model: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
    ) -> str:
        """Upload this model's routers (and LoRA adapter, if any) to the Hub repo ``repo_id``, with
        a model card; returns the commit URL (``skipgpt.hub.push_folder``).

        A freshly written folder is uploaded (never a training checkpoint). ``metadata`` defaults
        to what ``from_pretrained`` read. The base model is recorded as it was loaded; a local path
        cannot be loaded by others, so it is refused unless ``base_model`` names its Hub id.
        """
        from . import hub

        base = base_model or self.base_spec
        if not base or Path(base).expanduser().exists():
            raise SkipGPTError(
                f"the base model is the local path {base!r}, which the Hub repo could not load; "
                "pass base_model='org/name' (its Hub id)"
            )
        if metadata is None:
            metadata = self.__dict__.get("metadata") or {}
        with tempfile.TemporaryDirectory(prefix="skipgpt-push-") as tmp:
            folder = Path(tmp) / "routers"
            folder.mkdir()
            record = self.folder_record(metadata).replace(base_model=base, folder=folder)
            tensors = {
                k: v.detach().to("cpu", torch.float32).contiguous()
                for k, v in self.router_state_dict().items()
            }
            save_file(tensors, str(folder / ROUTERS_NAME), metadata={"format": "pt", "skipgpt": __version__})
            checkpoint.write(folder, record)
            peft_model = get_peft(self)
            if peft_model is not None:
                peft_model.save_pretrained(str(folder / ADAPTER_DIR))
            hub.write_model_card(folder, checkpoint.read(folder), repo_id)
            return hub.push_folder(
                folder,
                repo_id,
                private=private,
                token=token,
                commit_message=commit_message,
                revision=revision,
            )

    def folder_record(self, metadata: dict[str, Any] | None = None) -> FolderRecord:
        """The ``skipgpt_config.json`` record of this model (``skipgpt.checkpoint``)."""
        return FolderRecord(
            base_model=self.base_spec,
            router_config=self.skipgpt_config,
            model_type=self.hf_model.config.model_type,
            hidden_size=self.hf_model.config.get_text_config(decoder=True).hidden_size,
            num_layers=self.state.num_layers,
            removed_modules=tuple(sorted(self.state.removed)),
            substitutes=self.substitutes_record(),
            metadata=metadata or {},
        )

    def substitutes_record(self) -> dict[str, Any] | None:
        """What ``FolderRecord.substitutes`` says of this model's substitutes (None: it has none)."""
        if not self.substitute_params:
            return None
        c = self.skipgpt_config
        ranks = substitute_ranks(self)
        return {
            "modules": list(c.substituted),
            "rank": max(ranks.values()),
            "activation": c.substitute_activation,
            "init": c.substitute_init,
            "file": ROUTERS_NAME,
            "prefix": SUBSTITUTE_PREFIX,
        }

    def load_routers(self, path: str | Path) -> None:
        """Load ``routers.safetensors``; refuse a file made for another model, naming the shapes."""
        path = Path(path)
        try:
            tensors = load_file(str(path))
        except FileNotFoundError:
            raise SkipGPTError(f"{path} not found") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise SkipGPTError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
        own = self.router_state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        shapes = [
            f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in tensors and tensors[k].shape != own[k].shape
        ]
        if missing or unexpected or shapes:
            parts = []
            if shapes:
                parts.append(f"{len(shapes)} shape(s) differ, e.g. " + "; ".join(shapes[:3]))
            if missing:
                parts.append(f"{len(missing)} router tensor(s) missing, e.g. {missing[0]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
            raise SkipGPTError(f"router file {path} does not fit this model: " + "; ".join(parts))
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(tensors[k])

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        base_model: nn.Module | None = None,
        *,
        revision: str | None = None,
        device_map: str | dict | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> SkipGPTModel:
        """Rebuild the base model from its recorded spec (unless given), load the routers, then
        what the folder adds (``skipgpt.checkpoint``): its LoRA adapter, LLM-Drop's removed modules.

        ``path_or_hub_id``: a skipgpt folder, or the id of a skipgpt repo on the Hub (downloaded
        at ``revision`` with ``huggingface_hub.snapshot_download``; the local cache when offline).
        ``dtype`` (default float32) and ``device_map`` (transformers') apply to the base model;
        routers stay float32, each on its layer's device.
        """
        from . import hub

        path = Path(path_or_hub_id).expanduser()
        if not path.exists() and hub.is_hub_id(path_or_hub_id):
            try:
                path = hub.download(str(path_or_hub_id), revision=revision)
            except SkipGPTError as e:
                raise SkipGPTError(f"no local folder {str(path_or_hub_id)!r}, and {e}") from None
        elif revision is not None:
            raise SkipGPTError(f"revision is for Hub repo ids; {path_or_hub_id} is a local folder")
        record = checkpoint.read(path)
        if not record.routed:
            raise SkipGPTError(
                f"{path} holds a dense model with LoRA (no routers); load it with skipgpt.load_model"
            )
        spec = record.base_spec
        if base_model is None:
            from .specs import load_base_model

            base_model, _ = load_base_model(spec, dtype=dtype or torch.float32, device_map=device_map)
        model = cls(base_model, record.router_config, base_spec=spec)
        model.load_routers(path / ROUTERS_NAME)
        model.metadata = record.metadata
        if record.adapter is not None:  # stage 2 (LoRA) output: routers + adapter
            attach_adapter(model, path / record.adapter, hf=model.hf_model)
        if record.removed_modules:  # a static baseline (LLM-Drop): modules really gone
            apply_removal(model, record.removed_modules)
        return model

    def unwrap(self) -> nn.Module:
        """Put the original decoder layers back and return the plain HF model."""
        layers = self.adapter.layers(self.hf_model)
        for i, layer in enumerate(layers):
            layers[i] = layer.base_layer
        self._hook.remove()
        _remove_guards(self.hf_model)
        return self.hf_model


# push_to_hub's options that save_pretrained(push_to_hub=True) passes on
_PUSH_OPTIONS = ("base_model", "private", "token", "commit_message", "revision")


class _Refusal:
    """Stands in for the wrapped HF model's ``save_pretrained`` / ``push_to_hub`` (picklable)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any):
        raise SkipGPTError(
            f"{self.name} of a routed HF model would write base_layer.*/routers.* keys that transformers "
            f"loads as missing (random weights); call model.{self.name}(...) on the SkipGPTModel for the "
            "routers, or model.unwrap() first, or skipgpt export"
        )


def _install_guards(hf_model: nn.Module) -> None:
    """Shadow the HF model's checkpoint writers with one-line refusals while it is wrapped."""
    for name in _GUARDED:
        hf_model.__dict__[name] = _Refusal(name)


def _remove_guards(hf_model: nn.Module) -> None:
    for name in _GUARDED:
        if isinstance(hf_model.__dict__.get(name), _Refusal):
            del hf_model.__dict__[name]


def _register_with_pipelines() -> None:
    """Let ``transformers.pipeline("text-generation", model=routed)`` take a ``SkipGPTModel``
    without its "model class not supported" error (the check is by class name; peft's classes
    are listed the same way). Generation goes through ``SkipGPTModel.generate``, i.e. routed."""
    try:
        from transformers.pipelines.base import SUPPORTED_PEFT_TASKS
    except ImportError:  # another transformers layout: the pipeline only logs, it still works
        return
    names = SUPPORTED_PEFT_TASKS.setdefault("text-generation", [])
    if SkipGPTModel.__name__ not in names:
        names.append(SkipGPTModel.__name__)


_register_with_pipelines()
