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
(tests/test_seed_architectures.py compares the two). With tensor parallelism each rank holds a
slice of a matrix; RMS(p) and RMS(u) are statistics of the whole matrix, so their sums of squares
are all-reduced over the tensor-parallel group for parameters megatron marks as split. The
distributed optimizer shards parameters over data-parallel ranks too; it is refused with Adafactor
(`optimizer.name`), whose statistics would then be per shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _rms(t: torch.Tensor, tp_split: bool) -> torch.Tensor:
    sum_sq, n = t.float().square().sum(), t.numel()
    tp = parallel_state.get_tensor_model_parallel_world_size() if tp_split else 1
    if tp > 1:
        dist.all_reduce(sum_sq, group=parallel_state.get_tensor_model_parallel_group())
    return torch.sqrt(sum_sq / (n * tp))


class Adafactor(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-2, beta1: float = 0.9, decay_rate: float = -0.8,
                 clip_threshold: float = 1.0, eps: tuple[float, float] = (1e-30, 1e-3),
                 scale_parameter: bool = True, weight_decay: float = 0.0,
                 weight_decay_lr_power: float | None = None):
        defaults = dict(lr=lr, beta1=beta1, decay_rate=decay_rate, clip_threshold=clip_threshold, eps=eps,
                        scale_parameter=scale_parameter, weight_decay=weight_decay,
                        weight_decay_lr_power=weight_decay_lr_power)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if not state:  # Adam's names, so megatron's checkpointing of optimizer state applies
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                k = float(state["step"])
                split = bool(getattr(p, "tensor_model_parallel", False))
                lr = group["lr"] * (max(eps2, float(_rms(p, split))) if group["scale_parameter"] else 1.0)
                beta2 = 1.0 - k ** group["decay_rate"]
                v = state["exp_avg_sq"]
                v.mul_(beta2).add_(g.square() + eps1, alpha=1.0 - beta2)
                u = v.rsqrt().mul_(g)
                u.div_((_rms(u, split) / group["clip_threshold"]).clamp_(min=1.0))
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
