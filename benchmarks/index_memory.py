"""Peak memory of writing a megatron-core .idx for many documents: the streaming writer that
data_prep.tokenize_parallel uses against holding the whole index in memory (what it did before).

Synthetic documents (lengths 1-2,000 tokens, seeded) in shard length files of --docs-per-shard
each, as tokenization leaves them. Each writer runs in a fresh forked process; its peak RSS growth
(ru_maxrss after minus before) is printed with the .idx size, and both .idx files are checked
byte-identical. Then a JSON line.

    python benchmarks/index_memory.py [--documents 10000000] [--docs-per-shard 100000]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from data_prep.tokenize_parallel import DTYPE_CODES, INDEX_HEADER, INDEX_VERSION, write_index  # noqa: E402


def in_memory_index(idx_path: Path, length_files: list[Path], dtype: np.dtype) -> None:
    """The whole index built in memory, then written (the writer before streaming)."""
    lengths = np.concatenate([np.fromfile(p, dtype=np.int32) for p in length_files])
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    with open(idx_path, "wb") as f:
        f.write(INDEX_HEADER + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())


def streaming_index(idx_path: Path, length_files: list[Path], dtype: np.dtype) -> None:
    count = sum(p.stat().st_size // 4 for p in length_files)
    write_index(idx_path, lambda: (np.fromfile(p, dtype=np.int32) for p in length_files), count, dtype)


def _measure(fn, args, queue) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn(*args)
    queue.put({"seconds": time.perf_counter() - start,
               "peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024})


def measured(fn, *args) -> dict:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(fn, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--documents", type=int, default=10_000_000)
    p.add_argument("--docs-per-shard", type=int, default=100_000)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="index_bench_"))
    try:
        rng = np.random.default_rng(0)
        files = []
        for i, start in enumerate(range(0, args.documents, args.docs_per_shard)):
            n = min(args.docs_per_shard, args.documents - start)
            files.append(work / f"{i:06d}.len")
            rng.integers(1, 2001, size=n, dtype=np.int32).tofile(files[-1])
        dtype = np.dtype(np.uint16)
        results = {"documents": args.documents, "shards": len(files),
                   "in_memory": measured(in_memory_index, work / "a.idx", files, dtype),
                   "streaming": measured(streaming_index, work / "b.idx", files, dtype)}
        same = (work / "a.idx").read_bytes() == (work / "b.idx").read_bytes()
        results["idx_mb"] = (work / "b.idx").stat().st_size / 2**20
        results["identical"] = same
        print(f"{args.documents:,} documents in {len(files)} shards; .idx {results['idx_mb']:.0f} MiB; "
              f"outputs {'byte-identical' if same else 'DIFFERENT'}")
        for name in ("in_memory", "streaming"):
            r = results[name]
            print(f"{name:<10} peak RSS growth {r['peak_growth_mb']:8.1f} MiB   {r['seconds']:6.2f} s")
        print(json.dumps(results))
        return 0 if same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
