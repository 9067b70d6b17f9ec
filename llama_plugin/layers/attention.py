"""The attention core on PyTorch's `scaled_dot_product_attention` (SDPA).

A drop-in for megatron-core's `DotProductAttention` in the local layer spec: the same constructor
and forward, megatron's [s, b, heads, head_dim] layout in and [s, b, heads * head_dim] out, this
tensor-parallel rank's heads only. It never forms the [b, heads, s, s] score matrix: on a GPU
PyTorch dispatches to the FlashAttention / cuDNN / memory-efficient kernels, on a CPU to its
flash kernel, so what autograd keeps is O(s) (output and log-sum-exp), not O(s^2).
Grouped-query attention goes to SDPA as is (`enable_gqa`): key/value heads are not copied.

A sliding window (`config.window_size = (window - 1, 0)`, model.py; on the layers
`window_attn_skip_freq` leaves windowed) becomes a boolean band mask
[s, s] shared by the batch and the heads: SDPA still keeps O(s) for backward, but the mask itself
is s^2 booleans (64 MiB at 8k). PyTorch's kernel that never forms it, flex_attention, has no CPU
backward, so it cannot be the one module tree the CPU suite proves.
LLaMA uses no attention dropout and no bias; those settings are refused, not ignored.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from llama_plugin.layers.relative_bias import RelativePositionBias


RELATIVE_TABLE = "relative_bias.table.relative_attention_bias.weight"


@functools.lru_cache(maxsize=8)
def _band(sq: int, sk: int, window: int, device) -> torch.Tensor:
    """[sq, sk] True where the last sq of sk positions (sq = 1 when decoding) see a key: the `window`
    keys up to themselves. Built once per shape, shared by every layer."""
    q_pos = torch.arange(sk - sq, sk, device=device).unsqueeze(1)
    k_pos = torch.arange(sk, device=device).unsqueeze(0)
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None,
                 relative_attention_num_buckets: int | None = None, relative_attention_max_distance: int = 128):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        unsupported = [
            (config.context_parallel_size == 1, "context_parallel_size", config.context_parallel_size),
            (dropout == 0.0, "attention_dropout", dropout),
            (config.window_size is None or config.window_size[1] == 0, "window_size", config.window_size),
            (config.softmax_type == "vanilla", "softmax_type", config.softmax_type),
            (not config.apply_query_key_layer_scaling, "apply_query_key_layer_scaling", True),
        ]
        for ok, field, value in unsupported:
            if not ok:
                raise ValueError(f"SDPAttention: {field}={value!r} is not supported (LLaMA needs none)")
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp or config.num_query_groups % tp:
            raise ValueError(f"SDPAttention: {config.num_attention_heads} heads / {config.num_query_groups} "
                             f"query groups do not split over {tp} tensor-parallel ranks")
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.attn_mask_type = attn_mask_type
        # megatron's rule for which layers the window applies to (window_attn_skip_freq: every n-th
        # layer attends fully, as GPT-3's alternating dense and banded layers).
        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window = config.window_size[0] + 1 if windowed else None
        # LaMDA's T5 relative position bias (relative_bias.py), when the layer spec asks for it.
        self.relative_bias = None if relative_attention_num_buckets is None else \
            RelativePositionBias(config, relative_attention_num_buckets, relative_attention_max_distance)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention: attention_bias and packed sequences are not supported")
        sq, b = query.shape[0], query.shape[1]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # As megatron's softmax: a given mask wins (True = masked out); a causal layer without one
        # masks the future; one query token (decoding) sees every key.
        causal = mask_type == AttnMaskType.causal and attention_mask is None and sq > 1
        if causal and key.shape[0] != sq:
            raise ValueError(f"SDPAttention: causal attention needs as many keys as queries ({key.shape[0]} != {sq})")
        mask = None if attention_mask is None else ~attention_mask
        if self.window is not None and mask_type == AttnMaskType.causal and key.shape[0] > self.window:
            band = _band(sq, key.shape[0], self.window, query.device)
            mask, causal = band if mask is None else mask & band, False
        if self.relative_bias is not None:
            sk = key.shape[0]
            bias = self.relative_bias(sq, sk, query.device).to(query.dtype)
            if mask_type == AttnMaskType.causal or mask is not None:
                allowed = mask if mask is not None else torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
                bias = bias.masked_fill(~allowed, float("-inf"))
            mask, causal = bias, False
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                                             enable_gqa=self.heads != self.groups)
        # [b, n, s, d] -> [s, b, n * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The relative bias table, split over tensor-parallel ranks by head (its axis 1)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {RELATIVE_TABLE: 1}, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=(metadata or {}).get("dp_cp_group"))
