"""The LLaMA layer as a megatron-core `ModuleSpec`.

One transformer layer, as in the paper: h = x + attn(rmsnorm(x)); out = h + swiglu_mlp(rmsnorm(h)).
SwiGLU, RoPE, no biases and the RMSNorm epsilon are TransformerConfig settings (model.py); this
module only chooses the modules. The one switch between TransformerEngine and local modules is
`HAVE_TE`: with TE we use megatron-core's own TE spec (RMSNorm fused into the following linear,
fused attention); without it, local modules and our sequence-parallel-aware RMSNorm.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
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

from llama_plugin.norm import RMSNorm

try:
    import transformer_engine  # noqa: F401
    from megatron.core.extensions.transformer_engine import TENorm

    HAVE_TE = True
except ImportError:
    HAVE_TE = False

local_llama_layer = ModuleSpec(
    module=TransformerLayer,
    submodules=TransformerLayerSubmodules(
        input_layernorm=RMSNorm,
        self_attention=ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=ColumnParallelLinear,
                core_attention=DotProductAttention,
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
        # written on CPU loads on a TE cluster and back.
        sharded_state_dict_keys_map={
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        },
    ),
)


def llama_layer_spec(use_te: bool = HAVE_TE) -> ModuleSpec:
    return get_gpt_layer_with_transformer_engine_spec() if use_te else local_llama_layer


def llama_block_spec(
    config: TransformerConfig, use_te: bool = HAVE_TE, vp_stage: int | None = None
) -> ModuleSpec:
    """The decoder: this pipeline stage's layers and, on the last stage, the final RMSNorm."""
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[llama_layer_spec(use_te)] * layers,
            layer_norm=TENorm if use_te else RMSNorm,
        ),
    )
