"""Benchmark contamination: which items of a task share an n-gram of tokens with a training set.

    python -m llama_plugin.eval contamination --data <indexed dataset prefix> [--data ...]
        --tokenizer tokenizer.model --tasks piqa,boolq,... [--ngram 13] [--limit N] [--out F]

An item's text is its question context followed by its right answer, tokenized by SentencePiece
as data_prep tokenizes documents; it is contaminated when any of its n consecutive tokens (13 by
default, as GPT-3's and LLaMA-2's analyses count) occur in a document of the training data. Every
n-gram of the data is hashed (64-bit, a fixed random multiplier per position, so two different
n-grams collide with probability ~2^-64) and kept in one sorted array: 8 bytes per training token.
Prints, per task, the share of contaminated items and their ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llama_plugin.eval.tasks import OLMO_TASKS, EvalError, olmo_items
from llama_plugin.run_files import write_text_atomic

_MULTIPLIERS = np.random.default_rng(13).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every window of n tokens (n <= 4096)."""
    if n > len(_MULTIPLIERS):
        raise EvalError(f"n-grams of {n} tokens: at most {len(_MULTIPLIERS)}")
    if len(tokens) < n:
        return np.empty(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.uint64), n)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        return (windows * _MULTIPLIERS[:n]).sum(axis=1, dtype=np.uint64)


def data_hashes(prefixes: list[str], n: int) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    parts = []
    for prefix in prefixes:
        if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
            raise EvalError(f"--data: {prefix}.bin / .idx not found")
        ds = IndexedDataset(prefix)
        parts += [np.unique(ngram_hashes(np.asarray(ds[i]), n)) for i in range(len(ds))]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)


def contaminated(items, encode, table: np.ndarray, n: int) -> list[str]:
    out = []
    for item in items:
        text = item.contexts[item.gold] + item.continuations[item.gold]
        hashes = ngram_hashes(np.asarray(encode(text), dtype=np.int64), n)
        if len(hashes) and np.isin(hashes, table, assume_unique=False).any():
            out.append(item.id)
    return out


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_plugin.eval contamination", description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", required=True, help="indexed dataset prefix (.bin/.idx); repeatable")
    p.add_argument("--tokenizer", required=True, help="the SentencePiece model the data was tokenized with")
    p.add_argument("--tasks", required=True, help=f"comma-separated: {', '.join(OLMO_TASKS)}")
    p.add_argument("--ngram", type=int, default=13)
    p.add_argument("--limit", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:
        if args.ngram < 1:
            raise EvalError("--ngram: must be >= 1")
        if not Path(args.tokenizer).is_file():
            raise EvalError(f"--tokenizer: {args.tokenizer} not found")
        items = {t: olmo_items(t)[:args.limit] for t in args.tasks.split(",") if t}
        table = data_hashes(args.data, args.ngram)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import sentencepiece as spm

    encode = spm.SentencePieceProcessor(model_file=args.tokenizer).encode
    report = {"ngram": args.ngram, "data": args.data, "data_ngrams": int(len(table)), "tasks": {}}
    for task, task_items in items.items():
        ids = contaminated(task_items, encode, table, args.ngram)
        report["tasks"][task] = {"items": len(task_items), "contaminated": len(ids),
                                 "share": len(ids) / len(task_items), "ids": ids}
    if args.out:
        write_text_atomic(args.out, json.dumps(report, indent=1) + "\n")
    print(json.dumps(report), flush=True)
    return 0
