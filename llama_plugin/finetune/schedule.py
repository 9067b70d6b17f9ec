"""Step counts, data order and the learning rate of a fine-tuning run, as closed forms of the step.

Everything a resumed run needs to continue exactly is a function of the optimizer step: which
records form the global batch (a permutation per epoch, seeded by seed + epoch) and the lr.
"""

from __future__ import annotations

import math

import torch


def steps_per_epoch(num_records: int, global_batch: int) -> int:
    """Full global batches per epoch (the last partial batch of an epoch is dropped)."""
    return num_records // global_batch


def total_steps(cfg, num_records: int) -> int:
    t = cfg.train
    total = t.epochs * steps_per_epoch(num_records, t.global_batch_size)
    return min(total, t.max_steps) if t.max_steps is not None else total


def warmup_steps(total: int, ratio: float) -> int:
    return math.ceil(total * ratio)


def lr_at(step: int, o, total: int) -> float:
    """The lr of optimizer step `step` (0-based), as Hugging Face's schedules (which Alpaca trained
    with) give it: linear warm-up from 0 at step 0 to the peak at step `warm`, then cosine (or
    linear) decay towards 0 at `total`, or constant."""
    warm = warmup_steps(total, o.warmup_ratio)
    if step < warm:
        return o.lr * step / warm
    if o.schedule == "constant":
        return o.lr
    progress = (step - warm) / max(1, total - warm)
    if o.schedule == "cosine":
        return o.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.lr * (1.0 - progress)


def global_batch_indices(step: int, num_records: int, global_batch: int, seed: int, shuffle: bool) -> list[int]:
    """The record indices of step `step`'s global batch, in order."""
    per_epoch = steps_per_epoch(num_records, global_batch)
    epoch, b = divmod(step, per_epoch)
    if shuffle:
        order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        order = torch.arange(num_records)
    return order[b * global_batch:(b + 1) * global_batch].tolist()


def rank_micro_batches(indices: list[int], rank: int, world: int, micro_batch: int) -> list[list[int]]:
    """This rank's contiguous share of a global batch, cut into micro-batches."""
    per_rank = len(indices) // world
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch] for i in range(0, per_rank, micro_batch)]
