"""LLaMA as a megatron-core GPTModel: TransformerConfig from a model recipe, the model, its facts.

The parallel layout is not a model property: `build_gpt_model` reads it from megatron-core's
parallel_state (see distributed.py), so the same recipe builds a TP=1 or a TP=2/PP=2 model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig

from llama_plugin.layers.spec import llama_block_spec


# How megatron-core splits each weight over tensor-parallel ranks (by name suffix): the dimension;
# anything else (the RMSNorm weights) is replicated.
_TP_SPLIT_DIM = {
    "embedding.word_embeddings.weight": 0,      # vocab-parallel embedding
    "output_layer.weight": 0,                   # column-parallel over the vocabulary
    "self_attention.linear_qkv.weight": 0,      # column-parallel over query groups
    "mlp.linear_fc1.weight": 0,                 # column-parallel; gate and up halves split alike
    "self_attention.linear_proj.weight": 1,     # row-parallel
    "mlp.linear_fc2.weight": 1,                 # row-parallel
}


def tp_split_dim(name: str) -> int | None:
    return next((d for suffix, d in _TP_SPLIT_DIM.items() if name.endswith(suffix)), None)


class ModelConfigError(ValueError):
    """A model shape that cannot be built (in this parallel layout); names the field."""


def ffn_hidden_size(model) -> int:
    """SwiGLU width: the recipe's value, or LLaMA's int(2/3 * 4d) rounded up to `ffn_multiple_of`."""
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    m = model.ffn_multiple_of
    return m * ((int(2 * 4 * model.hidden_size / 3) + m - 1) // m)


def num_query_groups(model) -> int:
    return model.num_query_groups or model.num_attention_heads


def check_model_shape(model, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """Raise ModelConfigError naming the first field that does not fit the model or the layout."""
    heads, groups = model.num_attention_heads, num_query_groups(model)
    rules = [
        (model.hidden_size % heads == 0, "model.hidden_size",
         f"hidden_size={model.hidden_size} is not divisible by num_attention_heads={heads}"),
        (heads % groups == 0, "model.num_query_groups",
         f"num_attention_heads={heads} is not divisible by num_query_groups={groups}"),
        (heads % tensor_parallel == 0, "model.num_attention_heads",
         f"num_attention_heads={heads} is not divisible by tensor_model_parallel_size={tensor_parallel}"),
        (groups % tensor_parallel == 0, "model.num_query_groups",
         f"num_query_groups={groups} is not divisible by tensor_model_parallel_size={tensor_parallel}"),
        (ffn_hidden_size(model) % tensor_parallel == 0, "model.ffn_hidden_size",
         f"ffn_hidden_size={ffn_hidden_size(model)} is not divisible by tensor_model_parallel_size={tensor_parallel}"),
        (model.vocab_size % tensor_parallel == 0, "model.vocab_size",
         f"vocab_size={model.vocab_size} is not divisible by tensor_model_parallel_size={tensor_parallel}"),
        (model.num_layers % pipeline_parallel == 0, "model.num_layers",
         f"num_layers={model.num_layers} is not divisible by pipeline_model_parallel_size={pipeline_parallel}"),
    ]
    for ok, field, message in rules:
        if not ok:
            raise ModelConfigError(f"{field}: {message}")


def transformer_config(
    model,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool | None = None,
    perform_initialization: bool = True,
    transformer_impl: str = "local",
    **overrides,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for a LLaMA model recipe in a given parallel layout.

    `overrides` pass straight to TransformerConfig (recompute, overlap and fusion knobs).
    """
    check_model_shape(model, tensor_parallel, pipeline_parallel)
    on_gpu = torch.cuda.is_available()
    settings = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=num_query_groups(model),
        ffn_hidden_size=ffn_hidden_size(model),
        # LLaMA: pre-norm RMSNorm, SwiGLU (silu-gated linear unit), no biases, no dropout.
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=(not on_gpu) if use_cpu_initialization is None else use_cpu_initialization,
        perform_initialization=perform_initialization,
        # Fused kernels exist only on GPU: SwiGLU's (megatron's own), and RoPE's (TransformerEngine's).
        # The SDPA attention core needs no softmax fusion.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=on_gpu and transformer_impl == "te",
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def build_gpt_model(model, config: TransformerConfig, vp_stage: int | None = None,
                    transformer_impl: str = "local") -> GPTModel:
    """This rank's part of the model: embedding on the first stage, output layer on the last.

    Conversion, generation and counting always use the local modules: they hold the same tensors
    under the same checkpoint names as TransformerEngine's (layers/spec.py).
    """
    model = GPTModel(
        config=config,
        transformer_layer_spec=llama_block_spec(config, transformer_impl, vp_stage=vp_stage),
        vocab_size=model.vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        rotary_percent=1.0,
        vp_stage=vp_stage,
    )
    if not config.perform_initialization:
        # megatron-core marks parameters as tensor-parallel only while initializing them; the grad
        # norm (which counts replicated parameters once) and the optimizer rely on the marks.
        # TransformerEngine's linears mark their own (megatron-core extensions/transformer_engine.py,
        # TELinear / TELayerNormColumnParallelLinear set partition_stride), and marking twice asserts.
        for name, param in model.named_parameters():
            if hasattr(param, "tensor_model_parallel"):
                continue
            dim = tp_split_dim(name)
            set_tensor_model_parallel_attributes(param, dim is not None, dim if dim is not None else -1, 1)
    return model
