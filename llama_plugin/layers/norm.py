"""RMSNorm for the local module tree.

LLaMA normalizes with RMSNorm: y = x / sqrt(mean(x^2) + eps) * g, the statistic in fp32. Under sequence
parallelism each tensor-parallel rank normalizes a different slice of the sequence, so the gradient
of `g` is partial on every rank and must be summed across the tensor-parallel group. megatron-core
does that sum (`finalize_model_grads`) for parameters marked `sequence_parallel=True`; its
`WrappedTorchNorm` refuses sequence parallelism instead, hence this module.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"normalization={config.normalization!r}: LLaMA uses RMSNorm")
        self.eps = eps
        # With CPU initialization: the default device (the CPU, or "meta" when only counting).
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device)
        )
        # Tells finalize_model_grads to all-reduce this grad over the tensor-parallel group.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As Meta's reference: normalize in fp32, cast back, then scale. torch's fused rms_norm
        # computes x * rsqrt(mean(x^2) + eps) (tests/test_layers.py checks it bitwise against HF).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight
