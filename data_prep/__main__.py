"""python -m data_prep demo --out DIR [--vocab-size N]
python -m data_prep clean source=<name> input=DIR output=DIR [overrides]   (data_prep/clean.py)

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
    c = sub.add_parser("clean", help="one source's raw files -> cleaned JSONL (datatrove pipeline)")
    c.add_argument("overrides", nargs="*", help="source=<name> input=DIR output=DIR [tasks=N <source>.<field>=...]")
    args = p.parse_args(argv)
    if args.stage == "clean":
        return clean_stage(args.overrides)
    print(json.dumps(demo(args.out, args.vocab_size, args.cache), indent=2))
    return 0


def clean_stage(overrides: list[str]) -> int:
    from data_prep.clean import load_config, run
    from data_prep.sources import InputError
    from recipes import RecipeError

    try:
        report = run(load_config(overrides))
    except (RecipeError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
