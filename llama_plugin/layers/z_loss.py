"""PaLM's auxiliary z-loss: z_loss * log(Z)^2 per token, Z the softmax normalizer of the logits.

"to encourage the softmax normalizer log(Z) to be close to 0, which we found increases the
stability of training" (PaLM, section 5; coefficient 1e-4). The logits are split over the vocabulary
across tensor-parallel ranks, so log Z is a tensor-parallel logsumexp: the max over all ranks (a
constant for autograd), then the sum of exponentials all-reduced with megatron's
reduce_from_tensor_model_parallel_region (forward: all-reduce; backward: identity, as each rank's
exponentials get the same upstream gradient).
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def vocab_parallel_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(logits[..., v]) over the whole vocabulary, in fp32: [...] from [..., vocab / tp]."""
    x = logits.float()
    peak = x.max(dim=-1).values.detach()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    sum_exp = reduce_from_tensor_model_parallel_region(torch.exp(x - peak.unsqueeze(-1)).sum(dim=-1))
    return peak + torch.log(sum_exp)


def z_loss(logits: torch.Tensor, coefficient: float) -> torch.Tensor:
    """[s, b] auxiliary loss per token from [s, b, vocab / tp] logits."""
    return coefficient * vocab_parallel_log_normalizer(logits).square()
