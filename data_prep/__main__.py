"""python -m data_prep <stage> [args]: the data pipeline's stages (see data_prep/README.md).

demo: fetch the demo corpus (Botchan), train the LLaMA-style tokenizer on it, tokenize it into a
megatron-core indexed dataset, and write summary.json (documents, tokens, unigram entropy).
clean source=<name> input=DIR output=DIR [overrides]: one source's raw files -> cleaned JSONL (clean.py).
perplexity-cutoffs: the 33rd/66th perplexity percentiles of a page sample under a KenLM model
(the head/middle/tail cutoffs of clean source=commoncrawl).
train-tokenizer, export-hf-tokenizer, tokenize, mix: one stage each, on your own files.
pipeline data_pipeline output=DIR sources.<source>.input=DIR ...: all of them in order, each skipped
when complete (pipeline.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def demo(out: Path, vocab_size: int, cache: Path) -> dict:
    from data_prep.corpus import write_demo_corpus
    from data_prep.tokenize_docs import tokenize_jsonl, unigram_entropy
    from data_prep.tokenizer import train_tokenizer

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


def mix(recipe: str, overrides: list[str], tokens: float | None) -> tuple[str, list]:
    """The mixture report of a recipe's data sources for `tokens` (default: the recipe's
    train.steps x global_batch_size x seq_length)."""
    from data_prep.mixture import format_report, mixture_report
    from recipes import compose
    from recipes.schema import RecipeConfig

    cfg = compose(recipe, overrides, RecipeConfig)
    budget = tokens if tokens is not None else cfg.train.steps * cfg.train.global_batch_size * cfg.model.seq_length
    rows = mixture_report(cfg.data.sources, budget)
    return format_report(rows, budget), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    d = sub.add_parser("demo", help="corpus + tokenizer + indexed dataset for the CPU demo")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--vocab-size", type=int, default=1024)
    d.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llama_mcore")

    t = sub.add_parser("train-tokenizer", help="SentencePiece BPE with LLaMA's settings on JSONL files")
    t.add_argument("--input", required=True, nargs="+", type=Path, help="JSONL files (.gz/.zst too)")
    t.add_argument("--out", required=True, type=Path, help="output prefix: writes <out>.model and <out>.vocab")
    t.add_argument("--vocab-size", type=int, default=32000, help="LLaMA's 32,000 by default")
    t.add_argument("--character-coverage", type=float, default=0.99995)
    t.add_argument("--max-sentences", type=int, default=0, help="sample this many documents (0: all)")

    e = sub.add_parser("export-hf-tokenizer", help="a Hugging Face tokenizer folder from tokenizer.model")
    e.add_argument("--model", required=True, type=Path)
    e.add_argument("--out", required=True, type=Path)
    e.add_argument("--model-max-length", type=int, default=2048)

    k = sub.add_parser("tokenize", help="JSONL files of one source -> <prefix>.bin/.idx, in parallel, resumable")
    k.add_argument("--input", required=True, nargs="+", type=Path, help="JSONL files (.gz/.zst too) of one source")
    k.add_argument("--tokenizer", required=True, type=Path)
    k.add_argument("--out-prefix", required=True, type=Path, help="e.g. DIR/books_text_document")
    k.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    k.add_argument("--shard-bytes", type=int, default=32 << 20, help="plain input is split into shards of this size")

    m = sub.add_parser("mix", help="blend weights and the epochs a token budget implies per source")
    m.add_argument("recipe", help="a top-level recipe, e.g. llama_65b_pretrain")
    m.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.sources.books.prefix=/d/books")
    m.add_argument("--tokens", type=float, default=None,
                   help="token budget (default: the recipe's steps x global batch x sequence length)")

    q = sub.add_parser("perplexity-cutoffs", help="CCNet's head/middle/tail cutoffs measured on a page sample")
    q.add_argument("--input", required=True, nargs="+", type=Path, help="JSONL files of pages (a 'text' field)")
    q.add_argument("--kenlm-model", required=True, type=Path)
    q.add_argument("--kenlm-tokenizer", type=Path, default=None, help="the SentencePiece model of the KenLM model")
    q.add_argument("--max-pages", type=int, default=10000)

    c = sub.add_parser("clean", help="one source's raw files -> cleaned JSONL (datatrove pipeline)")
    c.add_argument("overrides", nargs="*", help="source=<name> input=DIR output=DIR [tasks=N <source>.<field>=...]")
    pl = sub.add_parser("pipeline", help="raw source folders -> cleaned JSONL -> tokenizer -> .bin/.idx -> report")
    pl.add_argument("recipe", help="a pipeline recipe, e.g. data_pipeline")
    pl.add_argument("overrides", nargs="*", help="output=DIR sources.books.input=DIR tokenizer.vocab_size=N ...")
    args = p.parse_args(argv)
    if args.stage == "clean":
        return clean_stage(args.overrides)
    if args.stage == "pipeline":
        return pipeline_stage(args.recipe, args.overrides)

    try:
        if args.stage == "demo":
            print(json.dumps(demo(args.out, args.vocab_size, args.cache), indent=2))
        elif args.stage == "train-tokenizer":
            from data_prep.tokenizer import train_tokenizer

            print(train_tokenizer(args.input, args.out, args.vocab_size, args.character_coverage, args.max_sentences))
        elif args.stage == "export-hf-tokenizer":
            from data_prep.hf_tokenizer import export_hf_tokenizer

            print(export_hf_tokenizer(args.model, args.out, args.model_max_length))
        elif args.stage == "tokenize":
            from data_prep.tokenize_parallel import tokenize_parallel

            stats = tokenize_parallel(args.input, args.tokenizer, args.out_prefix, args.workers, args.shard_bytes,
                                      log=lambda msg: print(msg, file=sys.stderr))
            print(json.dumps(stats, indent=2))
        elif args.stage == "perplexity-cutoffs":
            print(json.dumps({"perplexity_cutoffs": measure_cutoffs(args)}))
        elif args.stage == "mix":
            report, rows = mix(args.recipe, args.overrides, args.tokens)
            print(report)
    except (ValueError, OSError) as e:  # InputError, MixtureError, RecipeError: messages name the file/field
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def measure_cutoffs(args) -> list[float]:
    from itertools import islice

    from data_prep.sources.perplexity import PerplexityScorer, perplexity_cutoffs
    from data_prep.tokenize_parallel import iter_texts

    scorer = PerplexityScorer(str(args.kenlm_model), str(args.kenlm_tokenizer) if args.kenlm_tokenizer else None)
    pages = (text for path in args.input for text in iter_texts(path))
    return perplexity_cutoffs(scorer, islice(pages, args.max_pages))


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


def pipeline_stage(recipe: str, overrides: list[str]) -> int:
    from data_prep.pipeline import load_pipeline_config, run_pipeline
    from data_prep.sources import InputError
    from recipes import RecipeError

    try:
        report = run_pipeline(load_pipeline_config(recipe, overrides))
    except (RecipeError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({n: {k: r[k] for k in ("documents", "tokens", "share")} for n, r in report["sources"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
