"""Silent data corruption: recompute one micro-batch and compare bitwise (LLaMA paper section 2.4
notes hardware failures that silently corrupt matrix products).

Every `sdc_check_interval` steps each rank runs the forward and backward of its first micro-batch
of the step twice, with the gradient reduction held back, and compares the two results bit for bit:
the loss, and a fingerprint of its own gradient buffers. A rank whose two results differ has
computed wrongly at least once; it is named (rank and host) to every rank.

What holds where: on a CPU the kernels are deterministic, so equal inputs give equal bits. On a GPU
the forward is deterministic, but some backward kernels accumulate with atomics (flash attention's
dQ), so gradients are compared only when torch.use_deterministic_algorithms(True) is on; otherwise
the loss alone is compared. The weights do not change; the probe costs two extra forward+backward
passes of one micro-batch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from llama_plugin.distributed import device
from llama_plugin.run_files import node_name
from llama_plugin.train_step import Batch, _run_schedule

_CHUNK = 1 << 26  # elements fingerprinted at a time (bounds the int64 temporary)


def _fingerprint(chunks, with_grads: bool, stats) -> list[int]:
    values = []
    for s in stats:  # the last pipeline stage's (loss sum, tokens)
        values += s["lm_loss"].double().view(torch.int64).tolist()
    if with_grads:
        for c in chunks:
            for buf in c.buffers:
                bits = buf.grad_data.view(-1).view(torch.int32)
                total = weighted = 0
                for i in range(0, bits.numel(), _CHUNK):
                    part = bits[i:i + _CHUNK].to(torch.int64)
                    total += int(part.sum())
                    weighted += int((part * torch.arange(1, part.numel() + 1, device=part.device) % 1000003).sum())
                values += [total, weighted]
    return values


def _one_pass(chunks, batch: Batch, with_grads: bool) -> list[int]:
    for c in chunks:
        c.zero_grad_buffer()
        for param in c.parameters():
            param.grad = None  # the optimizer aliases .grad to the buffer; autograd would add into it
    config = chunks[0].config
    # No data-parallel reduction: this rank's own gradients are compared. The schedule's own
    # no_sync (config.no_sync_func, set with overlap_grad_reduce) would end on the last micro-batch
    # and start an asynchronous reduce that nothing waits for (the next step's reduce then finds it
    # outstanding), so it is switched off and ours holds for the whole pass.
    saved = config.finalize_model_grads_func, config.no_sync_func
    config.finalize_model_grads_func = config.no_sync_func = None
    try:
        with contextlib.ExitStack() as stack:
            for c in chunks:
                stack.enter_context(c.no_sync())
            stats = _run_schedule(chunks, [batch], forward_only=False)
    finally:
        config.finalize_model_grads_func, config.no_sync_func = saved
    return _fingerprint(chunks, with_grads, stats)


def recompute_check(chunks, batch: Batch) -> list[tuple[int, str]]:
    """Collective: (rank, host) of every rank whose two computations of `batch` differ."""
    with_grads = device().type == "cpu" or torch.are_deterministic_algorithms_enabled()
    first = _one_pass(chunks, batch, with_grads)
    second = _one_pass(chunks, batch, with_grads)
    for c in chunks:
        c.zero_grad_buffer()
        for param in c.parameters():
            param.grad = None
    mismatch = first != second
    flags = [torch.zeros(1, device=device()) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, torch.tensor([1.0 if mismatch else 0.0], device=device()))
    bad = [r for r, f in enumerate(flags) if f.item()]
    if not bad:
        return []
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, node_name())
    return [(r, hosts[r]) for r in bad]
