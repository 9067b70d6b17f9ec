"""Memorization as PaLM measured it: prompt with the first 50 tokens of a span of the training data,
decode 50 tokens greedily, and count the spans whose continuation is reproduced exactly.

    python -m llama_plugin.eval memorization --model <HF folder | megatron checkpoint> --data PREFIX
        [--data PREFIX ...] [--prefix-tokens 50] [--continuation-tokens 50] [--samples 1000] [--seed 0]
        [--tp N --pp N] [--out F]

--samples spans are drawn from each source (each --data prefix: an indexed dataset from data_prep),
uniformly over its positions where a whole span fits. Each result is broken down by source and by how often
the whole span (prefix + continuation) occurs in all the given data, counted by 64-bit hashes of
every window of that length. The model runs as an HF folder in this process or as a megatron-core
checkpoint in its TP x PP layout (decoding.py); neither stops at EOS: the continuation is always
--continuation-tokens long. --out also lists every span (source, repeats, match).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from llama_plugin.eval.backends import model_kind
from llama_plugin.eval.contamination import ngram_hashes
from llama_plugin.eval.tasks import EvalError
from llama_plugin.run_files import write_text_atomic


def load_sources(prefixes: list[str]) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = {}
    for prefix in prefixes:
        if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
            raise EvalError(f"--data: {prefix}.bin / .idx not found")
        ds = IndexedDataset(prefix)
        out[Path(prefix).name] = [np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))]
    return out


def sample_spans(sources: dict, length: int, samples: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """`samples` spans of `length` tokens from each source: uniform over the source's span starts
    (a document drawn in proportion to its number of starts, then a start in it)."""
    rng = np.random.default_rng(seed)
    out = []
    for name, docs in sources.items():
        starts = [(doc, len(doc) - length + 1) for doc in docs if len(doc) >= length]
        if not starts:
            raise EvalError(f"--data: no document of {name} holds {length} tokens (prefix + continuation)")
        weights = np.array([n for _, n in starts], dtype=np.float64)
        for i in rng.choice(len(starts), size=samples, p=weights / weights.sum()):
            doc, n = starts[i]
            at = int(rng.integers(n))
            out.append((name, doc[at:at + length]))
    return out


def repeat_counts(sources: dict, spans: list[np.ndarray], length: int) -> list[int]:
    counts: dict[int, int] = defaultdict(int)
    wanted = {int(ngram_hashes(s, length)[0]) for s in spans}
    for docs in sources.values():
        for doc in docs:
            for h in ngram_hashes(doc, length):
                if int(h) in wanted:
                    counts[int(h)] += 1
    return [counts[int(ngram_hashes(s, length)[0])] for s in spans]


def greedy_continuations(args, kind: str, prefixes: list[np.ndarray], new_tokens: int) -> list[list[int]]:
    import torch

    from llama_plugin.eval.decoding import Request, hf_generate, megatron_generate

    requests = [Request(tuple(int(t) for t in prefix), new_tokens, stop_at_eos=False) for prefix in prefixes]
    if kind == "hf":
        ids, _ = hf_generate(args.model, torch.float32, requests)
    else:
        ids, _ = megatron_generate(args.model, args.tp, args.pp, None, requests)
    return ids


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_plugin.eval memorization", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="HF folder or megatron-core checkpoint")
    p.add_argument("--data", action="append", required=True, help="indexed dataset prefix (a source); repeatable")
    p.add_argument("--prefix-tokens", type=int, default=50)
    p.add_argument("--continuation-tokens", type=int, default=50)
    p.add_argument("--samples", type=int, default=1000, help="spans per source")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="megatron checkpoint: tensor-parallel ranks")
    p.add_argument("--pp", type=int, default=1, help="megatron checkpoint: pipeline-parallel ranks")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:
        for flag in ("prefix_tokens", "continuation_tokens", "samples", "tp", "pp"):
            if getattr(args, flag) < 1:
                raise EvalError(f"--{flag.replace('_', '-')}: must be >= 1")
        kind = model_kind(args.model)
        length = args.prefix_tokens + args.continuation_tokens
        sources = load_sources(args.data)
        spans = sample_spans(sources, length, args.samples, args.seed)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prefixes = [s[:args.prefix_tokens] for _, s in spans]
    generated = greedy_continuations(args, kind, prefixes, args.continuation_tokens)
    exact = [g == s[args.prefix_tokens:].tolist() for g, (_, s) in zip(generated, spans)]
    repeats = repeat_counts(sources, [s for _, s in spans], length)

    def rate(mask):
        hits = [e for e, m in zip(exact, mask) if m]
        return {"spans": len(hits), "exact_match_rate": sum(hits) / len(hits) if hits else None}

    report = {"prefix_tokens": args.prefix_tokens, "continuation_tokens": args.continuation_tokens,
              "samples": len(spans), "overall": rate([True] * len(spans)),
              "by_source": {name: rate([n == name for n, _ in spans]) for name in sources},
              "by_repeats": {str(r): rate([x == r for x in repeats]) for r in sorted(set(repeats))},
              "spans": [{"source": name, "repeats": r, "exact": e} for (name, _), r, e in zip(spans, repeats, exact)]}
    if args.out:
        write_text_atomic(args.out, json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "spans"}), flush=True)  # the spans: --out
    return 0
