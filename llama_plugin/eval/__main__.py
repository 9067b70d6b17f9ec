"""python -m llama_plugin.eval: multiple-choice benchmarks scored as the LLaMA paper and lm-eval do.

    python -m llama_plugin.eval --model <HF folder | megatron checkpoint> --tasks piqa,boolq,...
        [--shots 0] [--limit N] [--tokenizer tokenizer.model] [--data items.jsonl]
        [--tp N --pp N] [--dtype fp32|bf16] [--batch-tokens 8192] [--no-bos] [--out results.json]

Prints a Markdown table and one JSON line; --out also writes results.json (with every item's
choices and log-likelihoods) and results.md. Bad input (unknown task or checkpoint, missing data
package, a shot count the data lacks) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from llama_plugin.eval.tasks import OLMO_TASKS, EvalError, jsonl_items, olmo_items

DTYPES = ("fp32", "bf16")


def model_kind(path: Path) -> str:
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    from llama_plugin.checkpoint import CheckpointError, read_model_record

    try:
        read_model_record(path)
    except CheckpointError as e:
        raise EvalError(f"--model: {path} is neither an HF folder (config.json + *.safetensors) nor a "
                        f"megatron checkpoint ({e})") from None
    return "megatron"


def load_tokenizer(args, kind: str):
    from llama_plugin.finetune.sft_data import load_tokenizer as sp_tokenizer

    if args.tokenizer:
        return sp_tokenizer(args.tokenizer)
    if kind == "hf" and ((args.model / "tokenizer.model").is_file() or (args.model / "tokenizer.json").is_file()):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(args.model))
    raise EvalError(f"--tokenizer: needed ({args.model} holds no tokenizer)")


def encoded_pairs(tokenizer, pairs: list[tuple[str, str]], add_bos: bool):
    from llama_plugin.eval.loglikelihood import encode_pair

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    return [encode_pair(encode, x, c, tokenizer.bos_token_id if add_bos else None) for x, c in pairs]


def hf_scores(args, pairs):
    import torch

    from llama_plugin.eval.loglikelihood import hf_logits_fn, score_requests

    logits, max_length, _ = hf_logits_fn(args.model, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    encoded = encoded_pairs(load_tokenizer(args, "hf"), pairs, not args.no_bos)
    return score_requests(encoded, logits, max_length, args.batch_tokens)


def _megatron_worker(args, pairs, out_file: str) -> None:
    """Every rank: load the checkpoint in the layout, run every request; the last stage's first
    tensor-parallel rank writes the results."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from llama_plugin.eval.loglikelihood import megatron_logits_fn, score_requests
    from llama_plugin.generate import load_for_inference

    model, model_cfg = load_for_inference(args.model, args.tp, args.pp)
    encoded = encoded_pairs(load_tokenizer(args, "megatron"), pairs, not args.no_bos)
    lls, greedy, speed = score_requests(encoded, megatron_logits_fn(model), model_cfg.seq_length, args.batch_tokens)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        tmp = out_file + ".tmp"
        Path(tmp).write_text(json.dumps({"lls": lls, "greedy": greedy, "speed": speed}))
        os.replace(tmp, out_file)
    dist.barrier()


def megatron_scores(args, pairs):
    from llama_plugin.distributed import run_in_world

    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "scores.json")
        run_in_world(args.tp * args.pp, _megatron_worker, args, pairs, out_file)
        got = json.loads(Path(out_file).read_text())
    return got["lls"], got["greedy"], got["speed"]


def markdown(results: dict) -> str:
    lines = ["| task | n | acc | acc_norm | llama_acc | llama_acc rule |", "|---|---|---|---|---|---|"]
    for task, r in results["tasks"].items():
        m = r["metrics"]
        cells = [f"{m[k]['value']:.4f} ± {m[k]['stderr']:.4f}" if m[k]["stderr"] is not None else f"{m[k]['value']:.4f}"
                 for k in ("acc", "acc_norm", "llama_acc")]
        lines.append(f"| {task} | {m['acc']['n']} | " + " | ".join(cells) + f" | {m['llama_acc']['rule']} |")
    return "\n".join(lines) + "\n"


def evaluate(args) -> dict:
    from llama_plugin.eval.scoring import requests, task_metrics

    if args.data:
        by_task = {args.data.stem: jsonl_items(args.data)}
    else:
        by_task = {t: olmo_items(t, args.shots) for t in args.tasks}
    kind = model_kind(args.model)
    if args.limit:
        by_task = {t: items[:args.limit] for t, items in by_task.items()}
    if kind == "hf":
        load_tokenizer(args, kind)  # a missing tokenizer is an error before the model loads
    all_items = [i for items in by_task.values() for i in items]
    pairs = requests(all_items)
    lls, _, speed = (hf_scores if kind == "hf" else megatron_scores)(args, pairs)
    ll = dict(zip(pairs, lls))
    results = {"model": str(args.model), "backend": kind, "shots": args.shots, "bos": not args.no_bos,
               "dtype": args.dtype, "layout": {"tp": args.tp, "pp": args.pp} if kind == "megatron" else None,
               "speed": speed, "tasks": {}}
    for task, items in by_task.items():
        metrics, rows = task_metrics(items, ll)
        results["tasks"][task] = {"metrics": metrics, "items": rows}
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_plugin.eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="HF folder or megatron-core checkpoint directory")
    p.add_argument("--tasks", default="", help=f"comma-separated: {', '.join(OLMO_TASKS)}")
    p.add_argument("--data", type=Path, help="a JSONL of items instead of --tasks ({context, choices, gold, id})")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples (the data's own sets: 0 or 5)")
    p.add_argument("--limit", type=int, help="the first N items of each task")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: the HF folder's)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="HF folder: weights and compute dtype")
    p.add_argument("--batch-tokens", type=int, default=8192, help="rows x longest row per forward")
    p.add_argument("--no-bos", action="store_true", help="no BOS before the context (lm-eval's default)")
    p.add_argument("--out", type=Path, help="write results.json here (and the table next to it as .md)")
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    try:
        if bool(args.tasks) == bool(args.data):
            raise EvalError("--tasks: give --tasks or --data (one of them)")
        for flag in ("limit", "tp", "pp", "batch_tokens"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise EvalError(f"--{flag.replace('_', '-')}: must be >= 1")
        results = evaluate(args)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((args.out, json.dumps(results, indent=1) + "\n"), (args.out.with_suffix(".md"), table)):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    print(table, end="")
    summary = {t: {m: v["value"] for m, v in r["metrics"].items()} for t, r in results["tasks"].items()}
    print(json.dumps({"tasks": summary, "speed": results["speed"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
