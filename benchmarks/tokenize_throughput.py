"""Tokenization into a megatron-core indexed dataset: the parallel path against the baseline.

Baseline: data_prep.tokenize_docs.tokenize_jsonl (one process, SentencePiece encode one document at
a time, IndexedDatasetBuilder with a torch tensor per document). Measured: data_prep.tokenize_parallel
with 1 and N worker processes (batched encode, numpy writing). Same corpus, same tokenizer; every
output is checked byte-identical to the baseline's. Prints median wall time, docs/s, MB/s, MB/s per
process, CPU seconds (process + workers) and MB per CPU-second, with ratios to the baseline, then a
JSON line. On a shared machine the wall figures depend on the other load; the CPU figures much less.

The SentencePiece limit: the time SentencePiece alone takes to encode every document in one process
(texts already in memory, batched, one thread), divided by the workers: no tokenizer of this file
can beat it. The N-worker run's limit ratio (limit / its wall time) is the share of that ideal it
reaches with the default shard planning; the criterion is >= 0.80.

    python benchmarks/tokenize_throughput.py [--mb 25] [--workers 2] [--repeats 3] [--vocab-size 8000]
    python benchmarks/tokenize_throughput.py --input my.jsonl --tokenizer tokenizer.model

Without --input the corpus is the demo book (Botchan, from the sentencepiece sdist on PyPI), its
paragraphs shuffled (seeded) and repeated to --mb megabytes of JSONL, with a tokenizer trained on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import sentencepiece as spm  # noqa: E402

from data_prep.corpus import fetch_botchan, paragraphs, strip_gutenberg  # noqa: E402
from data_prep.tokenize_docs import tokenize_jsonl  # noqa: E402
from data_prep.tokenize_parallel import SHARD_BYTES, iter_texts, tokenize_parallel  # noqa: E402
from data_prep.tokenizer import train_tokenizer  # noqa: E402


def build_corpus(path: Path, megabytes: float, cache: Path) -> None:
    docs = paragraphs(strip_gutenberg(fetch_botchan(cache)))
    rng = random.Random(0)
    size, target = 0, int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            rng.shuffle(docs)
            for d in docs:
                line = json.dumps({"text": d}) + "\n"
                f.write(line)
                size += len(line.encode())


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool workers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn()."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


def same_bytes(a: Path, b: Path) -> bool:
    return all(Path(str(a) + s).read_bytes() == Path(str(b) + s).read_bytes() for s in (".bin", ".idx"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", type=Path, help="a JSONL file (default: the demo book repeated to --mb)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: trained on the corpus)")
    p.add_argument("--mb", type=float, default=25.0)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-mb", type=float, help="shard size of the parallel path (default: its own planning)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llama_mcore")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="tokenize_bench_"))
    try:
        corpus = args.input or work / "corpus.jsonl"
        if args.input is None:
            build_corpus(corpus, args.mb, args.cache)
        model = args.tokenizer or train_tokenizer([corpus], work / "tokenizer", vocab_size=args.vocab_size,
                                                  character_coverage=1.0, max_sentences=20000)
        megabytes = corpus.stat().st_size / 1e6
        docs = sum(1 for _ in open(corpus, "rb"))
        shard_bytes = int(args.shard_mb * 1e6) if args.shard_mb else SHARD_BYTES
        runs = {
            "baseline tokenize_jsonl, 1 process": (1, lambda out: tokenize_jsonl(corpus, model, out)),
            "tokenize_parallel, 1 worker": (1, lambda out: tokenize_parallel(
                [corpus], model, out, workers=1, shard_bytes=shard_bytes, log=lambda m: None)),
            f"tokenize_parallel, {args.workers} workers": (args.workers, lambda out: tokenize_parallel(
                [corpus], model, out, workers=args.workers, shard_bytes=shard_bytes, log=lambda m: None)),
        }
        times = {name: [] for name in runs}
        cpu = {name: [] for name in runs}
        texts = list(iter_texts(corpus))
        sp = spm.SentencePieceProcessor(model_file=str(model))
        encode_s = []
        baseline_out = work / "baseline"
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
            start = time.perf_counter()
            for i in range(0, len(texts), 256):
                sp.encode(texts[i:i + 256], num_threads=1)
            encode_s.append(time.perf_counter() - start)
            for i, (name, (_, run)) in enumerate(runs.items()):
                out = baseline_out if i == 0 else work / f"run{i}"
                wall, cpu_s = timed(lambda: run(out))
                times[name].append(wall)
                cpu[name].append(cpu_s)
                if i and not same_bytes(out, baseline_out):
                    raise SystemExit(f"{name}: output differs from the baseline's")
        print(f"corpus: {corpus.name} {megabytes:.1f} MB, {docs:,} documents; tokenizer {model.name} "
              f"(vocab {args.vocab_size if args.tokenizer is None else 'given'}); median of {args.repeats}; "
              f"outputs byte-identical to the baseline")
        print(f"{'run':<36} {'wall s':>7} {'docs/s':>8} {'MB/s':>6} {'MB/s/proc':>9} {'x base':>6}"
              f" {'CPU s':>6} {'MB/CPU-s':>8} {'x base':>6}")
        base, base_cpu = statistics.median(times[next(iter(runs))]), statistics.median(cpu[next(iter(runs))])
        result = {"megabytes": megabytes, "documents": docs, "repeats": args.repeats, "runs": {}}
        for name, (procs, _) in runs.items():
            t, c = statistics.median(times[name]), statistics.median(cpu[name])
            print(f"{name:<36} {t:>7.2f} {docs / t:>8,.0f} {megabytes / t:>6.2f} {megabytes / t / procs:>9.2f} "
                  f"{base / t:>6.2f} {c:>6.2f} {megabytes / c:>8.2f} {base_cpu / c:>6.2f}")
            result["runs"][name] = {"median_s": t, "all_s": times[name], "median_cpu_s": c, "all_cpu_s": cpu[name],
                                    "processes": procs, "docs_per_s": docs / t, "mb_per_s": megabytes / t,
                                    "speedup": base / t, "cpu_speedup": base_cpu / c}
        limit = statistics.median(encode_s) / args.workers
        parallel = statistics.median(times[f"tokenize_parallel, {args.workers} workers"])
        result["sentencepiece_encode_s"] = statistics.median(encode_s)
        result["sentencepiece_limit_s"], result["limit_ratio"] = limit, limit / parallel
        print(f"SentencePiece limit: encode {statistics.median(encode_s):.2f} s in one process / {args.workers} workers "
              f"= {limit:.2f} s; the {args.workers}-worker run takes {parallel:.2f} s: {limit / parallel:.0%} of the "
              f"limit (criterion >= 80%: {'met' if limit / parallel >= 0.8 else 'NOT met'})")
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
