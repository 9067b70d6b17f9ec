"""Loading fine-tuning data: reading a 52K-record Alpaca JSON array and tokenizing every record.

The file is generated: 52,002 records (Alpaca's count) whose instruction, input (on 40% of them, as
in alpaca_data.json) and output are sentences of the demo book (Botchan, from the sentencepiece sdist
on PyPI), about Alpaca's average lengths, written as one indented JSON array like the released file.
Times `sft_data.read_records` (parse + Alpaca template) and `tokenize_records` over every record in
one process, medians of --repeats; then the load as a fine-tuning run's processes do it
(`read_sources` + `SftDataset`, every process all records) under torchrun with --world processes at
once, checked to give the same samples; prints a JSON line.

    python benchmarks/sft_load.py [--records 52002] [--repeats 3] [--world 2] [--tokenizer tokenizer.model]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from data_prep.corpus import fetch_botchan, paragraphs, strip_gutenberg  # noqa: E402


def make_records(n: int, cache: Path) -> list[dict]:
    sentences = [s.strip() + "." for p in paragraphs(strip_gutenberg(fetch_botchan(cache))) for s in p.split(".")
                 if len(s.split()) >= 4]
    rng = random.Random(0)
    out = []
    for _ in range(n):
        record = {"instruction": rng.choice(sentences), "input": "", "output": " ".join(rng.sample(sentences, 3))}
        if rng.random() < 0.4:
            record["input"] = rng.choice(sentences)
        out.append(record)
    return out


def samples_digest(samples: list[dict]) -> str:
    return hashlib.sha1(json.dumps([{k: [int(t) for t in v] for k, v in s.items()} for s in samples]).encode()).hexdigest()


def worker(path: str, tokenizer_model: str) -> None:
    """One process of a fine-tuning run's data loading (under torchrun, gloo)."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from llama_plugin.finetune.sft_data import SftDataset, read_sources

    dist.init_process_group("gloo")
    cfg = OmegaConf.create({"name": "bench", "format": "alpaca", "train_file": path, "mixture": [],
                            "tokenizer_model": tokenizer_model, "max_length": 512, "template": "vicuna_v1.1",
                            "system_prompt": None, "oasst_languages": ["en"], "oasst_top_k": None})
    dist.barrier()
    t0 = time.perf_counter()
    sources = read_sources(cfg)
    t1 = time.perf_counter()
    data = SftDataset(cfg, sources)
    dist.barrier()
    t2 = time.perf_counter()
    if dist.get_rank() == 0:
        print(json.dumps({"read_s": t1 - t0, "load_s": t2 - t0, "digest": samples_digest(data.samples)}), flush=True)
    dist.destroy_process_group()


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=52002)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--world", type=int, default=2, help="processes of the distributed load (0: skip it)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: one trained on the book, 8,000 pieces)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llama_mcore")
    args = p.parse_args(argv)

    from llama_plugin.finetune.sft_data import load_tokenizer, read_records, tokenize_records

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "alpaca_data.json"
        path.write_text(json.dumps(make_records(args.records, args.cache), indent=4, ensure_ascii=False))
        tokenizer_model = args.tokenizer
        if tokenizer_model is None:
            from data_prep.tokenizer import train_tokenizer

            corpus = tmp / "book.jsonl"
            corpus.write_text("".join(json.dumps({"text": d}) + "\n"
                                      for d in paragraphs(strip_gutenberg(fetch_botchan(args.cache)))))
            tokenizer_model = train_tokenizer([corpus], tmp / "tok", vocab_size=8000)
        tokenizer = load_tokenizer(tokenizer_model)
        read_s, tok_s = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            records = read_records(path, "alpaca")
            t1 = time.perf_counter()
            samples = tokenize_records(records, tokenizer, 512)
            t2 = time.perf_counter()
            read_s.append(t1 - t0)
            tok_s.append(t2 - t1)
        tokens = sum(len(s["input_ids"]) for s in samples)
        world_s = []
        for _ in range(args.repeats if args.world else 0):
            from llama_plugin.distributed import free_port

            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.world),
                                "--master_port", str(free_port()), __file__, "--worker", str(path), str(tokenizer_model)],
                               capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            got = json.loads(r.stdout.strip().splitlines()[-1])
            if got["digest"] != samples_digest(samples):
                raise SystemExit("the distributed load gave other samples than the single process")
            world_s.append(got["load_s"])
        out = {"records": len(records), "file_mb": round(path.stat().st_size / 1e6, 2), "tokens": tokens,
               "read_s_median": round(statistics.median(read_s), 3),
               "tokenize_s_median": round(statistics.median(tok_s), 3),
               "load_s_median": round(statistics.median(r + t for r, t in zip(read_s, tok_s)), 3),
               "records_per_s_read": round(len(records) / statistics.median(read_s)),
               "records_per_s_tokenize": round(len(records) / statistics.median(tok_s)), "repeats": args.repeats,
               "world": args.world,
               "world_load_s_median": round(statistics.median(world_s), 3) if world_s else None}
    print(f"{out['records']:,} records, {out['file_mb']} MB: read {out['read_s_median']} s, tokenize "
          f"{out['tokenize_s_median']} s ({tokens:,} tokens), load {out['load_s_median']} s in one process; "
          f"{out['world_load_s_median']} s in each of {args.world} processes (medians of {args.repeats})")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
