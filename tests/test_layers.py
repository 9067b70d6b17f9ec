"""The layer's own modules against independent references: the SDPA attention core against
megatron-core's DotProductAttention (fp32, 1e-6), its saved-for-backward memory O(s), and RMSNorm
against Hugging Face's LlamaRMSNorm, bitwise, in fp32 and bf16."""

import json

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from omegaconf import OmegaConf

from llama_plugin.distributed import init_distributed, spawn_world
from llama_plugin.layers.attention import SDPAttention
from llama_plugin.layers.norm import RMSNorm
from llama_plugin.model import transformer_config
from tests.workers import attention_core_parity
from recipes import validate
from recipes.schema import ModelConfig

TOL = 1e-6


def _config(heads=4, groups=4, head_dim=32, dtype=torch.float32):
    init_distributed(1, 1)
    model = validate(OmegaConf.create(dict(name="t", num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                                  num_query_groups=groups, ffn_hidden_size=64, ffn_multiple_of=256, vocab_size=64,
                                  seq_length=512, norm_epsilon=1e-6, rotary_base=10000.0, init_method_std=0.02,
                                  share_embeddings_and_output_weights=False)), ModelConfig)
    return transformer_config(model, params_dtype=dtype)


def _qkv(s, b, heads, groups, d, seed=0, std=0.5):
    """Queries, keys, values [s, b, n, d]. std 0.5 gives attention logits of std ~1.4 (already
    sharper than a trained LLaMA's early layers); outputs are O(1), so 1e-6 is ~10 fp32 ulps."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, b, n, d, generator=gen) * std).requires_grad_() for n in (heads, groups, groups)]


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 1)], ids=["multi_head", "grouped_query", "multi_query"])
def test_sdpa_core_equals_megatron_dot_product_attention(heads, groups):
    config = _config(heads, groups)
    sdpa = SDPAttention(config, 1, AttnMaskType.causal, "self")
    ref = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(64, 3, heads, groups, 32)
    got, want = sdpa(q, k, v, None), ref(q, k, v, None)
    assert got.shape == want.shape == (64, 3, heads * 32)
    print(f"{heads} heads, {groups} groups: max |sdpa - megatron| = {(got - want).abs().max().item():.3g}"
          f" (max |out| {want.abs().max().item():.3g})")
    assert (got - want).abs().max().item() <= TOL
    grad_out = torch.randn_like(want)
    g_got = torch.autograd.grad(got, (q, k, v), grad_out)
    g_want = torch.autograd.grad(want, (q, k, v), grad_out)
    for a, b in zip(g_got, g_want):
        # Gradients reach |g| ~ 3 (key/value grads sum over a group's heads): 1e-6 relative to the largest.
        assert (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item())
    # The causal mask is really applied: changing the last key/value moves only the last query.
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[-1] += 1.0
    v2[-1] += 1.0
    moved = (sdpa(q, k2, v2, None) - got).abs().amax(dim=(1, 2))
    assert moved[:-1].max().item() == 0.0 and moved[-1].item() > 0


def test_sdpa_core_saved_memory_grows_linearly():
    """What autograd keeps for the core's backward, measured at s=256 and s=512 (b=1, 4 heads)."""
    config = _config(4, 2)
    cores = {"sdpa": SDPAttention(config, 1, AttnMaskType.causal, "self"),
             "megatron": DotProductAttention(config, 1, AttnMaskType.causal, "self")}

    def saved_bytes(core, s):
        q, k, v = _qkv(s, 1, 4, 2, 32)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            core(q, k, v, None)
        return total

    sizes = {name: (saved_bytes(c, 256), saved_bytes(c, 512)) for name, c in cores.items()}
    print("saved bytes for backward (s=256, s=512):", sizes)
    small, large = sizes["sdpa"]
    assert large / small == pytest.approx(2.0, rel=0.05), sizes
    # The reference keeps the [b, heads, s, s] probabilities: the measurement can tell the two apart.
    ref_small, ref_large = sizes["megatron"]
    assert ref_large / ref_small > 3.5 and ref_large > 4 * large, sizes


@pytest.mark.parametrize("hf_fixture", ["hf_tiny", "hf_tiny_gqa"])
def test_sdpa_core_equals_megatron_core_under_tp2_sequence_parallel(hf_fixture, request, tmp_path):
    hf_dir = request.getfixturevalue(hf_fixture)[0]
    out = tmp_path / "parity.json"
    spawn_world(2, attention_core_parity, str(out), str(hf_dir), 2, True)
    got = json.loads(out.read_text())
    print(hf_fixture, got)
    assert got["cores"] == [["SDPAttention"] * 4, ["DotProductAttention"] * 4]
    assert got["logits_max_abs"] > 0.1  # real logits, not zeros
    assert got["logits_max_abs_diff"] <= TOL, got
    # Weight grads of a summed loss reach tens: 1e-6 relative to the largest.
    assert got["grad_max_abs_diff"] <= TOL * got["grad_max_abs"], got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_bitwise_equal_to_hugging_face(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    config = _config(dtype=dtype)
    ours = RMSNorm(config, 128, eps=1e-6)
    theirs = LlamaRMSNorm(128, eps=1e-6).to(dtype)
    gen = torch.Generator().manual_seed(3)
    weight = torch.rand(128, generator=gen).to(dtype) + 0.5
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    x = (torch.randn(16, 2, 128, generator=gen) * 3).to(dtype)
    got, want = ours(x), theirs(x)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
