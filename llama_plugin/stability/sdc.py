"""Silent data corruption: recompute one micro-batch and compare bitwise (LLaMA paper section 2.4
notes hardware failures that silently corrupt matrix products).

Every `sdc_check_interval` steps each rank runs the forward and backward of its first micro-batch
of the step twice, with the gradient reduction held back, and compares the two passes bit for bit:
- what its pipeline stage received (the previous stage's activations) and what it produced (its
  output activations; the loss on the last stage): deterministic on CPU and GPU alike;
- a fingerprint of its own gradient buffers, where backward is deterministic: on a CPU, or on a GPU
  with torch.use_deterministic_algorithms(True) (flash attention's dQ and cuDNN/TE backward
  accumulate with atomics, so on a GPU without it gradients would raise false alarms).
A rank is named when its passes differ although what it received did not: the fault is in its own
computation. Its later pipeline stages differ too, but they received different activations, so a
fault on stage 0 is not blamed on the last stage. Tensor-parallel peers share activations and are
named together (they share a node). The weights do not change; the probe costs two extra
forward+backward passes of one micro-batch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from llama_plugin.distributed import device
from llama_plugin.run_files import node_name
from llama_plugin.train_step import Batch, _run_schedule

_CHUNK = 1 << 26  # elements fingerprinted at a time (bounds the int64 temporary)


def _digest(t: torch.Tensor) -> list[int]:
    """Two integers from a tensor's bits: their sum and a position-weighted sum."""
    flat = t.detach().reshape(-1)
    bits = flat.view(torch.int32) if flat.element_size() == 4 else flat.view(torch.int16)
    total = weighted = 0
    for i in range(0, bits.numel(), _CHUNK):
        part = bits[i:i + _CHUNK].to(torch.int64)
        total += int(part.sum())
        weighted += int((part * torch.arange(1, part.numel() + 1, device=part.device) % 1000003).sum())
    return [total, weighted]


def _one_pass(chunks, batch: Batch, with_grads: bool) -> dict[str, list[int]]:
    """What this rank received and computed, forward and backward, as integers."""
    seen = {"fwd_in": [], "fwd_out": [], "bwd_in": [], "bwd_out": []}
    hooks = []
    for c in chunks:
        c.zero_grad_buffer()
        for param in c.parameters():
            param.grad = None  # the optimizer aliases .grad to the buffer; autograd would add into it
        model = getattr(c, "module", c)

        def before(module, args):
            if module.decoder.input_tensor is not None:  # not the first stage
                seen["fwd_in"].extend(_digest(module.decoder.input_tensor))

        def after(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor):
                seen["fwd_out"].extend(_digest(out))  # the activations sent on (per-token losses on the last stage)
                if with_grads and out.requires_grad:  # the gradient the next stage sends back
                    out.register_hook(lambda g: seen["bwd_in"].extend(_digest(g)))

        hooks += [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
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
        for h in hooks:
            h.remove()
    for s in stats:  # the last pipeline stage's (loss sum, tokens)
        seen["fwd_out"] += s["lm_loss"].double().view(torch.int64).tolist()
    if with_grads:
        for c in chunks:
            for buf in c.buffers:
                seen["bwd_out"] += _digest(buf.grad_data)
    return seen


def recompute_check(chunks, batch: Batch) -> list[tuple[int, str]]:
    """Collective: (rank, host) of every rank whose own computation of `batch` differed between
    two passes although what it received did not: its forward output with the same forward input,
    or (forward all equal) its gradients with the same gradient from the next stage."""
    with_grads = device().type == "cpu" or torch.are_deterministic_algorithms_enabled()
    first = _one_pass(chunks, batch, with_grads)
    second = _one_pass(chunks, batch, with_grads)
    for c in chunks:
        c.zero_grad_buffer()
        for param in c.parameters():
            param.grad = None
    world, kinds = dist.get_world_size(), ("fwd_in", "fwd_out", "bwd_in", "bwd_out")
    flags = torch.zeros(len(kinds), world, device=device())  # 1: the two passes differ in this
    for i, k in enumerate(kinds):
        flags[i, dist.get_rank()] = float(first[k] != second[k])
    dist.all_reduce(flags)
    fwd_in, fwd_out, bwd_in, bwd_out = (row.tolist() for row in flags)
    bad = [r for r in range(world) if not fwd_in[r] and (fwd_out[r] or (not bwd_in[r] and bwd_out[r]))]
    bad = bad or [r for r in range(world) if fwd_in[r] or fwd_out[r] or bwd_in[r] or bwd_out[r]]
    if not bad:
        return []
    hosts = [None] * world
    dist.all_gather_object(hosts, node_name())
    return [(r, hosts[r]) for r in bad]
