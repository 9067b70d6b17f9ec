"""The LLaMA layer as a megatron-core `ModuleSpec`.

One transformer layer, as in the paper: h = x + attn(rmsnorm(x)); out = h + swiglu_mlp(rmsnorm(h)).
SwiGLU, RoPE, no biases and the RMSNorm epsilon are TransformerConfig settings (model.py); this
module only chooses the modules, by `model.transformer_impl`:
  local  (default, CPU and GPU) megatron-core's tensor-parallel linears, our sequence-parallel
         RMSNorm and the SDPA attention core (flash kernels on a GPU). The CPU suite proves it.
  te     megatron-core's own TransformerEngine spec (RMSNorm fused into the following linear, TE's
         fused attention), an explicit opt-in; refused when TransformerEngine does not import.
Nothing switches because a package happens to import.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from llama_plugin.layers.attention import SDPAttention
from llama_plugin.layers.norm import RMSNorm

IMPLS = ("local", "te")


def te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401
    except ImportError:
        return False
    return True


local_llama_layer = ModuleSpec(
    module=TransformerLayer,
    submodules=TransformerLayerSubmodules(
        input_layernorm=RMSNorm,
        self_attention=ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=ColumnParallelLinear,
                core_attention=SDPAttention,
                linear_proj=RowParallelLinear,
            ),
        ),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=RMSNorm,
        mlp=ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        ),
        mlp_bda=get_bias_dropout_add,
        # Checkpoints use TE's names (norm weights live inside the fused linears), so a checkpoint
        # written by either module tree loads into the other.
        sharded_state_dict_keys_map={
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        },
    ),
)


def llama_layer_spec(transformer_impl: str = "local") -> ModuleSpec:
    if transformer_impl == "local":
        return local_llama_layer
    if transformer_impl == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"model.transformer_impl: {transformer_impl!r} is not one of {', '.join(IMPLS)}")


def llama_block_spec(config: TransformerConfig, transformer_impl: str = "local",
                     vp_stage: int | None = None) -> ModuleSpec:
    """The decoder: this pipeline stage's layers and, on the last stage, the final RMSNorm."""
    if transformer_impl == "te":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = RMSNorm
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[llama_layer_spec(transformer_impl)] * layers,
            layer_norm=final_norm,
        ),
    )
