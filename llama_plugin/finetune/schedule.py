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


def total_steps(cfg, epoch_samples: int) -> int:
    t = cfg.train
    total = t.epochs * steps_per_epoch(epoch_samples, t.global_batch_size)
    return min(total, t.max_steps) if t.max_steps is not None else total


def warmup_steps(total: int, o) -> int:
    """optimizer.warmup_steps when given, else ceil(warmup_ratio x total), as HF's TrainingArguments."""
    return o.warmup_steps if o.warmup_steps is not None else math.ceil(total * o.warmup_ratio)


def lr_at(step: int, o, total: int) -> float:
    """The lr of optimizer step `step` (0-based), as Hugging Face's schedules (which Alpaca trained
    with) give it: linear warm-up from 0 at step 0 to the peak at step `warm`, then cosine (or
    linear) decay towards 0 at `total`, or constant."""
    warm = warmup_steps(total, o)
    if step < warm:
        return o.lr * step / warm
    if o.schedule == "constant":
        return o.lr
    progress = (step - warm) / max(1, total - warm)
    if o.schedule == "cosine":
        return o.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.lr * (1.0 - progress)


def source_order(size: int, per_epoch: int, epoch: int, source: int, seed: int, shuffle: bool) -> list[int]:
    """The first `per_epoch` draws of one source in one epoch: its records permuted (seeded by
    seed + epoch; further sources and repeats get seeds of their own), a new permutation each time
    the records run out."""
    order = []
    for repeat in range(-(-per_epoch // size)):
        if shuffle:
            g = torch.Generator().manual_seed(seed + epoch + 1_000_000 * (source + 1000 * repeat))
            order += torch.randperm(size, generator=g).tolist()
        else:
            order += list(range(size))
    return order[:per_epoch]


class BatchPlan:
    """Which samples form each global batch, for one file or a mixture of several.

    An epoch is sum(per_epoch) samples and steps_per_epoch = that // global_batch. Source i has a
    share p_i = per_epoch_i / sum of every batch: each batch takes floor(B p_i) of it, and the
    B - sum(floor) remaining places go to the sources furthest behind their running target
    (b + 1) B p_i, so each batch holds floor(B p_i) or that + 1 of source i and the running count
    stays within one sample of its target. With one source this is a permutation of the records
    per epoch, cut into consecutive batches.
    """

    def __init__(self, sizes: list[int], per_epoch: list[int], global_batch: int, seed: int, shuffle: bool):
        self.sizes, self.per_epoch, self.global_batch = list(sizes), list(per_epoch), global_batch
        self.seed, self.shuffle = seed, shuffle
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.epoch_samples = sum(per_epoch)
        self.steps_per_epoch = steps_per_epoch(self.epoch_samples, global_batch)
        self.counts = self._counts()  # [batch within the epoch][source]
        self._epoch, self._orders = None, None

    def _counts(self) -> list[list[int]]:
        B, total = self.global_batch, self.epoch_samples
        share = [B * p / total for p in self.per_epoch]
        base = [int(math.floor(s)) for s in share]
        given = [0] * len(share)
        out = []
        for b in range(self.steps_per_epoch):
            count = list(base)
            behind = sorted(range(len(share)), key=lambda i: (-((b + 1) * share[i] - given[i] - base[i]), i))
            for i in behind[:B - sum(base)]:
                count[i] += 1
            given = [g + c for g, c in zip(given, count)]
            out.append(count)
        return out

    def source_counts(self, step: int) -> list[int]:
        return self.counts[step % self.steps_per_epoch]

    def indices(self, step: int) -> list[int]:
        """The global sample indices of step `step`'s batch: each source's draws in source order."""
        epoch, b = divmod(step, self.steps_per_epoch)
        if self._epoch != epoch:
            self._epoch = epoch
            self._orders = [source_order(n, p, epoch, i, self.seed, self.shuffle)
                            for i, (n, p) in enumerate(zip(self.sizes, self.per_epoch))]
        out = []
        for i, order in enumerate(self._orders):
            start = sum(c[i] for c in self.counts[:b])
            out += [self.offsets[i] + j for j in order[start:start + self.counts[b][i]]]
        return out


def rank_micro_batches(indices: list[int], rank: int, world: int, micro_batch: int) -> list[list[int]]:
    """This rank's contiguous share of a global batch, cut into micro-batches."""
    per_rank = len(indices) // world
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch] for i in range(0, per_rank, micro_batch)]
