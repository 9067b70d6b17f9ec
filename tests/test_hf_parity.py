"""Parity with Hugging Face transformers' LlamaForCausalLM, the independent reference.

fp32 logits within 1e-5 (max abs) on several sequences and identical greedy generations, for
multi-head and grouped-query attention, at TP=1 and after loading into TP=2 and PP=2; and an
HF -> mcore -> HF round trip that reproduces every tensor bit for bit.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llama_plugin.convert import hf_to_mcore, mcore_to_hf
from llama_plugin.distributed import spawn_world
from llama_plugin.generate import generate_ids, last_stage_logits, load_for_inference
from tests.conftest import make_hf_llama
from tests.workers import parity_layout

LOGIT_TOL = 1e-5
PROMPT, NEW_TOKENS = [1, 5, 17, 300, 42], 32


def sequences():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (1, 17, 64, 128)]


def hf_reference(model):
    with torch.no_grad():
        logits = [model(torch.tensor([s])).logits[0] for s in sequences()]
        ids = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    return logits, ids


@pytest.fixture(params=["mha", "gqa", "llama2_70b_like", "mistral_sliding_window"])
def converted(request, hf_tiny, hf_tiny_gqa, tmp_path):
    if request.param == "llama2_70b_like":  # LLaMA-2 70B's choices at tiny size: one KV head, RMSNorm eps 1e-5
        hf_dir = tmp_path / "hf_llama2"
        model = make_hf_llama(hf_dir, num_key_value_heads=1, seed=2, rms_norm_eps=1e-5)
    elif request.param == "mistral_sliding_window":
        # MistralForCausalLM, a window of 16 keys: the 64- and 128-token sequences and the 37-token
        # generation reach past it, so a full-causal model would differ.
        hf_dir = tmp_path / "hf_mistral"
        model = make_hf_llama(hf_dir, num_key_value_heads=2, seed=4, rms_norm_eps=1e-5, sliding_window=16)
    else:
        hf_dir, model = hf_tiny if request.param == "mha" else hf_tiny_gqa
    hf_to_mcore(hf_dir, tmp_path / "mcore")
    return hf_dir, model, tmp_path / "mcore"


def test_logits_and_greedy_match_hf(converted):
    _, hf_model, ckpt = converted
    ref_logits, ref_ids = hf_reference(hf_model)
    model, _ = load_for_inference(ckpt)
    with torch.no_grad():
        for seq, ref in zip(sequences(), ref_logits):
            got = last_stage_logits(model, torch.tensor([seq]))[0]
            assert (got - ref).abs().max().item() <= LOGIT_TOL
    assert generate_ids(model, PROMPT, NEW_TOKENS, greedy=True) == ref_ids
    assert len(set(ref_ids)) > 4  # a degenerate (constant) generation would prove little


def test_the_window_changes_the_reference(tmp_path):
    """The Mistral case proves the window only if full causal attention would differ."""
    import transformers

    mistral = make_hf_llama(tmp_path / "m", num_key_value_heads=2, seed=4, rms_norm_eps=1e-5, sliding_window=16)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: getattr(mistral.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads", "rms_norm_eps")}))
    llama.load_state_dict(mistral.state_dict())
    seq = torch.tensor([sequences()[3]])
    with torch.no_grad():
        a, b = mistral(seq).logits[0], llama.eval()(seq).logits[0]
    assert torch.equal(a[:16], b[:16])  # inside the window the two agree
    assert (a[16:] - b[16:]).abs().max() > 1e-2


def test_round_trip_is_bit_exact(converted, tmp_path):
    hf_dir, _, ckpt = converted
    mcore_to_hf(ckpt, tmp_path / "back")
    a, b = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    cfg_a = json.loads((hf_dir / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps", "bos_token_id",
                "eos_token_id", "sliding_window"):
        assert cfg_a.get(key) == cfg_b.get(key), key


def test_bf16_round_trip_is_bit_exact(tmp_path):
    make_hf_llama(tmp_path / "hf", dtype="bfloat16", seed=3)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert {t.dtype for t in a.values()} == {torch.bfloat16}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_loads_the_exported_folder(converted, tmp_path):
    import transformers

    _, hf_model, ckpt = converted
    mcore_to_hf(ckpt, tmp_path / "back")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(reloaded) is type(hf_model)
    seq = torch.tensor([sequences()[2]])
    with torch.no_grad():
        assert torch.equal(reloaded(seq).logits, hf_model(seq).logits)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parity_after_loading_into_tp2_and_pp2(tp, pp, hf_tiny_gqa, tmp_path):
    hf_dir, hf_model = hf_tiny_gqa
    ref_logits, ref_ids = hf_reference(hf_model)
    # Converting with as many ranks as the target layout: each rank writes only its shard.
    hf_to_mcore(hf_dir, tmp_path / "mcore", tp=tp, pp=pp)
    spawn_world(2, parity_layout, str(tmp_path / "out.pt"), str(tmp_path / "mcore"), tp, pp,
                sequences(), PROMPT, NEW_TOKENS)
    got = torch.load(tmp_path / "out.pt")
    for g, r in zip(got["logits"], ref_logits, strict=True):
        assert (g - r).abs().max().item() <= LOGIT_TOL
    assert got["ids"] == ref_ids


@pytest.mark.slow
def test_command_line_convert_and_generate(hf_tiny, tmp_path):
    """The CLIs as a user runs them: convert with TP=2, generate with PP=2, then back to HF."""
    hf_dir, hf_model = hf_tiny
    _, ref_ids = hf_reference(hf_model)
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    r = run("llama_plugin.convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "mc"), "--tp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("llama_plugin.generate", "--ckpt", str(tmp_path / "mc"), "--prompt-ids", ",".join(map(str, PROMPT)),
            "--max-new-tokens", str(NEW_TOKENS), "--greedy", "--pp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["generated_ids"] == ref_ids
    r = run("llama_plugin.convert", "mcore-to-hf", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_file(tmp_path / "back" / "model.safetensors").keys() == load_file(hf_dir / "model.safetensors").keys()
