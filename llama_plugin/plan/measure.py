"""Bytes the real model keeps for backward, measured: the check on plan/activations.py's formula.

Every tensor autograd saves passes through `torch.autograd.graph.saved_tensors_hooks`. A saved
tensor holds its whole storage (a view of the fused QKV output keeps all of it), so bytes are
counted per storage, once however many tensors share it; parameters are not activations and are
left out. Per layer: (bytes with 2L layers - bytes with L layers) / L, so the embedding, the output
layer and the loss cancel. The peak over a real pipeline schedule: the largest sum of live saved
storages, a storage dying when the last autograd node holding it is freed.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch


class SavedBytes:
    """Counts the storages saved for backward while active: `total` (all, deduplicated), `live`
    (still held by the graph) and `peak` (the largest `live`)."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = set(exclude)
        self.seen: set[int] = set()
        self.refs: dict[int, int] = {}
        self.total = self.live = self.peak = 0

    def _release(self, ptr: int, nbytes: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= nbytes

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.exclude or nbytes == 0:
            return t
        if ptr not in self.seen:
            self.seen.add(ptr)
            self.total += nbytes
        if ptr not in self.refs:
            self.refs[ptr] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[ptr] += 1
        holder = _Held(t)
        weakref.finalize(holder, self._release, ptr, nbytes)
        return holder

    @staticmethod
    def unpack(holder):
        return holder.tensor if isinstance(holder, _Held) else holder

    @contextmanager
    def active(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def parameter_storages(modules) -> set[int]:
    return {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}


def optimizer_state_bytes(optimizer, model_chunks) -> dict[str, int]:
    """The real optimizer's memory on this rank: Adam's moments (and any other per-element state)
    and the fp32 master weights it updates when they are not the model's own tensors; Adam's
    per-tensor step counters apart."""
    model = parameter_storages(model_chunks)
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    moments = masters = steps = 0
    seen = set()
    for opt in inner:
        for group in opt.param_groups:
            for p in group["params"]:
                ptr = p.untyped_storage().data_ptr()
                if ptr not in model and ptr not in seen:
                    seen.add(ptr)
                    masters += p.numel() * p.element_size()
                for key, value in opt.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        if value.numel() == p.numel() and key != "step":
                            moments += value.numel() * value.element_size()
                        else:
                            steps += value.numel() * value.element_size()
    return {"optimizer_moments": moments, "optimizer_masters": masters, "optimizer_step_counters": steps}
