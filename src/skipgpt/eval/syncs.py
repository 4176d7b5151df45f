"""Count the host synchronisations a piece of model code would cause on a GPU, on any device.

On a GPU, kernels are queued asynchronously and every read of a device value by the host
stops the queue until the GPU has caught up. ``count_host_syncs`` records, with a
``TorchFunctionMode`` (so it also works on a CPU, where these reads cost nothing), every call
that would be such a read if the tensors lived on a GPU:

* reads of values: ``item``, ``tolist``, ``bool(t)``, ``int(t)``, ``float(t)``, ``t.__index__``
  (a tensor used as a Python int), ``cpu``, ``numpy``, ``to("cpu")`` (a literal "cpu" only);
* data-dependent output shapes: ``nonzero``, ``masked_select``, ``unique``, one-argument
  ``torch.where``, indexing or assigning through a boolean tensor, ``repeat_interleave`` with
  tensor repeats and no ``output_size``.

What a host copy (``cpu()``, ``to("cpu")``) returns is tagged as living on the host, and so is
everything computed from it: reads of those are free on a GPU too and are not counted (on a
CPU, ``cpu()`` of a CPU tensor is the tensor itself; inside the counter it returns a copy so
that the tag never marks the original).

Each event is attributed to the first stack frame outside ``torch`` (``skipgpt/fast.py:123``,
``transformers/...``), so the count of one decode step can be read per source line. On a real
GPU, ``torch.cuda.set_sync_debug_mode("warn")`` is the ground truth; this counter is the
portable approximation: it also counts the reads a CPU run takes on purpose, and it cannot see
host-to-device copies (``cpu_tensor.to(x.device)`` is a no-op on a CPU), which a GPU run with
``non_blocking=False`` also waits for.

    with count_host_syncs() as log:
        model(input_ids=tok, cache=cache, use_cache=True)
    print(log.total, log.by_site())
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SyncLog", "count_host_syncs", "SYNC_OPS"]

_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
}
_SHAPES = {
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    torch.Tensor.masked_select: "masked_select",
    torch.masked_select: "masked_select",
    torch.Tensor.unique: "unique",
    torch.unique: "unique",
}
SYNC_OPS = sorted(set(_READS.values()) | set(_SHAPES.values())) + [
    "to_cpu",
    "where_1arg",
    "bool_index",
    "repeat_interleave",
]

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS = str(Path(__file__).resolve())


@dataclass
class SyncLog:
    """The host synchronisations seen: (op, site) per event, in call order."""

    events: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.events)

    def by_site(self) -> dict[str, int]:
        """``"op @ file:line (function)"`` -> count, most frequent first."""
        return dict(Counter(f"{op} @ {site}" for op, site in self.events).most_common())

    def by_op(self) -> dict[str, int]:
        return dict(Counter(op for op, _ in self.events).most_common())

    def count(self, where: str) -> int:
        """Events whose site contains ``where`` (e.g. ``"skipgpt/"``)."""
        return sum(where in site for _, site in self.events)


def _site() -> str:
    """The first frame outside torch and this module: ``pkg/file.py:line (function)``."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if not (name.startswith(_TORCH_DIR) or name == _THIS or name.startswith("<")):
            parts = Path(name).parts
            short = "/".join(parts[-2:]) if len(parts) > 1 else name
            for anchor in ("skipgpt", "transformers", "benchmarks", "tests"):
                if anchor in parts:
                    short = "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor) :])
                    break
            return f"{short}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "?"


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _classify(func, args, kwargs) -> str | None:
    """The sync op this call is, or None."""
    op = _READS.get(func) or _SHAPES.get(func)
    if op is not None:
        return op
    if func is torch.Tensor.to:
        # only a literal "cpu" is a read to the host: ``.to(x.device)`` is a no-op on a CPU and
        # (for a CPU tensor) a host-to-device copy on a GPU, which this counter cannot tell apart
        dev = kwargs.get("device", args[1] if len(args) > 1 else None)
        return "to_cpu" if isinstance(dev, str) and _is_cpu(dev) else None
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "where_1arg"
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
            return "bool_index"
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None:
            return "repeat_interleave"
    return None


_HOST = "_skipgpt_host_copy"


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for x in obj:
            yield from _tensors(x)


def _on_host(args, kwargs) -> bool:
    return any(getattr(t, _HOST, False) for t in _tensors([*args, *kwargs.values()]))


def _tag(out) -> None:
    for t in _tensors(out):
        with contextlib.suppress(AttributeError, RuntimeError):
            setattr(t, _HOST, True)


class _Mode(TorchFunctionMode):
    def __init__(self, log: SyncLog):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _on_host(args, kwargs):  # computed from a host copy: no device read
            out = func(*args, **kwargs)
            _tag(out)
            if args and (func is torch.Tensor.__setitem__ or getattr(func, "__name__", "").endswith("_")):
                _tag(args[0])  # written in place from host values: a host tensor now
            return out
        op = _classify(func, args, kwargs)
        if op is None:
            return func(*args, **kwargs)
        self.log.events.append((op, _site()))
        out = func(*args, **kwargs)
        if op in ("cpu", "to_cpu"):
            if out is args[0]:
                out = out.clone()
            _tag(out)
        return out


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncLog]:
    """Context: every would-be host synchronisation inside it is appended to the yielded log."""
    log = SyncLog()
    with _Mode(log):
        yield log
