"""Hugging Face LLaMA folders: reading, writing, and the name/layout map to megatron-core.

LLaMA (model_type "llama") and Mistral (model_type "mistral": LLaMA's tensors plus a sliding
window) folders share names and layout; a model recipe with `sliding_window` is written as Mistral.

An HF folder is config.json plus model.safetensors (or shards listed in
model.safetensors.index.json). megatron-core differs from HF in three places:
  - q, k, v are one `linear_qkv` weight, grouped per key/value head: for each query group,
    its query heads' rows, then its key rows, then its value rows;
  - gate and up projections are one `linear_fc1` weight, [gate; up] (silu applies to the first half);
  - the pre-attention / pre-MLP RMSNorm weights belong to the layer (input_layernorm,
    pre_mlp_layernorm) rather than to HF's input_layernorm / post_attention_layernorm.
RoPE needs no permutation: both use the rotate-half convention.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from recipes import validate
from recipes.schema import ModelConfig

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFFolderError(ValueError):
    """An HF folder that is missing files, has unsupported settings or mismatched tensors."""


# ---------------------------------------------------------------- config


def model_config_from_hf(hf_dir) -> tuple:
    """(ModelConfig, raw HF config dict) from an HF folder's config.json."""
    path = Path(hf_dir) / CONFIG
    if not path.is_file():
        raise HFFolderError(f"{path}: missing (an HF LLaMA folder needs config.json)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFFolderError(f"{path}: not valid JSON ({e})") from None

    def need(key):
        if key not in hf:
            raise HFFolderError(f"{path}: field '{key}' missing")
        return hf[key]

    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise HFFolderError(f"{path}: field 'model_type' is {model_type!r}; only 'llama' and 'mistral' are read")
    unsupported = {
        "hidden_act": ("silu", hf.get("hidden_act", "silu")),
        "attention_bias": (False, hf.get("attention_bias", False)),
        "mlp_bias": (False, hf.get("mlp_bias", False)),
    }
    for key, (want, got) in unsupported.items():
        if got != want:
            raise HFFolderError(f"{path}: field '{key}' is {got!r}; LLaMA needs {want!r}")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise HFFolderError(f"{path}: field 'rope_parameters.rope_type' is {rope_type!r}; only 'default' RoPE is supported")
    heads, hidden = need("num_attention_heads"), need("hidden_size")
    if hf.get("head_dim") not in (None, hidden // heads):
        raise HFFolderError(f"{path}: field 'head_dim' is {hf['head_dim']}; expected hidden_size / num_attention_heads = {hidden // heads}")
    groups = hf.get("num_key_value_heads") or heads
    cfg = OmegaConf.create(
        dict(
            name=f"hf:{Path(hf_dir).resolve().name}",
            num_layers=need("num_hidden_layers"),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=None if groups == heads else groups,
            ffn_hidden_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            seq_length=hf.get("max_position_embeddings", 2048),
            norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            init_method_std=hf.get("initializer_range", 0.02),
            share_embeddings_and_output_weights=hf.get("tie_word_embeddings", False),
        )
    )
    return validate(cfg, ModelConfig), hf


def hf_config_from_model(model_cfg, dtype: torch.dtype, base: dict | None = None) -> dict:
    """An HF LlamaConfig (MistralConfig with a sliding window) dict for `model_cfg`; `base` keeps
    fields we do not own (token ids)."""
    from llama_plugin.model import ffn_hidden_size, num_query_groups

    llama = dict(normalization="RMSNorm", activation="swiglu", position_embedding="rope", bias=False,
                 head_dim=None, parallel_layers=False, kv_projection="fused", full_attention_every=None)
    for key, want in llama.items():
        if model_cfg[key] != want:
            raise HFFolderError(f"model.{key}={model_cfg[key]!r}: only LLaMA-shaped models (and Mistral's "
                                f"sliding window) are written as HF folders; this field must be {want!r}")
    hf = dict(base or {})
    if model_cfg.sliding_window is not None:
        hf.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=model_cfg.sliding_window)
    else:
        hf.update(architectures=["LlamaForCausalLM"], model_type="llama")
        hf.pop("sliding_window", None)
    hf.update(
        hidden_size=model_cfg.hidden_size,
        intermediate_size=ffn_hidden_size(model_cfg),
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=num_query_groups(model_cfg),
        head_dim=model_cfg.hidden_size // model_cfg.num_attention_heads,
        vocab_size=model_cfg.vocab_size,
        max_position_embeddings=model_cfg.seq_length,
        rms_norm_eps=model_cfg.norm_epsilon,
        rope_parameters={"rope_theta": model_cfg.rotary_base, "rope_type": "default"},
        initializer_range=model_cfg.init_method_std,
        tie_word_embeddings=model_cfg.share_embeddings_and_output_weights,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        dtype=str(dtype).removeprefix("torch."),
    )
    hf.pop("rope_theta", None)
    hf.pop("rope_scaling", None)
    hf.pop("torch_dtype", None)
    hf.setdefault("bos_token_id", 1)
    hf.setdefault("eos_token_id", 2)
    return hf


# ---------------------------------------------------------------- weights


class HFWeights:
    """Lazy access to an HF folder's tensors by name (one tensor in memory at a time)."""

    def __init__(self, hf_dir):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE).is_file():
            with safe_open(self.dir / SINGLE, "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise HFFolderError(f"{self.dir}: no {SINGLE} or {INDEX} (only safetensors weights are read)")
        for file in set(weight_map.values()):
            if not (self.dir / file).is_file():
                raise HFFolderError(f"{self.dir / file}: listed in {INDEX} but missing")
        self.weight_map = weight_map

    def get(self, name: str, shape: tuple) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise HFFolderError(f"{self.dir}: tensor '{name}' missing")
        with safe_open(self.dir / file, "pt") as f:
            t = f.get_tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise HFFolderError(
                f"{self.dir / file}: tensor '{name}' has shape {tuple(t.shape)}, config.json implies {tuple(shape)}"
            )
        return t


def _dims(model_cfg):
    from llama_plugin.model import ffn_hidden_size, num_query_groups

    d, heads = model_cfg.hidden_size, model_cfg.num_attention_heads
    return d, heads, num_query_groups(model_cfg), d // heads, ffn_hidden_size(model_cfg)


def mcore_global_tensor(name: str, layer: int | None, model_cfg, hf: HFWeights) -> torch.Tensor:
    """The full (unsharded) megatron-core tensor `name` built from HF tensors.

    `name` is a parameter name within a layer (e.g. 'self_attention.linear_qkv.weight') when
    `layer` is given, else a model-level name ('embedding.word_embeddings.weight', ...).
    """
    d, heads, groups, hd, ffn = _dims(model_cfg)
    v = model_cfg.vocab_size
    if layer is None:
        top = {
            "embedding.word_embeddings.weight": ("model.embed_tokens.weight", (v, d)),
            "decoder.final_layernorm.weight": ("model.norm.weight", (d,)),
            "output_layer.weight": ("lm_head.weight", (v, d)),
        }
        return hf.get(*top[name])
    p = f"model.layers.{layer}."
    if name == "self_attention.linear_qkv.weight":
        q = hf.get(p + "self_attn.q_proj.weight", (heads * hd, d)).view(groups, heads // groups * hd, d)
        k = hf.get(p + "self_attn.k_proj.weight", (groups * hd, d)).view(groups, hd, d)
        val = hf.get(p + "self_attn.v_proj.weight", (groups * hd, d)).view(groups, hd, d)
        return torch.cat([q, k, val], dim=1).reshape(-1, d)
    if name == "mlp.linear_fc1.weight":
        gate = hf.get(p + "mlp.gate_proj.weight", (ffn, d))
        up = hf.get(p + "mlp.up_proj.weight", (ffn, d))
        return torch.cat([gate, up], dim=0)
    simple = {
        "input_layernorm.weight": ("input_layernorm.weight", (d,)),
        "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", (d,)),
        # TransformerEngine's names: the norm weights live inside the fused linears.
        "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight", (d,)),
        "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight", (d,)),
        "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", (d, heads * hd)),
        "mlp.linear_fc2.weight": ("mlp.down_proj.weight", (d, ffn)),
    }
    hf_name, shape = simple[name]
    return hf.get(p + hf_name, shape)


def hf_tensors_from_mcore(state: dict, model_cfg) -> dict:
    """HF-named tensors from a full (TP=1, PP=1) megatron-core model state dict."""
    d, heads, groups, hd, ffn = _dims(model_cfg)
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    if not model_cfg.share_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"]
    for i in range(model_cfg.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[m + "self_attention.linear_qkv.weight"].view(groups, (heads // groups + 2) * hd, d)
        q, k, v = torch.split(qkv, [heads // groups * hd, hd, hd], dim=1)
        gate, up = torch.chunk(state[m + "mlp.linear_fc1.weight"], 2, dim=0)
        out.update({
            p + "self_attn.q_proj.weight": q.reshape(-1, d),
            p + "self_attn.k_proj.weight": k.reshape(-1, d),
            p + "self_attn.v_proj.weight": v.reshape(-1, d),
            p + "self_attn.o_proj.weight": state[m + "self_attention.linear_proj.weight"],
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": state[m + "mlp.linear_fc2.weight"],
            p + "input_layernorm.weight": state[m + "input_layernorm.weight"],
            p + "post_attention_layernorm.weight": state[m + "pre_mlp_layernorm.weight"],
        })
    return {k: v.contiguous() for k, v in out.items()}


def write_hf_folder(out_dir, tensors: dict, hf_config: dict, shard_bytes: int = 5 * 2**30) -> None:
    """config.json + safetensors (sharded with an index past `shard_bytes`), like save_pretrained."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / file), metadata=meta)
            weight_map.update({name: file for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out_dir / CONFIG).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
