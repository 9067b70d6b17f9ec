"""Sampling rules and the text path of the generate command."""

import json
import subprocess
import sys

import pytest
import torch

from llama_plugin.convert import hf_to_mcore
from llama_plugin.generate import pick_next


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert pick_next(logits, True, 1.0, 1.0, torch.Generator()) == 1


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two tokens only
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    draws = [pick_next(logits, False, 1.0, 0.7, gen) for _ in range(2000)]
    assert set(draws) == {0, 1}
    share = draws.count(0) / len(draws)
    assert abs(share - 0.5 / 0.8) < 0.05  # renormalized within the nucleus


def test_sampling_is_reproducible_by_seed_and_uses_temperature():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    draw = lambda seed, t: [pick_next(logits, False, t, 1.0, torch.Generator().manual_seed(seed)) for _ in range(1)]
    assert draw(3, 1.0) == draw(3, 1.0)
    cold = [pick_next(logits, False, 1e-4, 1.0, torch.Generator().manual_seed(s)) for s in range(20)]
    assert set(cold) == {int(torch.argmax(logits))}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("spm")
    words = "the a model trains on text and numbers 12 345 while every layer adds its input".split()
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=gen)) for _ in range(400)]
    (path / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(path / "corpus.txt"), model_prefix=str(path / "tok"), vocab_size=320, model_type="bpe", hard_vocab_limit=False,
        split_digits=True, byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )
    return path / "tok.model"


def test_generate_from_text_prompt(tokenizer, hf_tiny, tmp_path):
    import sentencepiece as spm

    hf_to_mcore(hf_tiny[0], tmp_path / "mc")
    r = subprocess.run(
        [sys.executable, "-m", "llama_plugin.generate", "--ckpt", str(tmp_path / "mc"), "--prompt", "the model trains",
         "--tokenizer", str(tokenizer), "--max-new-tokens", "8", "--temperature", "0.8", "--top-p", "0.9", "--seed", "5"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert out["prompt_ids"] == [sp.bos_id()] + sp.encode("the model trains")
    assert 1 <= len(out["generated_ids"]) <= 8
    assert all(i < sp.vocab_size() for i in out["generated_ids"])  # never a padding id
    assert out["text"] == sp.decode(out["generated_ids"])


def test_generate_rejects_bad_prompt_ids(hf_tiny, tmp_path):
    hf_to_mcore(hf_tiny[0], tmp_path / "mc")
    r = subprocess.run(
        [sys.executable, "-m", "llama_plugin.generate", "--ckpt", str(tmp_path / "mc"), "--prompt-ids", "1,99999",
         "--max-new-tokens", "2", "--greedy"], capture_output=True, text=True,
    )
    assert r.returncode == 2 and "--prompt-ids" in r.stderr and "99999" in r.stderr
