"""Training FLOPs per token, the numerator of model FLOPs utilization (MFU).

PaLM (Chowdhery et al. 2022, appendix B): 6N + 12·L·H·Q·T per token, where
  N = parameters that take part in matrix multiplies: all but the input embedding (a lookup) and
      learned position embeddings;
      the output projection counts. Norm weights are included; they are negligible.
  L, H, Q, T = layers, query heads, head dim, sequence length: the QK^T and attention-times-V
      matmuls, counted over the full T x T matrix as PaLM does (flash attention skips the masked
      half, so this slightly overstates the work done, and MFU accordingly). With a sliding window
      T is the window: each query's span, again counted as a full band.
The factor 6 = 2 (multiply-add) x 3 (forward, and a backward that costs twice the forward).
Activation recomputation is not counted: MFU counts model FLOPs, not hardware FLOPs.
"""

FORMULA = "6*N_matmul + 12*L*H*Q*T (PaLM appendix B; N_matmul excludes the input embedding; T = min(seq, window))"


def flops_per_token(num_parameters: int, model) -> int:
    # The input embedding is a lookup; when it is tied to the output projection, that matrix still
    # does the output matmul, so nothing is subtracted.
    from llama_plugin.model import head_dim as model_head_dim

    lookup_only = 0 if model.share_embeddings_and_output_weights else model.vocab_size * model.hidden_size
    if model.position_embedding == "learned_absolute":  # GPT-3's position table is a lookup too
        lookup_only += model.seq_length * model.hidden_size
    n_matmul = num_parameters - lookup_only
    head_dim = model_head_dim(model)
    span = min(model.seq_length, model.sliding_window or model.seq_length)
    full_layers = model.num_layers // model.full_attention_every if model.full_attention_every else 0
    spans = full_layers * model.seq_length + (model.num_layers - full_layers) * span
    attention = 12 * model.num_attention_heads * head_dim * spans
    return 6 * n_matmul + attention
