"""The layer's modules for megatron-core, and the one place that picks them.

    spec.py           the layer and decoder `ModuleSpec`s: local modules (default, CPU and GPU alike)
                      or megatron-core's TransformerEngine spec (`model.transformer_impl=te`)
    attention.py      the attention core on PyTorch's scaled_dot_product_attention (causal, a
                      sliding window, T5's relative bias)
    norm.py           RMSNorm and LayerNorm (with or without bias) under sequence parallelism
    parallel.py       PaLM's parallel attention + MLP layer
    multi_query.py    PaLM's multi-query projections: the key/value head on every TP rank
    relative_bias.py  T5's relative position bias (LaMDA)
    z_loss.py         PaLM's auxiliary z-loss on the tensor-parallel logits
"""
