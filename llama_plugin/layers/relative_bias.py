"""T5's relative position bias, for LaMDA ("T5 relative attention"): a learned scalar per head and
per bucket of key-minus-query distance, added to the attention logits; no position embedding.

Causal (unidirectional) buckets: distances 0..15 each get a bucket, longer ones share 16
logarithmic buckets up to 128, as T5's decoder (megatron-core's RelativePositionEmbedding holds the
table and the bucketing; tests/test_seed_architectures.py checks it against HF T5's). Each layer
learns its own table here; T5 shares the first layer's, and LaMDA's paper does not say
(32 x heads numbers per layer). The table is split over tensor-parallel ranks by head, like the
heads themselves, so its gradient needs no reduction.
"""

from __future__ import annotations

import functools

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.relative_pos_embedding import RelativePositionEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig


class RelativePositionBias(torch.nn.Module):
    def __init__(self, config: TransformerConfig, num_buckets: int, max_distance: int):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        heads = config.num_attention_heads // tp

        def init_rank_slice(weight):
            # The full table from the shared seed, then this rank's heads: the same model in any layout.
            if config.perform_initialization:
                full = torch.empty(num_buckets, config.num_attention_heads, dtype=weight.dtype, device=weight.device)
                config.init_method(full)
                with torch.no_grad():
                    weight.copy_(full[:, rank * heads:(rank + 1) * heads])

        self.table = RelativePositionEmbedding(False, init_rank_slice, heads, num_buckets, max_distance)
        weight = self.table.relative_attention_bias.weight
        weight.data = weight.data.to(config.params_dtype)
        set_tensor_model_parallel_attributes(weight, True, 1, 1)

    def forward(self, sq: int, sk: int, device) -> torch.Tensor:
        """[heads, sq, sk]: the bias of the last sq of sk positions (sq < sk when decoding)."""
        t = self.table
        buckets = _buckets(sq, sk, t.relative_attention_num_buckets, t.relative_attention_max_distance,
                           torch.device(device))
        return t.relative_attention_bias(buckets).permute(2, 0, 1)


@functools.lru_cache(maxsize=8)
def _buckets(sq: int, sk: int, num_buckets: int, max_distance: int, device) -> torch.Tensor:
    """Bucket ids [sq, sk], computed once per shape and shared by every layer (megatron's bucketing
    reads nothing from its instance)."""
    q_pos = torch.arange(sk - sq, sk, device=device).unsqueeze(1)
    k_pos = torch.arange(sk, device=device).unsqueeze(0)
    return RelativePositionEmbedding._relative_position_bucket(
        None, k_pos - q_pos, bidirectional=False, num_buckets=num_buckets, max_distance=max_distance)
