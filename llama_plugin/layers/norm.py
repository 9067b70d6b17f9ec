"""RMSNorm and LayerNorm for the local module tree, aware of sequence parallelism.

LLaMA normalizes with RMSNorm: y = x / sqrt(mean(x^2) + eps) * g, the statistic in fp32. GPT-3
and PaLM use LayerNorm, y = (x - mean) / sqrt(var + eps) * g (+ b): GPT-3 with a bias, PaLM without
("no biases ... in layer norms"). Under sequence parallelism each tensor-parallel rank normalizes a
different slice of the sequence, so the gradients of `g` and `b` are partial on every rank and must
be summed across the tensor-parallel group. megatron-core does that sum (`finalize_model_grads`) for
parameters marked `sequence_parallel=True`; its `WrappedTorchNorm` refuses sequence parallelism
instead, hence these modules. The layer spec picks the class and the bias (spec.py).
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig


class _Norm(torch.nn.Module):
    kind = ""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, bias: bool = False):
        super().__init__()
        if config.normalization != self.kind:
            raise ValueError(f"normalization={config.normalization!r}, but the layer spec built a {self.kind}")
        if bias and self.kind == "RMSNorm":
            raise ValueError("RMSNorm has no bias")
        self.eps = eps
        # With CPU initialization: the default device (the CPU, or "meta" when only counting).
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype, device=device)) if bias else None
        # Tells finalize_model_grads to all-reduce these grads over the tensor-parallel group.
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel


class RMSNorm(_Norm):
    kind = "RMSNorm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As Meta's reference: normalize in fp32, cast back, then scale. torch's fused rms_norm
        # computes x * rsqrt(mean(x^2) + eps) (tests/test_layers.py checks it bitwise against HF).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight


class LayerNorm(_Norm):
    kind = "LayerNorm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The statistics in fp32 (as megatron's and TransformerEngine's fused LayerNorms), then cast back.
        weight = self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps=self.eps).type_as(x)
