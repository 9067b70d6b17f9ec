"""The LLaMA layer's modules for megatron-core, and the one place that picks them.

    spec.py       the layer and decoder `ModuleSpec`s: local modules (default, CPU and GPU alike)
                  or megatron-core's TransformerEngine spec (`model.transformer_impl=te`)
    attention.py  the attention core on PyTorch's scaled_dot_product_attention
    norm.py       RMSNorm that knows about sequence parallelism
"""
