import os
import warnings

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def make_hf_llama(path, *, num_key_value_heads=4, seed=0, dtype="float32", num_layers=2, vocab=512, hidden=64,
                  intermediate=192, rms_norm_eps=1e-6, sliding_window=None, max_positions=128):
    """A randomly initialised tiny HF LlamaForCausalLM (MistralForCausalLM with a sliding window)
    saved as config.json + model.safetensors."""
    import torch
    import transformers

    torch.manual_seed(seed)
    shape = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=num_key_value_heads, max_position_embeddings=max_positions,
        rms_norm_eps=rms_norm_eps, tie_word_embeddings=False,
    )
    if sliding_window is None:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**shape, sliding_window=sliding_window))
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """(path, model) of a tiny multi-head HF LLaMA; 4 layers so PP=2 has 2 per stage."""
    path = tmp_path_factory.mktemp("hf_tiny")
    return path, make_hf_llama(path, num_layers=4)


@pytest.fixture(scope="session")
def hf_tiny_gqa(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tiny_gqa")
    return path, make_hf_llama(path, num_key_value_heads=2, seed=1, num_layers=4)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo corpus (a real book), tokenizer and indexed dataset, prepared once per session."""
    from pathlib import Path

    from data_prep.__main__ import demo

    out = tmp_path_factory.mktemp("demo_data")
    demo(out, 1024, Path.home() / ".cache" / "llama_mcore")
    return out


def torchrun(args, env_extra=None, nproc=2, timeout=600):
    """Run `python -m torch.distributed.run --nproc_per_node N -m llama_plugin.train ...`."""
    import subprocess
    import sys

    env = dict(os.environ, **(env_extra or {}))
    from llama_plugin.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           "-m", "llama_plugin.train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
