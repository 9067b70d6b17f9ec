"""The seed systems' layers (GPT-3, PaLM, LaMDA, the sliding-window 7B) against independent references,
and in every parallel layout.

References: Hugging Face's GPT2LMHeadModel for GPT-3's layer (LayerNorm with biases, GELU, learned
positions, tied embeddings; GPT-3 is GPT-2's architecture at another size), and PaLM's equations
written here in plain PyTorch. LLaMA-2 and Mistral are checked against LlamaForCausalLM and
MistralForCausalLM in test_hf_parity.py.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llama_plugin.distributed import init_distributed, spawn_world
from llama_plugin.generate import generate_ids, last_stage_logits
from llama_plugin.model import build_gpt_model, transformer_config
from recipes import validate
from recipes.schema import ModelConfig
from tests.workers import global_weights, reshard_checkpoints, train_global_layouts

LOGIT_TOL = 1e-5
TINY = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=512, seq_length=64, norm_epsilon=1e-5)
# GPT-3's layer at tiny size: LayerNorm and linears with biases, 4d GELU MLP, learned positions, tied embeddings.
GPT3_TINY = dict(TINY, name="gpt3_tiny", normalization="LayerNorm", bias=True, activation="gelu", ffn_hidden_size=256,
                 position_embedding="learned_absolute", share_embeddings_and_output_weights=True)
# PaLM's: parallel layers, LayerNorm without bias, SwiGLU, no biases, tied embeddings, head size != d / heads.
# (z-loss 0.1, 1000 x PaLM's, so a tensor-parallel error in it would show at 1e-5.)
# Multi-query: one key/value head, its projection on every tensor-parallel rank.
PALM_TINY = dict(TINY, name="palm_tiny", normalization="LayerNorm", parallel_layers=True, head_dim=32,
                 num_query_groups=1, kv_projection="shared", ffn_hidden_size=128,
                 share_embeddings_and_output_weights=True, z_loss=0.1)
# LaMDA's: gated-GELU, head size != d / heads, T5 relative position bias (8 buckets up to distance 20,
# so the 64-token sequences reach the logarithmic buckets and the last, clipped one).
LAMDA_TINY = dict(TINY, name="lamda_tiny", activation="geglu", head_dim=32, ffn_hidden_size=96,
                  position_embedding="relative", relative_attention_num_buckets=8, relative_attention_max_distance=20)
# A window of 8 keys on layers 1 and 3, full attention on layers 2 and 4 (GPT-3's alternation).
SLIDING_TINY = dict(TINY, name="sliding_tiny", num_query_groups=2, ffn_hidden_size=96, sliding_window=8,
                    full_attention_every=2)


def model_cfg(shape: dict):
    return validate(OmegaConf.create(shape), ModelConfig)


def sequences():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (1, 17, 64)]


# ------------------------------------------------------------------ GPT-3 against GPT2LMHeadModel


def gpt2_into_megatron(hf, cfg) -> dict:
    """GPT2LMHeadModel's tensors under megatron-core names (TP=1): Conv1D weights are [in, out],
    c_attn is [all q; all k; all v] where megatron groups [q_h; k_h; v_h] per head."""
    sd, d, heads = hf.state_dict(), cfg.hidden_size, cfg.num_attention_heads
    hd = d // heads
    out = {"embedding.word_embeddings.weight": sd["transformer.wte.weight"],
           "embedding.position_embeddings.weight": sd["transformer.wpe.weight"],
           "decoder.final_layernorm.weight": sd["transformer.ln_f.weight"],
           "decoder.final_layernorm.bias": sd["transformer.ln_f.bias"]}
    for i in range(cfg.num_layers):
        h, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
        w = sd[h + "attn.c_attn.weight"].t().reshape(3, heads, hd, d).transpose(0, 1).reshape(3 * d, d)
        b = sd[h + "attn.c_attn.bias"].reshape(3, heads, hd).transpose(0, 1).reshape(3 * d)
        out.update({
            m + "input_layernorm.weight": sd[h + "ln_1.weight"], m + "input_layernorm.bias": sd[h + "ln_1.bias"],
            m + "self_attention.linear_qkv.weight": w, m + "self_attention.linear_qkv.bias": b,
            m + "self_attention.linear_proj.weight": sd[h + "attn.c_proj.weight"].t(),
            m + "self_attention.linear_proj.bias": sd[h + "attn.c_proj.bias"],
            m + "pre_mlp_layernorm.weight": sd[h + "ln_2.weight"], m + "pre_mlp_layernorm.bias": sd[h + "ln_2.bias"],
            m + "mlp.linear_fc1.weight": sd[h + "mlp.c_fc.weight"].t(), m + "mlp.linear_fc1.bias": sd[h + "mlp.c_fc.bias"],
            m + "mlp.linear_fc2.weight": sd[h + "mlp.c_proj.weight"].t(), m + "mlp.linear_fc2.bias": sd[h + "mlp.c_proj.bias"],
        })
    return out


def test_gpt3_layer_matches_gpt2_lm_head_model():
    import transformers

    cfg = model_cfg(GPT3_TINY)
    torch.manual_seed(5)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=512, n_positions=64, n_embd=64, n_layer=4, n_head=4, n_inner=256, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        initializer_range=0.15)).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters and biases, so a dropped one shows
        for name, p in hf.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    init_distributed(1, 1)
    net = build_gpt_model(cfg, transformer_config(cfg, perform_initialization=False)).eval()
    tensors = gpt2_into_megatron(hf, cfg)
    names = {n for n, _ in net.named_parameters()}
    assert names == set(tensors), names ^ set(tensors)  # tied: no separate output layer
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(tensors[n])
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in hf.parameters())
    with torch.no_grad():
        for seq in sequences():
            ref = hf(torch.tensor([seq])).logits[0]
            got = last_stage_logits(net, torch.tensor([seq]))[0]
            assert ref.abs().max() > 0.1 and (got - ref).abs().max().item() <= LOGIT_TOL
        prompt = sequences()[1][:5]
        ref_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert generate_ids(net, prompt, 24, greedy=True) == ref_ids and len(set(ref_ids)) > 4


# ------------------------------------------------------------------ PaLM's layer, written from its equations


def palm_reference_logits(w: dict, cfg, tokens: torch.Tensor) -> torch.Tensor:
    """PaLM section 2, in plain PyTorch: y = x + MLP(LN(x)) + Attn(LN(x)) with one scale-only
    LayerNorm, SwiGLU MLP, multi-query causal attention (every query head reads the one key/value
    head) with RoPE (rotate-half), no biases, the output projection = the input embedding."""
    s, d, heads, hd = len(tokens), cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    ln = lambda x, g: F.layer_norm(x, (d,), g, None, cfg.norm_epsilon)
    inv = 1.0 / cfg.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rope = lambda t: t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin
    x = w["embedding.word_embeddings.weight"][tokens]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        h = ln(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attention.linear_qkv.weight"].t()).view(s, heads, hd).transpose(0, 1)
        k, v = (h @ w[p + "self_attention.linear_qkv.kv_weight"].t()).view(s, 2, hd).unbind(1)
        k, v = k.expand(heads, s, hd), v.expand(heads, s, hd)
        scores = rope(q) @ rope(k).transpose(1, 2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(s, heads * hd)
        attn = attn @ w[p + "self_attention.linear_proj.weight"].t()
        gate, up = (h @ w[p + "mlp.linear_fc1.weight"].t()).chunk(2, -1)
        mlp = (F.silu(gate) * up) @ w[p + "mlp.linear_fc2.weight"].t()
        x = x + attn + mlp
    return ln(x, w["decoder.final_layernorm.weight"]) @ w["embedding.word_embeddings.weight"].t()


@pytest.mark.parametrize("case", ["palm", "lamda"])
def test_layer_matches_its_equations(case):
    shape, reference = {"palm": (PALM_TINY, palm_reference_logits), "lamda": (LAMDA_TINY, lamda_reference_logits)}[case]
    cfg = model_cfg(shape)
    w = global_weights(cfg, seed=3)
    if case == "palm":
        assert not any(n.endswith("bias") for n in w) and "output_layer.weight" not in w
        assert "decoder.layers.0.pre_mlp_layernorm.weight" not in w  # one norm per layer
    else:
        assert "embedding.position_embeddings.weight" not in w
    with torch.no_grad():  # non-trivial norm scales and relative biases, so a skipped one shows
        for n, t in w.items():
            if "layernorm" in n or "relative" in n:
                t.add_(torch.randn_like(t) * 0.5)
    init_distributed(1, 1)
    net = build_gpt_model(cfg, transformer_config(cfg, perform_initialization=False)).eval()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(w[n])
        for seq in sequences():
            ref = reference(w, cfg, torch.tensor(seq))
            got = last_stage_logits(net, torch.tensor([seq]))[0]
            assert ref.abs().max() > 0.1 and (got - ref).abs().max().item() <= LOGIT_TOL, (got - ref).abs().max()


def test_z_loss_is_the_squared_log_normalizer():
    """Per-token training loss = cross entropy + z * logsumexp(logits)^2, computed by hand from the
    model's own logits with torch.logsumexp."""
    cfg = model_cfg(PALM_TINY)
    init_distributed(1, 1)
    net = build_gpt_model(cfg, transformer_config(cfg))
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 512, (2, 33), generator=gen)
    positions = torch.arange(32).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        net.embedding.word_embeddings.weight.mul_(20.0)  # log Z far from 0, so the term is not negligible
        loss = net(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
        logits = net(tokens[:, :-1], positions, None).float()  # [b, s, v]
    log_z = torch.logsumexp(logits, dim=-1)
    ce = log_z - logits.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert (0.1 * log_z.square()).mean() > 0.1 * ce.mean()
    assert torch.allclose(loss, ce + 0.1 * log_z.square(), rtol=1e-6, atol=1e-5)


def test_adafactor_steps_equal_transformers_adafactor():
    """Our Adafactor against transformers' with PaLM's settings (beta1 0.9, beta2 = 1 - k^-0.8,
    update clipping 1.0, parameter scaling, eps 1e-30 / 1e-3, decoupled decay 0.1 x scaled lr),
    over 6 steps with a changing lr. transformers factors the second moment of a matrix; PaLM did
    not, and an unfactored matrix update is elementwise, so its reference is the flattened matrix."""
    from transformers.optimization import Adafactor as HFAdafactor

    from llama_plugin.optim.adafactor import Adafactor

    init_distributed(1, 1)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(8, 6, generator=gen) * 0.05, torch.randn(16, generator=gen) + 1.0]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    ref = [torch.nn.Parameter(t.clone().reshape(-1)) for t in start]
    opt = Adafactor(ours, lr=1e-2, weight_decay=0.1)
    hf = HFAdafactor(ref, lr=1e-2, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=0.9,
                     weight_decay=0.1, scale_parameter=True, relative_step=False, warmup_init=False)
    for step in range(6):
        lr = 1e-2 * (1.0 if step < 3 else math.sqrt(3 / (step + 1)))
        for group in opt.param_groups + hf.param_groups:
            group["lr"] = lr
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape, generator=gen) * (10.0 if step == 2 else 0.1)  # step 2 clips the update
            a.grad, b.grad = g.clone(), g.reshape(-1).clone()
        opt.step()
        hf.step()
        for a, b in zip(ours, ref):
            assert (a.detach().reshape(-1) - b.detach()).abs().max().item() <= 1e-6
    for a, s0 in zip(ours, start):
        assert (a.detach() - s0).abs().max() > 1e-4  # it moved, by far more than the tolerance
    # PaLM's lr^2 weight decay, by hand: a zero gradient leaves p (1 - lr^2).
    p = torch.nn.Parameter(torch.ones(4) * 3.0)
    wd = Adafactor([p], lr=0.1, weight_decay=0.1, weight_decay_lr_power=2.0)
    p.grad = torch.zeros(4)
    wd.step()
    assert torch.allclose(p.detach(), torch.full((4,), 3.0 * (1 - 0.1 ** 2)), rtol=0, atol=1e-7)


def test_palm_initialisation():
    """Kernels N(0, std 1/sqrt(fan-in)), embeddings N(0, 1) (PaLM section 2), measured on the model
    megatron builds (std within 5% of the target over >= 8k weights each)."""
    from llama_plugin.model import FanInNormal

    cfg = model_cfg(dict(PALM_TINY, init="palm", hidden_size=128, ffn_hidden_size=256, vocab_size=1024))
    w = global_weights(cfg, seed=4)
    want = {"embedding.word_embeddings.weight": 1.0,
            "decoder.layers.0.self_attention.linear_qkv.weight": 128 ** -0.5,
            "decoder.layers.0.self_attention.linear_qkv.kv_weight": 128 ** -0.5,
            "decoder.layers.0.self_attention.linear_proj.weight": (4 * 32) ** -0.5,
            "decoder.layers.0.mlp.linear_fc1.weight": 128 ** -0.5,
            "decoder.layers.0.mlp.linear_fc2.weight": 256 ** -0.5}
    for name, std in want.items():
        assert w[name].numel() >= 8192 and abs(w[name].std().item() / std - 1) < 0.05, (name, w[name].std(), std)
    # On a GPU megatron initialises a row-parallel weight by its slice: half the columns at TP=2.
    assert abs(FanInNormal(2)(torch.empty(512, 256)).std().item() / 512 ** -0.5 - 1) < 0.05


def test_full_attention_every_second_layer():
    """Layers 2 and 4 attend to the whole context, layers 1 and 3 to a band of 8 keys."""
    from megatron.core.transformer.enums import AttnMaskType

    from llama_plugin.layers.attention import SDPAttention

    init_distributed(1, 1)
    config = transformer_config(model_cfg(SLIDING_TINY))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 1, n, 16, generator=gen) for n in (4, 2, 2))
    full = SDPAttention(transformer_config(model_cfg(dict(SLIDING_TINY, sliding_window=None, full_attention_every=None))),
                        1, AttnMaskType.causal, "self")(q, k, v, None)
    out = {n: SDPAttention(config, n, AttnMaskType.causal, "self")(q, k, v, None) for n in (1, 2, 3, 4)}
    for n in (2, 4):
        assert torch.equal(out[n], full)
    for n in (1, 3):
        assert torch.equal(out[n][:8], full[:8]) and (out[n][8:] - full[8:]).abs().min(dim=-1).values.max() > 1e-3


# ------------------------------------------------------------------ LaMDA's layer: T5 buckets, gated-GELU


def test_relative_buckets_are_t5s():
    from transformers.models.t5.modeling_t5 import T5Attention

    from llama_plugin.layers.relative_bias import RelativePositionBias

    init_distributed(1, 1)
    cfg = model_cfg(dict(LAMDA_TINY, relative_attention_num_buckets=32, relative_attention_max_distance=128))
    bias = RelativePositionBias(transformer_config(cfg), 32, 128)
    with torch.no_grad():
        bias.table.relative_attention_bias.weight.copy_(torch.arange(32.0).unsqueeze(1).expand(32, 4))
    got = bias(300, 300, "cpu")[0].long()  # the bucket ids themselves
    rel = torch.arange(300).unsqueeze(0) - torch.arange(300).unsqueeze(1)
    want = T5Attention._relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert torch.equal(got, want) and set(want.unique().tolist()) == set(range(32))


def lamda_reference_logits(w: dict, cfg, tokens: torch.Tensor) -> torch.Tensor:
    """A serial pre-norm decoder in plain PyTorch: RMS norm, causal attention whose logits get
    T5's relative bias (buckets from HF T5) and no position embedding, gated-GELU MLP (tanh GELU,
    as T5 v1.1), untied output layer."""
    from transformers.models.t5.modeling_t5 import T5Attention

    s, heads, hd = len(tokens), cfg.num_attention_heads, cfg.head_dim
    norm = lambda x, g: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon) * g
    rel = torch.arange(s).unsqueeze(0) - torch.arange(s).unsqueeze(1)  # key - query
    buckets = T5Attention._relative_position_bucket(rel, bidirectional=False, num_buckets=cfg.relative_attention_num_buckets,
                                                    max_distance=cfg.relative_attention_max_distance)
    x = w["embedding.word_embeddings.weight"][tokens]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        qkv = (h @ w[p + "self_attention.linear_qkv.weight"].t()).view(s, heads, 3, hd)  # [q_h; k_h; v_h] per head
        q, k, v = (qkv[:, :, j].transpose(0, 1) for j in range(3))
        table = w[p + "self_attention.core_attention.relative_bias.table.relative_attention_bias.weight"]
        scores = q @ k.transpose(1, 2) / math.sqrt(hd) + table[buckets].permute(2, 0, 1)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(s, heads * hd)
        x = x + attn @ w[p + "self_attention.linear_proj.weight"].t()
        h = norm(x, w[p + "pre_mlp_layernorm.weight"])
        gate, up = (h @ w[p + "mlp.linear_fc1.weight"].t()).chunk(2, -1)
        x = x + (F.gelu(gate, approximate="tanh") * up) @ w[p + "mlp.linear_fc2.weight"].t()
    return norm(x, w["decoder.final_layernorm.weight"]) @ w["output_layer.weight"].t()


# ------------------------------------------------------------------ every new layer type in TP=2+SP and PP=2

LAYOUTS = {"dp2": {}, "tp2_sp": {"tp": 2, "sequence_parallel": True}, "pp2": {"pp": 2}}
CASES = {"gpt3": GPT3_TINY, "palm": PALM_TINY, "lamda": LAMDA_TINY, "sliding_window": SLIDING_TINY}
# PaLM trains with its Adafactor (whose parameter and update RMS span the whole tensor-parallel
# matrix) and lr^2 weight decay, at an lr that moves weights of std 0.02 within 6 steps; the
# others with AdamW.
OPTIMIZERS = {"palm": dict(weight_decay_lr_power=2.0, lr=0.2)}
# Multi-query without sequence parallelism too: its input-gradient sum is then an all-reduce. Adafactor
# over the distributed optimizer's shards (small buckets, so parameters straddle the two ranks' shards).
EXTRA_LAYOUTS = {"palm": {"tp2": {"tp": 2}, "dp2_distributed_optimizer": {"distributed_optimizer": True,
                                                                         "bucket_size": 1000}}}


def test_new_layer_types_train_alike_in_every_layout(tmp_path):
    """fp32, 6 steps: TP=2 with sequence parallelism and PP=2 (1F1B) against TP=1 (DP=2, which
    test_parallel_equivalence ties to one process) within 1e-5, for each layer type."""
    cases = {}
    for name, shape in CASES.items():
        shape = dict(shape, num_layers=2)  # one layer per pipeline stage; the sliding case: one windowed, one full
        torch.save(global_weights(model_cfg(shape), seed=1), tmp_path / f"{name}.pt")
        cases[name] = (shape, str(tmp_path / f"{name}.pt"), OPTIMIZERS.get(name), {**LAYOUTS, **EXTRA_LAYOUTS.get(name, {})})
    spawn_world(2, train_global_layouts, str(tmp_path / "out.json"), cases)
    got = json.loads((tmp_path / "out.json").read_text())
    for case in CASES:
        ref = got[f"{case}/dp2"]
        assert ref["losses"][-1] < ref["losses"][0] - 0.05, (case, ref)  # it trains
        for layout in [name for name in cases[case][3] if name != "dp2"]:
            run = got[f"{case}/{layout}"]
            for key in ("losses", "grad_norms"):
                diff = max(abs(a - b) for a, b in zip(run[key], ref[key], strict=True))
                print(f"{case} {layout} {key}: max |diff| {diff:.2e} (first/last loss {ref['losses'][0]:.4f}/{ref['losses'][-1]:.4f})")
                assert diff <= 1e-5, (case, layout, key, run[key], ref[key])


def test_checkpoints_of_new_layers_load_into_other_layouts(tmp_path):
    """Saved at TP=2 + SP, loaded at TP=1 and at PP=2: every tensor arrives exactly (the relative
    bias table split by head, the replicated key/value projection, biases, learned positions)."""
    cases = {}
    for name in ("gpt3", "palm", "lamda"):
        torch.save(global_weights(model_cfg(CASES[name]), seed=6), tmp_path / f"{name}.pt")
        cases[name] = (CASES[name], str(tmp_path / f"{name}.pt"))
    spawn_world(2, reshard_checkpoints, str(tmp_path / "out.json"), cases, str(tmp_path / "ckpt"))
    got = json.loads((tmp_path / "out.json").read_text())
    assert got == {f"{c}/{layout}": 0.0 for c in cases for layout in ("tp1_pp1", "tp1_pp2")}, got


def test_only_llama_shaped_models_become_hf_folders():
    from llama_plugin.hf import HFFolderError, hf_config_from_model

    for shape, field in ((GPT3_TINY, "model.normalization"), (PALM_TINY, "model.normalization"),
                         (LAMDA_TINY, "model.activation"), (SLIDING_TINY, "model.full_attention_every")):
        with pytest.raises(HFFolderError, match=field):
            hf_config_from_model(model_cfg(shape), torch.float32)
    mistral = model_cfg(dict(SLIDING_TINY, full_attention_every=None, z_loss=1e-4))  # z-loss is training only
    assert hf_config_from_model(mistral, torch.float32)["model_type"] == "mistral"
