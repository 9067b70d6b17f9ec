"""The LLaMA layer as a megatron-core `ModuleSpec`, and its relatives'.

One transformer layer, as in the paper: h = x + attn(rmsnorm(x)); out = h + swiglu_mlp(rmsnorm(h)).
SwiGLU, RoPE, no biases and the RMSNorm epsilon are TransformerConfig settings (model.py); this
module only chooses the modules. The seed systems' layers differ in three choices made here: the
norm (RMSNorm, or LayerNorm with GPT-3's bias or without, as PaLM), PaLM's parallel formulation
(parallel.py), and T5's relative position bias for LaMDA (relative_bias.py). By `model.transformer_impl`:
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

from megatron.core.transformer.identity_op import IdentityOp

from llama_plugin.layers import attention
from llama_plugin.layers.multi_query import SharedKVLinear
from llama_plugin.layers.norm import LayerNorm, RMSNorm
from llama_plugin.layers.parallel import ParallelAttentionMLPLayer

IMPLS = ("local", "te")


def te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401
    except ImportError:
        return False
    return True


def norm_spec(config: TransformerConfig):
    """The pre-norm: LLaMA's RMSNorm, or LayerNorm whose bias follows the linears' (GPT-3 has both)."""
    if config.normalization == "RMSNorm":
        return RMSNorm
    return ModuleSpec(module=LayerNorm, params={"bias": config.add_bias_linear})


def local_layer(norm=RMSNorm, parallel_layers: bool = False, relative_attention: dict | None = None,
                shared_kv: bool = False) -> ModuleSpec:
    # PaLM's parallel layer feeds one norm's output to attention and MLP alike: no pre-MLP norm.
    keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if not parallel_layers:
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return ModuleSpec(
        module=ParallelAttentionMLPLayer if parallel_layers else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=SharedKVLinear if shared_kv else ColumnParallelLinear,
                    # looked up at build time, so a test can swap in megatron's own core
                    core_attention=ModuleSpec(module=attention.SDPAttention, params=relative_attention)
                    if relative_attention else attention.SDPAttention,
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if parallel_layers else norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            # Checkpoints use TE's names (norm weights live inside the fused linears), so a checkpoint
            # written by either module tree loads into the other.
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def llama_layer_spec(transformer_impl: str = "local", config: TransformerConfig | None = None,
                     parallel_layers: bool = False, relative_attention: dict | None = None,
                     shared_kv: bool = False) -> ModuleSpec:
    if transformer_impl == "local":
        return local_layer(RMSNorm if config is None else norm_spec(config), parallel_layers, relative_attention,
                           shared_kv)
    if transformer_impl == "te":
        for field, used in (("parallel_layers", parallel_layers), ("position_embedding", relative_attention),
                            ("kv_projection", shared_kv)):
            if used:
                raise ValueError(f"model.{field}: megatron-core's TransformerEngine spec has no parallel layers, "
                                 "relative position bias or shared key/value projection; use model.transformer_impl=local")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"model.transformer_impl: {transformer_impl!r} is not one of {', '.join(IMPLS)}")


def llama_block_spec(config: TransformerConfig, transformer_impl: str = "local",
                     vp_stage: int | None = None, parallel_layers: bool = False,
                     relative_attention: dict | None = None, shared_kv: bool = False) -> ModuleSpec:
    """The decoder: this pipeline stage's layers and, on the last stage, the final norm."""
    if transformer_impl == "te":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = norm_spec(config)
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[llama_layer_spec(transformer_impl, config, parallel_layers, relative_attention,
                                          shared_kv)] * layers,
            layer_norm=final_norm,
        ),
    )
