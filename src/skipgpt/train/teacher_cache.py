"""The dense teacher of self-distillation, computed once per training block and cached.

In stage 1 the teacher is the frozen base model with every module executing: its logits on a
block never change, and the loop revisits every block once per epoch. ``TeacherCache`` keeps,
per block (keyed by a hash of its token ids, the model's identity and the cache settings), what
the KL needs of the teacher's distribution at temperature ``t``:

* ``values``  (T, k): the k largest logits divided by ``t``;
* ``indices`` (T, k): their vocabulary ids;
* ``lse``     (T,):   ``logsumexp(logits / t)`` over the whole vocabulary.

``topk_distillation_loss`` then computes the KL between the teacher and the student both
*coarsened* to the k cached tokens plus one "tail" outcome (every other token)::

    KL_k = Σ_{i∈S} p_i (log p_i - log q_i)  +  P_tail (log P_tail - log Q_tail)

with ``p_i = exp(values_i - lse)``, ``P_tail = 1 - Σ_S p_i``, ``log q_i = z_i/t - logsumexp(z/t)``
the student's exact log-probabilities and ``Q_tail = 1 - Σ_S q_i``. This is exact for the
coarsened distributions (no renormalisation, no dropped mass); it is a lower bound of the full
KL (data processing) with equality when k = vocabulary size, and the gap is at most the part of
the KL that lives inside the teacher's tail. The student side needs one ``logsumexp`` over the
vocabulary and a gather of k logits per token, instead of two full log-softmaxes.

Memory: ``k * 8 + 4`` bytes per token (k = 64: 516 B, about 1 MB per 8×256 batch); the cache
holds at most ``max_bytes`` and drops the least recently used blocks beyond it.

A run at the default 300 steps × 8 blocks sees fewer blocks than the ``calib`` set holds (2992
of 256 tokens with SmolLM2's tokenizer): the in-memory cache only pays from the second epoch
on. With a ``directory`` the entries persist (one safetensors file per block, written once,
atomically), so every later run on the same model, blocks and settings reads the teacher
instead of running it; the folder grows to at most ``max_disk_bytes``, then is only read.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SkipGPTError

__all__ = [
    "TeacherTargets",
    "TeacherCache",
    "teacher_targets",
    "topk_distillation_loss",
    "weights_fingerprint",
]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the base weights' names, shapes, dtypes and sums (routers and LoRA left
    out): what tells one teacher from another in a cache folder shared by runs."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".routers." not in name and "lora_" not in name:
                h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{float(p.double().sum())!r};".encode())
    return h.hexdigest()[:16]


@dataclass
class TeacherTargets:
    """What the KL needs of the teacher at temperature t, for a batch.

    values (B, T, k) float32 top-k logits / t; indices (B, T, k) int64 vocabulary ids;
    lse (B, T) float32 logsumexp of all logits / t.
    """

    values: torch.Tensor
    indices: torch.Tensor
    lse: torch.Tensor

    def row(self, i: int) -> TeacherTargets:
        return TeacherTargets(self.values[i], self.indices[i], self.lse[i])

    @classmethod
    def stack(cls, rows: list[TeacherTargets]) -> TeacherTargets:
        return cls(*(torch.stack([getattr(r, f) for r in rows]) for f in ("values", "indices", "lse")))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.lse))


def teacher_targets(logits: torch.Tensor, top_k: int, temperature: float = 1.0) -> TeacherTargets:
    """logits (B, T, V) -> ``TeacherTargets`` with the ``min(top_k, V)`` largest logits."""
    scaled = logits.float() / temperature
    values, indices = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1)
    # clones: the teacher may run under inference_mode, whose tensors autograd may not save
    return TeacherTargets(values.clone(), indices.clone(), torch.logsumexp(scaled, dim=-1).clone())


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher: TeacherTargets,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k support plus the tail mass, per token,
    averaged over real tokens, times ``temperature**2`` (as ``losses.distillation_loss``).

    student_logits (B, T, V); teacher: ``TeacherTargets`` of (B, T, k). Equals
    ``distillation_loss`` when k = V; see the module docstring for the formula.
    """
    t = temperature
    scaled = student_logits.float() / t
    log_q = scaled.gather(-1, teacher.indices) - torch.logsumexp(scaled, dim=-1, keepdim=True)  # (B, T, k)
    log_p = teacher.values - teacher.lse.unsqueeze(-1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1)  # (B, T)
    if teacher.indices.shape[-1] < student_logits.shape[-1]:
        p_tail = (1 - p.sum(-1)).clamp_min(0)
        q_tail = (1 - log_q.exp().sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
        kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * q_tail.log()
    if attention_mask is not None:
        m = attention_mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp_min(1.0) * t * t
    return kl.mean() * t * t


class TeacherCache:
    """Per-block ``TeacherTargets``, least recently used dropped beyond ``max_bytes``.

    ``identity`` names the teacher (model spec, precision, ...): two caches with different
    identities never share an entry. ``targets(input_ids, teacher_logits)`` returns the batch's
    targets, calling ``teacher_logits(ids)`` (ids (b, T) -> logits (b, T, V)) only for the rows
    not cached yet (in memory, or in ``directory`` when given).
    """

    def __init__(
        self,
        top_k: int = 64,
        temperature: float = 1.0,
        identity: str = "",
        max_bytes: int = 2 << 30,
        directory: str | Path | None = None,
        max_disk_bytes: int = 8 << 30,
    ):
        if not isinstance(top_k, int) or top_k < 1:
            raise SkipGPTError(f"teacher cache top_k must be an integer >= 1, got {top_k!r}")
        if max_bytes < 0 or max_disk_bytes < 0:
            raise SkipGPTError(f"teacher cache sizes must be >= 0, got {max_bytes} and {max_disk_bytes}")
        self.top_k, self.temperature, self.max_bytes = top_k, float(temperature), max_bytes
        self._prefix = f"{identity}|k={top_k}|t={self.temperature}|".encode()
        self._entries: OrderedDict[str, TeacherTargets] = OrderedDict()
        self.nbytes = self.hits = self.misses = 0
        self.directory, self.max_disk_bytes = None, max_disk_bytes
        if directory is not None:
            self.directory = Path(directory)
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SkipGPTError(
                    f"cannot create the teacher cache folder {directory} ({e.strerror})"
                ) from None
            self.disk_bytes = sum(f.stat().st_size for f in self.directory.glob("*.safetensors"))

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, block: torch.Tensor) -> str:
        """sha256 of the identity, the settings, the block's length and its token ids."""
        ids = block.detach().to("cpu", torch.int64).contiguous()
        return hashlib.sha256(
            self._prefix + str(tuple(ids.shape)).encode() + ids.numpy().tobytes()
        ).hexdigest()

    def targets(
        self, input_ids: torch.Tensor, teacher_logits: Callable[[torch.Tensor], torch.Tensor]
    ) -> TeacherTargets:
        """input_ids (B, T) -> ``TeacherTargets`` (B, T, k) on input_ids' device."""
        keys = [self.key(row) for row in input_ids]
        rows: dict[int, TeacherTargets] = {}
        for i, k in enumerate(keys):
            if k in self._entries:
                self._entries.move_to_end(k)
                rows[i] = _loaded(self._entries[k])
            elif (stored := self._read(k)) is not None:
                rows[i] = self._put(k, stored, write=False)
        missing = [i for i in range(len(keys)) if i not in rows]
        self.hits += len(rows)
        self.misses += len(missing)
        if missing:
            fresh = teacher_targets(teacher_logits(input_ids[missing]), self.top_k, self.temperature)
            for j, i in enumerate(missing):
                rows[i] = self._put(keys[i], fresh.row(j))
        out = TeacherTargets.stack([rows[i] for i in range(len(keys))])
        return TeacherTargets(*(x.to(input_ids.device) for x in (out.values, out.indices, out.lse)))

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _read(self, key: str) -> TeacherTargets | None:
        """The entry stored in ``directory``, or None (no folder, no file, or a file of another
        shape: a torn or foreign file is a miss, and is rewritten)."""
        if self.directory is None or not self._path(key).is_file():
            return None
        from safetensors.torch import load_file

        try:
            t = load_file(str(self._path(key)))
            row = TeacherTargets(t["values"], t["indices"], t["lse"])
        except Exception:  # noqa: BLE001 - any unreadable file is recomputed
            return None
        if row.values.shape != row.indices.shape or row.values.shape[:-1] != row.lse.shape:
            return None
        return row

    def _write(self, key: str, row: TeacherTargets) -> None:
        if self.directory is None or self.disk_bytes + row.nbytes > self.max_disk_bytes:
            return
        from safetensors.torch import save_file

        tmp = self.directory / f".{key}.{os.getpid()}.tmp"
        save_file({"values": row.values, "indices": row.indices, "lse": row.lse}, str(tmp))
        os.replace(tmp, self._path(key))  # whole or absent, also with several writers
        self.disk_bytes += self._path(key).stat().st_size

    def _put(self, key: str, row: TeacherTargets, write: bool = True) -> TeacherTargets:
        row = TeacherTargets(
            row.values.to("cpu", torch.float32).clone(),  # own storage, not a view of the batch
            row.indices.to("cpu", torch.int32).clone(),
            row.lse.to("cpu", torch.float32).clone(),
        )
        if write:
            self._write(key, row)
        if key not in self._entries and row.nbytes <= self.max_bytes:
            self._entries[key] = row
            self.nbytes += row.nbytes
            while self.nbytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
        return _loaded(row)


def _loaded(row: TeacherTargets) -> TeacherTargets:
    """A stored row (int32 ids, half the bytes) as the loss reads it (int64 ids)."""
    return TeacherTargets(row.values, row.indices.long(), row.lse)
