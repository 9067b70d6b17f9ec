"""python -m data_prep demo --out DIR [--vocab-size N]

demo: fetch the demo corpus (Botchan), train the LLaMA-style tokenizer on it, tokenize it into a
megatron-core indexed dataset, and write summary.json (documents, tokens, unigram entropy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_prep.corpus import write_demo_corpus
from data_prep.tokenize_docs import tokenize_jsonl, unigram_entropy
from data_prep.tokenizer import train_tokenizer


def demo(out: Path, vocab_size: int, cache: Path) -> dict:
    jsonl = write_demo_corpus(out / "jsonl", cache)
    model = train_tokenizer([jsonl], out / "tokenizer", vocab_size=vocab_size, character_coverage=1.0)
    stats = tokenize_jsonl(jsonl, model, out / "books_text_document")
    summary = {
        "source": "books (Botchan, Project Gutenberg, from the sentencepiece sdist)",
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "vocab_size": vocab_size,
        "unigram_entropy_nats": unigram_entropy(stats["unigram_counts"]),
        "tokenizer": str(model),
        "dataset_prefix": str(out / "books_text_document"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    d = sub.add_parser("demo", help="corpus + tokenizer + indexed dataset for the CPU demo")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--vocab-size", type=int, default=1024)
    d.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llama_mcore")
    args = p.parse_args(argv)
    print(json.dumps(demo(args.out, args.vocab_size, args.cache), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
