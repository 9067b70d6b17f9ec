"""PaLM's parallel layer: attention and MLP read the same normed input, and both add to the residual.

    y = x + attn(norm(x)) + mlp(norm(x))            (PaLM, section 2, "Parallel Layers")

against the serial y = h + mlp(norm(h)), h = x + attn(norm(x)). One norm feeds both branches (the
spec gives no pre-MLP norm), so at scale the two input matmuls could be fused; here they stay
megatron-core's SelfAttention and MLP, unchanged, so tensor and sequence parallelism, recompute
and checkpoints behave as in the serial layer. With sequence parallelism each branch all-gathers
the normed input and reduce-scatters its output, as the serial layer does.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

# What TransformerBlock passes to a layer that SelfAttention also takes.
_ATTENTION_KWARGS = ("inference_context", "rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin",
                     "rotary_pos_cos_sin", "attention_bias", "packed_seq_params", "sequence_len_offset")


class ParallelAttentionMLPLayer(TransformerLayer):
    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, **kwargs):
        if context is not None:
            raise ValueError("ParallelAttentionMLPLayer: a decoder-only layer has no cross-attention context")
        normed = self.input_layernorm(hidden_states)
        attention_out = self.self_attention(normed, attention_mask=attention_mask,
                                            **{k: kwargs[k] for k in _ATTENTION_KWARGS if k in kwargs})
        mlp_out = self.mlp(normed)
        with self.bias_dropout_add_exec_handler():
            h = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention_out, hidden_states, self.hidden_dropout)
            h = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(mlp_out, h, self.hidden_dropout)
        return make_viewless_tensor(inp=h, requires_grad=h.requires_grad, keep_graph=True), context
