"""The main job on a CPU: data -> tokenizer -> TP=2 + sequence-parallel training -> sample.

    python -m llama_plugin.demo [--out runs/demo] [--steps N]

1. data_prep: Botchan (a real English book, fetched from the package registry), a SentencePiece
   BPE tokenizer with LLaMA's settings, a megatron-core indexed dataset;
2. `torchrun --nproc_per_node 2 -m llama_plugin.train tiny_cpu` (TP=2 + sequence parallel);
3. checks that the validation loss fell well below the corpus's unigram entropy (what a model
   that ignores context achieves), then samples from the final checkpoint.
Exits non-zero if the loss did not fall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# "Well below": at least this many nats under the unigram entropy.
MARGIN_NATS = 0.5


def _run(cmd: list[str], env: dict) -> str:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"demo: command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return proc.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_plugin.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--margin", type=float, default=MARGIN_NATS, help="required nats below unigram entropy")
    args = p.parse_args(argv)
    started = time.perf_counter()
    data, run_dir = args.out / "data", args.out / "run"
    env = dict(os.environ, DEMO_DATA=str(data), PYTHONUNBUFFERED="1")
    py = sys.executable

    if not (data / "summary.json").is_file():
        _run([py, "-m", "data_prep", "demo", "--out", str(data)], env)
    corpus = json.loads((data / "summary.json").read_text())

    if run_dir.exists():  # a fresh run each time: the demo shows training, not a resume
        print(f"removing the previous demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    overrides = [f"train.run_dir={run_dir}"]
    if args.steps:
        overrides += [f"train.steps={args.steps}", f"train.eval_interval={max(args.steps // 4, 1)}",
                      f"optimizer.warmup_steps={max(args.steps // 10, 1)}"]
    torchrun = [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llama_plugin.train", "tiny_cpu"]
    out = _run(torchrun + overrides, env)
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])

    sample = _run([py, "-m", "llama_plugin.generate", "--ckpt", summary["checkpoint"], "--tokenizer",
                   str(data / "tokenizer.model"), "--prompt", "I went to the school", "--max-new-tokens", "40",
                   "--temperature", "0.8", "--top-p", "0.9", "--seed", "1", "--tp", "2"], env)
    text = json.loads(sample.strip().splitlines()[-1])["text"]

    from llama_plugin.report.plots import write_plots

    plots = write_plots(run_dir, run_dir / "plots")  # loss, lr, grad norm, throughput over steps
    entropy, val = corpus["unigram_entropy_nats"], summary["val_loss"]
    report = {
        "corpus_tokens": corpus["tokens"],
        "unigram_entropy_nats": round(entropy, 4),
        "first_val_loss": summary["first_val_loss"],
        "final_val_loss": val,
        "final_train_loss": summary["train_loss"],
        "sample": text,
        "run_dir": summary["run_dir"],
        "metrics_jsonl": summary["metrics_jsonl"],
        "wandb_offline_run": summary["wandb_dir"],
        "checkpoint": summary["checkpoint"],
        "loss_plot": str(plots["loss"]),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))
    print(f"demo: loss plot {plots['loss']} (all plots: python -m llama_plugin.report {run_dir})")
    if val is None or val > entropy - args.margin:
        print(f"demo: validation loss {val} is not {args.margin} nats below the unigram entropy {entropy:.3f}",
              file=sys.stderr)
        return 1
    print(f"demo: validation loss {val:.3f} < unigram entropy {entropy:.3f} - {args.margin}: the model learned context")
    return 0


if __name__ == "__main__":
    sys.exit(main())
