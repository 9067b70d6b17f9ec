"""Adafactor (Shazeer & Stern 2018) with PaLM's settings (PaLM, section 5):

  "without factorization ... effectively equivalent to Adam with parameter scaling, which scales the
  learning rate by the root-mean-square of the parameter matrix"; momentum beta1 = 0.9; the
  second-moment decay beta2 = 1 - k^-0.8 at step k; global-norm clipping 1.0 (megatron's, before
  this step); "dynamic weight decay of lr^2".

Per parameter p with gradient g, at step k (lr is the scheduled lr of p's group):
    v  = beta2_k v + (1 - beta2_k)(g^2 + eps1)
    u  = g / sqrt(v);  u = u / max(1, RMS(u) / clip_threshold)          (update clipping)
    a  = lr * max(eps2, RMS(p))                                          (parameter scaling)
    m  = beta1 m + (1 - beta1) a u
    p  = p - decay p - m,   decay = lr^weight_decay_lr_power (PaLM: 2) or weight_decay * a
The order and the constants are transformers' Adafactor for a tensor it does not factor
(tests/test_seed_architectures.py compares the two).

RMS(p) and RMS(u) are statistics of the whole matrix. A tensor-parallel rank holds a slice of it,
and megatron's distributed optimizer hands this optimizer only a data-parallel shard of each
parameter (`use_shards`), so the step runs in two passes: every rank's sums of squares go into one
vector (a slot per model parameter), which is all-reduced over the data-parallel group (shards) and,
for parameters megatron marks as split, over the tensor-parallel group; then the updates, which are
elementwise, use the whole-matrix statistics. Two small all-reduces per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


class Adafactor(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-2, beta1: float = 0.9, decay_rate: float = -0.8,
                 clip_threshold: float = 1.0, eps: tuple[float, float] = (1e-30, 1e-3),
                 scale_parameter: bool = True, weight_decay: float = 0.0,
                 weight_decay_lr_power: float | None = None):
        defaults = dict(lr=lr, beta1=beta1, decay_rate=decay_rate, clip_threshold=clip_threshold, eps=eps,
                        scale_parameter=scale_parameter, weight_decay=weight_decay,
                        weight_decay_lr_power=weight_decay_lr_power)
        super().__init__(params, defaults)
        self.shards = None  # (slot of each shard, full numel of each slot, slots, data-parallel group)

    def use_shards(self, slot_of: dict, numel_of: dict, slots: int, group) -> None:
        """The parameters are data-parallel shards (megatron's distributed optimizer): `slot_of[id(p)]`
        is the model parameter a shard belongs to (the same numbering on every rank), `numel_of[id(p)]`
        that parameter's size on this tensor-parallel rank, `group` the ranks sharing it."""
        self.shards = (slot_of, numel_of, slots, group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        items = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self.shards is not None:
            slot_of, numel_of, slots, dp_group = self.shards
            slot = [slot_of[id(p)] for _, p in items]
            numel = [numel_of[id(p)] for _, p in items]
        else:
            slots, dp_group = len(items), None
            slot, numel = list(range(len(items))), [p.numel() for _, p in items]
        tp = parallel_state.get_tensor_model_parallel_world_size()
        device = items[0][1].device if items else torch.device("cpu")
        sums = torch.zeros(2, slots, dtype=torch.float32, device=device)  # sum p^2, sum u^2 per model parameter
        split = torch.zeros(slots, dtype=torch.bool)
        sizes = torch.ones(slots, dtype=torch.float32)
        # Pass 1: the second moment, and the sums of squares of p and of the unclipped update.
        for (group, p), k, n in zip(items, slot, numel):
            state = self.state[p]
            if not state:  # Adam's names, so megatron's checkpointing of optimizer state applies
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            g = p.grad.float()
            beta2 = 1.0 - float(state["step"]) ** group["decay_rate"]
            v = state["exp_avg_sq"]
            v.mul_(beta2).add_(g.square() + group["eps"][0], alpha=1.0 - beta2)
            sums[0, k] += p.float().square().sum()
            sums[1, k] += (v.rsqrt() * g).square().sum()
            split[k] = bool(getattr(p, "tensor_model_parallel", False)) and tp > 1
            sizes[k] = n * (tp if split[k] else 1)
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(sums, group=dp_group)
        if split.any():
            across = sums * split.to(device)
            dist.all_reduce(across, group=parallel_state.get_tensor_model_parallel_group())
            sums = torch.where(split.to(device), across, sums)
        rms = torch.sqrt(sums / sizes.to(device)).cpu()
        # Pass 2: the elementwise update with the whole-matrix statistics.
        for (group, p), k in zip(items, slot):
            state = self.state[p]
            lr = group["lr"] * (max(group["eps"][1], float(rms[0, k])) if group["scale_parameter"] else 1.0)
            u = state["exp_avg_sq"].rsqrt().mul_(p.grad.float())
            u.div_(max(1.0, float(rms[1, k]) / group["clip_threshold"]))
            u.mul_(lr)
            m = state["exp_avg"]
            m.mul_(group["beta1"]).add_(u, alpha=1.0 - group["beta1"])
            if group["weight_decay_lr_power"] is not None:
                decay = group["lr"] ** group["weight_decay_lr_power"] if group["weight_decay"] > 0 else 0.0
            else:
                decay = group["weight_decay"] * lr
            if decay:
                p.add_(p, alpha=-decay)
            p.add_(-m.to(p.dtype))
        return loss


def attach_to_distributed_optimizer(opt, model_chunks) -> None:
    """Tell the Adafactor inside megatron's DistributedOptimizer `opt` which model parameter each
    of its shard parameters belongs to (slots numbered in model order, the same on every rank)."""
    slot = {id(p): i for i, p in enumerate(p for chunk in model_chunks for p in chunk.parameters())}
    slot_of, numel_of = {}, {}
    pairs = [*zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
             *zip(opt.model_fp32_groups, opt.shard_fp32_groups)]
    for models, shards in pairs:
        for model_param, shard in zip(models, shards):
            slot_of[id(shard)], numel_of[id(shard)] = slot[id(model_param)], model_param.numel()
    opt.optimizer.use_shards(slot_of, numel_of, len(slot), opt.data_parallel_group)
