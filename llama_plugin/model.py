"""LLaMA as a megatron-core GPTModel: TransformerConfig from a model recipe, the model, its facts.

The parallel layout is not a model property: `build_gpt_model` reads it from megatron-core's
parallel_state (see distributed.py), so the same recipe builds a TP=1 or a TP=2/PP=2 model.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig

from llama_plugin.layers.spec import llama_block_spec
from llama_plugin.layers.z_loss import z_loss


# How megatron-core splits each weight over tensor-parallel ranks (by name suffix): the dimension;
# anything else (norm weights and biases, the row-parallel biases, learned positions) is replicated.
_TP_SPLIT_DIM = {
    "embedding.word_embeddings.weight": 0,      # vocab-parallel embedding
    "output_layer.weight": 0,                   # column-parallel over the vocabulary
    "self_attention.linear_qkv.weight": 0,      # column-parallel over query groups
    "self_attention.linear_qkv.bias": 0,
    "mlp.linear_fc1.weight": 0,                 # column-parallel; gate and up halves split alike
    "mlp.linear_fc1.bias": 0,
    "self_attention.linear_proj.weight": 1,     # row-parallel
    "mlp.linear_fc2.weight": 1,                 # row-parallel
    "relative_attention_bias.weight": 1,        # T5 relative bias table [buckets, heads], by head
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


def head_dim(model) -> int:
    return model.head_dim or model.hidden_size // model.num_attention_heads


CHOICES = {
    "normalization": ("RMSNorm", "LayerNorm"),
    "activation": ("swiglu", "geglu", "gelu"),
    "position_embedding": ("rope", "learned_absolute", "relative"),
    "kv_projection": ("fused", "shared"),
    "init": ("normal", "palm"),
}


def relative_attention(model) -> dict | None:
    """The attention core's T5 relative bias settings (LaMDA), or None."""
    if model.position_embedding != "relative":
        return None
    return {"relative_attention_num_buckets": model.relative_attention_num_buckets,
            "relative_attention_max_distance": model.relative_attention_max_distance}


class FanInNormal:
    """PaLM's kernel initialisation: N(0, std 1/sqrt(fan-in)), fan-in the full matrix's columns.

    megatron calls an init method on the full matrix (CPU initialisation) or on this rank's slice
    (GPU): a row-parallel slice holds 1/tp of the columns, so its fan-in is scaled back up."""

    def __init__(self, columns_per_slice: int = 1):
        self.columns_per_slice = columns_per_slice

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(weight, 0.0, (weight.shape[-1] * self.columns_per_slice) ** -0.5)


def init_methods(model, tensor_parallel: int, cpu_init: bool) -> dict:
    """TransformerConfig's init settings for `model.init` (none for megatron's default)."""
    if model.init == "normal":
        return {}
    return dict(init_method=FanInNormal(), output_layer_init_method=FanInNormal(1 if cpu_init else tensor_parallel),
                embedding_init_method=lambda w: torch.nn.init.normal_(w, 0.0, 1.0))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation: GPT-2/3's "gelu_new", T5's gated-GELU, megatron's fused bias_gelu."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"swiglu": (F.silu, True), "geglu": (gelu_tanh, True), "gelu": (gelu_tanh, False)}


def stage_layers(num_layers: int, pipeline: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Layers on each pipeline stage as megatron-core splits them: the first and last stages may
    hold a given number (`parallel.first_stage_layers` / `last_stage_layers`: megatron's
    num_layers_in_first/last_pipeline_stage), the stages between share the rest evenly. Raises
    ModelConfigError naming the field when the split is impossible."""
    if (first is not None or last is not None) and pipeline == 1:
        raise ModelConfigError("parallel.first_stage_layers: uneven stages need pipeline parallelism (parallel.pipeline > 1)")
    for field, n in (("parallel.first_stage_layers", first), ("parallel.last_stage_layers", last)):
        if n is not None and n < 1:
            raise ModelConfigError(f"{field}: {n} must be at least 1")
    middle = pipeline - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if first is None and last is None:
        if num_layers % pipeline:
            raise ModelConfigError(f"model.num_layers: num_layers={num_layers} is not divisible by "
                                   f"pipeline_model_parallel_size={pipeline} (or set parallel.first_stage_layers / "
                                   "last_stage_layers)")
    elif rest < 0 or (middle == 0 and rest) or (middle and (rest % middle or rest // middle < 1)):
        raise ModelConfigError(f"parallel.first_stage_layers: {num_layers} layers = first {first} + last {last} + "
                               f"{middle} equal middle stages does not split")
    per = rest // middle if middle else 0
    return [first if (i == 0 and first is not None) else last if (i == pipeline - 1 and last is not None) else per
            for i in range(pipeline)]


def check_model_shape(model, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                      first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> None:
    """Raise ModelConfigError naming the first field that does not fit the model or the layout."""
    heads, groups = model.num_attention_heads, num_query_groups(model)
    for field, allowed in CHOICES.items():
        if getattr(model, field) not in allowed:
            raise ModelConfigError(f"model.{field}: {getattr(model, field)!r} is not one of {', '.join(allowed)}")
    rules = [
        (model.head_dim is not None or model.hidden_size % heads == 0, "model.hidden_size",
         f"hidden_size={model.hidden_size} is not divisible by num_attention_heads={heads} (or set model.head_dim)"),
        (heads % groups == 0, "model.num_query_groups",
         f"num_attention_heads={heads} is not divisible by num_query_groups={groups}"),
        (heads % tensor_parallel == 0, "model.num_attention_heads",
         f"num_attention_heads={heads} is not divisible by tensor_model_parallel_size={tensor_parallel}"),
        (model.kv_projection == "fused" or groups == 1, "model.kv_projection",
         f"kv_projection=shared is multi-query attention; num_query_groups is {groups}, not 1"),
        (model.kv_projection == "shared" or groups % tensor_parallel == 0, "model.num_query_groups",
         f"num_query_groups={groups} is not divisible by tensor_model_parallel_size={tensor_parallel}"
         + (" (multi-query: set model.kv_projection=shared)" if groups == 1 else "")),
        (ffn_hidden_size(model) % tensor_parallel == 0, "model.ffn_hidden_size",
         f"ffn_hidden_size={ffn_hidden_size(model)} is not divisible by tensor_model_parallel_size={tensor_parallel}"),
        (model.vocab_size % tensor_parallel == 0, "model.vocab_size",
         f"vocab_size={model.vocab_size} is not divisible by tensor_model_parallel_size={tensor_parallel}"),
        (model.sliding_window is None or model.sliding_window >= 1, "model.sliding_window",
         f"sliding_window={model.sliding_window} must be at least 1 (or null for full attention)"),
        (model.z_loss >= 0, "model.z_loss", f"z_loss={model.z_loss} must be >= 0"),
        (model.full_attention_every is None or (model.full_attention_every >= 1 and model.sliding_window is not None),
         "model.full_attention_every", f"full_attention_every={model.full_attention_every} needs a sliding_window "
         "and must be at least 1"),
    ]
    # megatron-core's TransformerEngine layer has none of these (layers/spec.py refuses them too).
    if model.transformer_impl == "te":
        rules += [(not model.parallel_layers, "model.parallel_layers", "parallel layers need transformer_impl=local"),
                  (model.position_embedding != "relative", "model.position_embedding",
                   "the relative position bias needs transformer_impl=local"),
                  (model.kv_projection == "fused", "model.kv_projection",
                   "the shared key/value projection needs transformer_impl=local")]
    for ok, field, message in rules:
        if not ok:
            raise ModelConfigError(f"{field}: {message}")
    stage_layers(model.num_layers, pipeline_parallel, first_stage_layers, last_stage_layers)


def attention_window(model) -> tuple[int, int] | None:
    """megatron-core's `window_size` (keys before, keys after each query) for the recipe's sliding
    window: a token sees itself and `sliding_window - 1` tokens before it, as Mistral's mask
    (kv > q - window). None when attention is fully causal; a window that covers the whole sequence
    changes nothing and is dropped with a warning."""
    if model.sliding_window is None:
        return None
    if model.sliding_window >= model.seq_length:
        warnings.warn(f"model.sliding_window={model.sliding_window} >= seq_length={model.seq_length}: "
                      "every token already sees the whole context; the window changes nothing", stacklevel=2)
        return None
    return (model.sliding_window - 1, 0)


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
    check_model_shape(model, tensor_parallel, pipeline_parallel, overrides.get("num_layers_in_first_pipeline_stage"),
                      overrides.get("num_layers_in_last_pipeline_stage"))
    on_gpu = torch.cuda.is_available()
    cpu_init = (not on_gpu) if use_cpu_initialization is None else use_cpu_initialization
    activation_func, gated = ACTIVATIONS[model.activation]
    settings = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        # Shared key/value projection: megatron sees one query group per tensor-parallel rank.
        num_query_groups=tensor_parallel if model.kv_projection == "shared" else num_query_groups(model),
        kv_channels=head_dim(model),
        ffn_hidden_size=ffn_hidden_size(model),
        # LLaMA: pre-norm RMSNorm, SwiGLU (silu-gated linear unit), no biases, no dropout.
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=gated,
        activation_func=activation_func,
        add_bias_linear=model.bias,
        add_qkv_bias=model.bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        window_size=attention_window(model),
        window_attn_skip_freq=model.full_attention_every,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=cpu_init,
        perform_initialization=perform_initialization,
        # Fused kernels exist only on GPU: SwiGLU's (megatron's own), and RoPE's (TransformerEngine's).
        # The SDPA attention core needs no softmax fusion. megatron's fused GELUs take only F.gelu,
        # yet compute the tanh approximation; gelu_tanh runs unfused, the same on CPU and GPU.
        bias_activation_fusion=on_gpu and model.activation == "swiglu",
        masked_softmax_fusion=False,
        apply_rope_fusion=on_gpu and transformer_impl == "te" and model.position_embedding == "rope",
        **init_methods(model, tensor_parallel, cpu_init),
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


class LlamaGPTModel(GPTModel):
    """megatron-core's GPTModel, whose per-token training loss may add PaLM's z-loss."""

    def __init__(self, *args, z_loss: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.z_loss = z_loss

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # Before the cross entropy: megatron's vocab-parallel cross entropy works on the logits in place.
        aux = z_loss(logits, self.z_loss).transpose(0, 1) if self.z_loss else None
        loss = super().compute_language_model_loss(labels, logits)  # [b, s]
        return loss if aux is None else loss + aux


def build_gpt_model(model, config: TransformerConfig, vp_stage: int | None = None,
                    transformer_impl: str = "local") -> GPTModel:
    """This rank's part of the model: embedding on the first stage, output layer on the last.

    Conversion, generation and counting always use the local modules: they hold the same tensors
    under the same checkpoint names as TransformerEngine's (layers/spec.py).
    """
    model = LlamaGPTModel(
        config=config,
        z_loss=model.z_loss,
        transformer_layer_spec=llama_block_spec(config, transformer_impl, vp_stage=vp_stage,
                                                parallel_layers=model.parallel_layers,
                                                shared_kv=model.kv_projection == "shared",
                                                relative_attention=relative_attention(model)),
        vocab_size=model.vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        # T5's relative bias lives in the attention core; the model adds no position embedding.
        position_embedding_type="none" if model.position_embedding == "relative" else model.position_embedding,
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
    place_on_device(model, config)
    return model


def place_on_device(model: torch.nn.Module, config: TransformerConfig) -> None:
    """Every weight on this rank's device and in the run's precision, as Megatron-LM's `get_model`
    does (`model.cuda()`, then `Float16Module` casts the whole module): megatron-core builds its own
    layers there, but the plain torch modules it uses (GPT-3's learned position embedding, an
    `nn.Embedding`; T5's relative-bias table) start on the CPU in fp32."""
    target = None if config.use_cpu_initialization else torch.device("cuda", torch.cuda.current_device())
    for param in model.parameters():
        if param.is_meta:
            continue
        dtype = config.params_dtype if param.is_floating_point() else param.dtype
        if param.dtype != dtype or (target is not None and param.device != target):
            param.data = param.data.to(device=target or param.device, dtype=dtype)
