"""Text generation for the generative benchmarks and the memorization test, from an HF folder (one
process, a KV cache) or a megatron-core checkpoint in its TP x PP layout (llama_plugin.generate's
loop: the whole sequence per step, spawned processes unless under torchrun).

A request is a prompt's token ids and how to continue it: greedy or sampled (temperature, top-p,
its own seed, so a result does not depend on which other requests run), at most `max_new_tokens`,
stopping at EOS or as soon as the decoded text holds a stop string. The prompt is cut from the left
so that prompt + max_new_tokens fits the model's length, as lm-eval does. Returned: the new token
ids; `continuation_text` turns them into text and `finish_text` cuts it at the first stop string.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Request:
    prompt: tuple  # token ids
    max_new_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple = field(default=())  # strings
    stop_at_eos: bool = True


def stopped(text: str, stop: tuple) -> bool:
    return any(s and s in text for s in stop)


def continuation_text(tokenizer, prompt, ids: list[int]) -> str:
    """The text that `ids` add after `prompt`: decoded together with the prompt's last tokens, so that
    SentencePiece's leading-space rule (a first piece loses its space) cannot eat an indent."""
    head = list(prompt[-8:])
    ids = [t for t in ids if t != tokenizer.eos_token_id]
    return tokenizer.decode(head + ids, skip_special_tokens=True)[len(tokenizer.decode(head, skip_special_tokens=True)):]


def finish_text(text: str, stop: tuple) -> str:
    """The text before the earliest stop string."""
    cut = min((text.index(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


def fit_prompt(prompt: tuple, max_new_tokens: int, max_length: int) -> list[int]:
    keep = max(max_length - max_new_tokens, 1)
    return list(prompt[-keep:])


def hf_generate(folder: Path, dtype: torch.dtype, requests: list[Request], tokenizer=None,
                vocab_limit: int | None = None) -> tuple[list[list[int]], dict]:
    """New ids for each request from a transformers causal LM, one request at a time, KV-cached.
    `tokenizer` (for EOS and stop strings) may be None when no request stops early."""
    from transformers import AutoModelForCausalLM

    from llama_plugin.generate import pick_next

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    max_length = model.config.max_position_embeddings
    out, new_tokens, start = [], 0, time.perf_counter()
    with torch.no_grad():
        for r in requests:
            gen = torch.Generator().manual_seed(r.seed)
            inputs, past, ids = torch.tensor([fit_prompt(r.prompt, r.max_new_tokens, max_length)]), None, []
            for _ in range(r.max_new_tokens):
                step = model(input_ids=inputs, past_key_values=past, use_cache=True)
                past = step.past_key_values
                nxt = pick_next(step.logits[0, -1, :vocab_limit].float(), r.greedy, r.temperature, r.top_p, gen)
                ids.append(nxt)
                if tokenizer is not None and ((r.stop_at_eos and nxt == tokenizer.eos_token_id)
                                              or (r.stop and stopped(continuation_text(tokenizer, r.prompt, ids), r.stop))):
                    break
                inputs = torch.tensor([[nxt]])
            out.append(ids)
            new_tokens += len(ids)
    seconds = time.perf_counter() - start
    return out, {"requests": len(requests), "new_tokens": new_tokens, "seconds": seconds,
                 "new_tokens_per_s": new_tokens / seconds if seconds else None}


def _megatron_worker(ckpt, tp, pp, tokenizer_path, requests, out_file) -> None:
    import torch.distributed as dist

    from llama_plugin.finetune.sft_data import load_tokenizer
    from llama_plugin.generate import generate_ids, load_for_inference

    model, model_cfg = load_for_inference(ckpt, tp, pp)
    tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
    vocab_limit = min(len(tok), model_cfg.vocab_size) if tok is not None else None
    out, new_tokens, start = [], 0, time.perf_counter()
    for r in requests:
        # every rank holds the same ids after each step, so every rank takes the same stop decision
        should_stop = ((lambda ids, r=r: stopped(continuation_text(tok, r.prompt, ids), r.stop))
                       if r.stop and tok is not None else None)
        ids = generate_ids(model, fit_prompt(r.prompt, r.max_new_tokens, model_cfg.seq_length), r.max_new_tokens,
                           greedy=r.greedy, temperature=r.temperature, top_p=r.top_p, seed=r.seed,
                           eos_id=tok.eos_token_id if (tok is not None and r.stop_at_eos) else None,
                           max_length=model_cfg.seq_length, vocab_limit=vocab_limit, should_stop=should_stop)
        out.append(ids)
        new_tokens += len(ids)
    seconds = time.perf_counter() - start
    if dist.get_rank() == 0:
        speed = {"requests": len(requests), "new_tokens": new_tokens, "seconds": seconds,
                 "new_tokens_per_s": new_tokens / seconds if seconds else None}
        Path(out_file + ".tmp").write_text(json.dumps({"ids": out, "speed": speed}))
        os.replace(out_file + ".tmp", out_file)
    dist.barrier()


def megatron_generate(ckpt: Path, tp: int, pp: int, tokenizer_path: str | None,
                      requests: list[Request]) -> tuple[list[list[int]], dict]:
    """New ids for each request from a megatron-core checkpoint in a TP x PP layout."""
    from llama_plugin.distributed import run_in_world

    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "generated.json")
        run_in_world(tp * pp, _megatron_worker, str(ckpt), tp, pp, tokenizer_path, requests, out_file)
        got = json.loads(Path(out_file).read_text())
    return got["ids"], got["speed"]
