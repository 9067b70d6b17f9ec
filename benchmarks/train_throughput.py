"""Training throughput of a recipe: step time, tokens/s/GPU, TFLOP/s/GPU and MFU.

    torchrun --nproc_per_node N benchmarks/train_throughput.py <recipe> [overrides] [--warmup 3 --steps 10]
    python benchmarks/train_throughput.py <recipe> [overrides]          (one process)

Builds the recipe's model, layout and optimizer exactly as training does and runs full optimizer
steps on random tokens (no data files needed): `--warmup` steps untimed, then `--steps` timed. Prints
one JSON line with the median and spread of the step times and the figures derived from the median.
MFU uses PaLM's FLOPs per token (llama_plugin/flops.py) over the device's dense bf16 peak (A100
312e12, H100 989e12), or on a CPU this process's measured fp32 matmul rate (stated in the output).
Examples:
    benchmarks/train_throughput.py tiny_cpu                      # CPU, 2 processes via torchrun
    benchmarks/train_throughput.py llama_7b_pretrain model.num_layers=4 parallel=cpu_single \
        parallel.distributed_optimizer=false train.global_batch_size=8   # 7B-shaped layers, 1 GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from llama_plugin import flops, throughput  # noqa: E402
from llama_plugin.distributed import init_distributed, shutdown  # noqa: E402
from llama_plugin.layout import num_microbatches, resolve  # noqa: E402
from llama_plugin.train import build_model_and_optimizer, count_parameters, load_recipe  # noqa: E402
from llama_plugin.train_step import Batch, train_step  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args, recipe_args = parser.parse_known_args()
    cfg = load_recipe(recipe_args)
    cfg, notes = resolve(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    p, t = cfg.parallel, cfg.train
    init_distributed(p.tensor, p.pipeline, seed=t.seed)
    model, chunks, optimizer = build_model_and_optimizer(cfg)
    n_params = count_parameters(model)
    fpt = flops.flops_per_token(n_params, cfg.model)
    peak, peak_source = throughput.peak_flops_per_device(cfg.cluster.peak_flops_per_gpu)

    gen = torch.Generator().manual_seed(0)
    b, s = t.micro_batch_size, cfg.model.seq_length
    data = torch.randint(0, cfg.model.vocab_size, (num_microbatches(cfg), b, s + 1), generator=gen)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batches = [Batch(d[:, :-1].to(device), d[:, 1:].to(device), torch.ones(b, s, device=device)) for d in data]

    times = []
    for i in range(args.warmup + args.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        train_step(chunks, optimizer, batches)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    world = dist.get_world_size()
    speed = throughput.speed_metrics(t.global_batch_size * s, step, world, fpt, peak)
    if dist.get_rank() == 0:
        print(json.dumps({
            "recipe": cfg.name, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "transformer_impl": cfg.model.transformer_impl, "world_size": world,
            "layout": {"tensor": p.tensor, "pipeline": p.pipeline, "data": p.data,
                       "sequence_parallel": p.sequence_parallel, "recompute": p.recompute},
            "precision": t.precision, "num_parameters": n_params, "tokens_per_step": t.global_batch_size * s,
            "step_time_s_median": step, "step_time_s_min": min(times), "step_time_s_max": max(times),
            "timed_steps": len(times), **speed, "peak_flops_per_device": peak, "peak_flops_source": peak_source,
            "notes": notes,
            "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }), flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
