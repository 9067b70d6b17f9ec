"""PaLM's multi-query projections under tensor parallelism: the query projection split over the
tensor-parallel ranks by head, one key/value projection (the single shared head) on every rank.

megatron-core splits key/value heads over tensor-parallel ranks, so it needs num_query_groups
divisible by the TP size; with one key/value head and TP > 1 each rank needs all of it. This
module stands in for megatron's fused `linear_qkv` (model.kv_projection=shared) and returns what
SelfAttention expects of a rank holding one query group: [its query heads; k; v]. TransformerConfig
is told num_query_groups = TP size (model.py), so every rank's group is that one head.

  weight     [heads * head_dim / tp, d]  column-parallel (its own sharded_state_dict: axis 0)
  kv_weight  [2 * head_dim, d]           replicated; the same tensor on every rank

Each rank's k and v feed only its own query heads, so kv_weight's gradient is partial per rank and
is summed over the tensor-parallel group after backward (`sum_tp_partial_grads`, called by the
grad finalization train_step installs); the input's gradient is summed by megatron's region
mappings (an all-reduce, or the reduce-scatter of sequence parallelism). The grad norm counts the
replicated kv_weight once, as any replicated parameter. The two projections are separate
parameters at every TP size (as PaLM's separate query and key/value kernels, each with its own
Adafactor statistics), so a checkpoint loads into any layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)


class SharedKVLinear(ColumnParallelLinear):
    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool, **kwargs):
        if bias:
            raise ValueError("model.kv_projection=shared: multi-query projections without biases (PaLM) only")
        head_dim = config.kv_channels
        super().__init__(input_size, config.num_attention_heads * head_dim, config=config, init_method=init_method,
                         bias=False, **kwargs)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.kv_weight = torch.nn.Parameter(torch.empty(2 * head_dim, input_size, dtype=config.params_dtype, device=device))
        self.kv_weight.tp_partial_grad = True
        if config.perform_initialization:
            with torch.no_grad():
                init_method(self.kv_weight)
                if parallel_state.get_tensor_model_parallel_world_size() > 1:  # one tensor on every rank
                    dist.broadcast(self.kv_weight, parallel_state.get_tensor_model_parallel_src_rank(),
                                   group=parallel_state.get_tensor_model_parallel_group())

    def forward(self, x: torch.Tensor, *args, **kwargs):
        q, _ = super().forward(x, *args, **kwargs)
        if self.sequence_parallel:
            full = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
        else:
            full = copy_to_tensor_model_parallel_region(x)
        kv = F.linear(full, self.kv_weight)
        return torch.cat([q, kv], dim=-1), None


def sum_tp_partial_grads(model_chunks) -> None:
    """Sum over the tensor-parallel group the gradients of parameters marked tp_partial_grad."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    for chunk in model_chunks:
        for p in chunk.parameters():
            if getattr(p, "tp_partial_grad", False) and p.requires_grad:
                grad = p.main_grad if hasattr(p, "main_grad") else p.grad
                if grad is not None:
                    dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
