"""Size presets carry the paper's numbers; describe counts parameters from the model megatron builds."""

import json
import subprocess
import sys

import pytest

from llama_plugin.describe import count_parameters, describe
from llama_plugin.model import ModelConfigError
from recipes import RecipeError, compose
from recipes.schema import DescribeConfig

# LLaMA paper (table 2) and LLAMA_FACTS.md: exact untied parameter counts with vocab 32,000.
PAPER = {
    "llama_7b": dict(params=6_738_415_616, dim=4096, heads=32, layers=32, ffn=11008),
    "llama_13b": dict(params=13_015_864_320, dim=5120, heads=40, layers=40, ffn=13824),
    "llama_33b": dict(params=32_528_943_616, dim=6656, heads=52, layers=60, ffn=17920),
    "llama_65b": dict(params=65_285_660_672, dim=8192, heads=64, layers=80, ffn=22016),
}


# LLaMA-2 (LLAMA_FACTS.md, "Other seed systems"): 7B/13B keep LLaMA-1's shapes; 70B uses 8 key/value
# groups and a 28,672 SwiGLU; all have a 4,096-token context and RMSNorm eps 1e-5 (the released params).
LLAMA2 = {
    "llama2_7b": dict(params=6_738_415_616, groups=32, ffn=11008),
    "llama2_13b": dict(params=13_015_864_320, groups=40, ffn=13824),
    "llama2_70b": dict(params=68_976_648_192, groups=8, ffn=28672),
}


@pytest.mark.parametrize("preset", LLAMA2)
def test_llama2_presets_match_the_published_counts(preset):
    facts = describe(model_cfg(f"model={preset}"))
    want = LLAMA2[preset]
    assert (facts["num_parameters"], facts["num_query_groups"], facts["ffn_hidden_size"]) == (
        want["params"], want["groups"], want["ffn"])
    assert (facts["seq_length"], facts["norm_epsilon"], facts["vocab_size"]) == (4096, 1e-5, 32000)
    assert facts["share_embeddings_and_output_weights"] is False


def test_sliding_window_7b_matches_the_published_count():
    facts = describe(model_cfg("model=mistral_7b"))
    assert facts["num_parameters"] == 7_241_732_096
    assert (facts["num_query_groups"], facts["ffn_hidden_size"], facts["seq_length"], facts["sliding_window"]) == (
        8, 14336, 8192, 4096)
    # attention FLOPs count the 4,096 keys each token sees, not the 8,192-token context
    full = describe(model_cfg("model=mistral_7b", "model.sliding_window=null"))
    assert full["flops_per_token"] - facts["flops_per_token"] == 12 * 32 * 32 * 128 * 4096


# The other seed systems (LLAMA_FACTS.md, "Other seed systems"): our exact count, and the published
# rounded figure it must give. PaLM's table counts the matmul and embedding weights: without its
# 2 x 10^5-10^6 LayerNorm scales each count rounds to the figure (with them, 540B would read 540.36B).
# LaMDA's 137B are non-embedding parameters (its paper); GPT-3's 175B include the tied embedding.
SEED_SYSTEMS = {
    "gpt3_175b": dict(params=174_604_259_328, published="175", digits=0, exclude="none"),
    "palm_8b": dict(params=8_632_012_800, published="8.63", digits=2, exclude="norms"),
    "palm_62b": dict(params=62_495_662_080, published="62.50", digits=2, exclude="norms"),
    "palm_540b": dict(params=540_356_474_880, published="540.35", digits=2, exclude="norms"),
    "lamda_137b": dict(params=137_964_560_384, published="137", digits=0, exclude="embeddings"),
}


@pytest.mark.parametrize("preset", SEED_SYSTEMS)
def test_seed_system_presets_match_the_published_counts(preset):
    cfg = model_cfg(f"model={preset}")
    facts, want = describe(cfg), SEED_SYSTEMS[preset]
    n = facts["num_parameters"]
    assert n == want["params"]
    d, layers = cfg.hidden_size, cfg.num_layers
    norms = (layers * (1 if cfg.parallel_layers else 2) + 1) * d * (2 if cfg.bias else 1)
    embeddings = cfg.vocab_size * d * (1 if cfg.share_embeddings_and_output_weights else 2)
    counted = n - {"none": 0, "norms": norms, "embeddings": embeddings}[want["exclude"]]
    assert f"{counted / 1e9:.{want['digits']}f}" == want["published"]


def test_a_window_covering_the_sequence_is_a_warned_no_op():
    from llama_plugin.model import transformer_config

    cfg = model_cfg("model=tiny", "model.sliding_window=128")
    with pytest.warns(UserWarning, match="sliding_window=128 >= seq_length=128"):
        assert transformer_config(cfg).window_size is None
    assert transformer_config(model_cfg("model=tiny", "model.sliding_window=16")).window_size == (15, 0)
    with pytest.raises(ModelConfigError, match="model.sliding_window"):
        transformer_config(model_cfg("model=tiny", "model.sliding_window=0"))


def model_cfg(*overrides):
    return compose("describe", list(overrides), DescribeConfig).model


@pytest.mark.parametrize("preset", PAPER)
def test_preset_matches_paper(preset):
    facts = describe(model_cfg(f"model={preset}"))
    want = PAPER[preset]
    assert facts["num_parameters"] == want["params"]
    assert (facts["hidden_size"], facts["num_attention_heads"], facts["num_layers"], facts["ffn_hidden_size"]) == (
        want["dim"], want["heads"], want["layers"], want["ffn"])
    assert (facts["vocab_size"], facts["seq_length"], facts["norm_epsilon"], facts["rotary_base"]) == (32000, 2048, 1e-6, 10000)
    assert facts["num_query_groups"] == facts["num_attention_heads"]  # LLaMA-1: multi-head attention
    assert facts["share_embeddings_and_output_weights"] is False


def test_flops_per_token_from_matmul_shapes():
    """The 6N + attention formula against a count of every matmul in one layer (fwd x 3 for training)."""
    m = model_cfg("model=llama_7b")
    d, ffn, layers, v, t = 4096, 11008, 32, 32000, 2048
    forward_per_layer = 2 * (d * 3 * d + d * d + 3 * d * ffn) + 2 * 2 * t * d  # qkv, proj, swiglu, QK^T + AV
    forward = layers * forward_per_layer + 2 * v * d  # + output projection
    norm_weights = 2 * layers * d + d  # parameters without matmuls, counted in N by the formula
    assert describe(m)["flops_per_token"] == 3 * forward + 6 * norm_weights


def test_grouped_query_attention_shrinks_kv_projections():
    full = count_parameters(model_cfg("model=llama_65b"))
    gqa = count_parameters(model_cfg("model=llama_65b", "model.num_query_groups=8"))
    d, head_dim, layers = 8192, 128, 80
    assert full - gqa == layers * 2 * d * (64 - 8) * head_dim


def test_tiny_preset_is_small():
    facts = describe(model_cfg("model=tiny"))
    assert facts["num_parameters"] < 2_000_000


def test_describe_command_line():
    r = subprocess.run([sys.executable, "-m", "llama_plugin.describe", "model=llama_13b", "model.seq_length=4096"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    facts = json.loads(r.stdout)
    assert facts["num_parameters"] == PAPER["llama_13b"]["params"] and facts["seq_length"] == 4096
    assert "flops_formula" in facts


@pytest.mark.parametrize("overrides,field", [
    (["model=llama_99b"], "model/llama_99b"),
    (["+model.foo=1"], "model.foo"),
    (["model.num_layers=abc"], "model.num_layers"),
    (["model.ffn_multiple_of=1.5"], "model.ffn_multiple_of"),
])
def test_bad_recipe_names_the_field(overrides, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        model_cfg(*overrides)


def test_describe_rejects_shape_errors():
    r = subprocess.run([sys.executable, "-m", "llama_plugin.describe", "model=llama_7b", "model.hidden_size=4100"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "model.hidden_size" in r.stderr and "num_attention_heads=32" in r.stderr
