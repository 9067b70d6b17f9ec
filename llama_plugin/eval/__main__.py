"""python -m llama_plugin.eval: multiple-choice benchmarks scored as the LLaMA paper and lm-eval do.

    python -m llama_plugin.eval --model <HF folder | megatron checkpoint> --tasks piqa,boolq,...
        [--shots 0] [--limit N] [--tokenizer tokenizer.model] [--data items.jsonl]
        [--tp N --pp N] [--dtype fp32|bf16] [--batch-tokens 2048] [--no-bos] [--out results.json]

    python -m llama_plugin.eval contamination --data PREFIX --tokenizer F --tasks ... (contamination.py)
    python -m llama_plugin.eval memorization --model HF_FOLDER --data PREFIX ... (memorization.py)

Prints a Markdown table and one JSON line; --out also writes results.json (with every item's
choices and log-likelihoods) and results.md. Bad input (unknown task or checkpoint, missing data
package, a shot count the data lacks) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama_plugin.eval.backends import hf_scores, megatron_scores, model_kind, load_tokenizer
from llama_plugin.eval.tasks import OLMO_TASKS, EvalError, jsonl_items, olmo_items
from llama_plugin.run_files import write_text_atomic

DTYPES = ("fp32", "bf16")


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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["contamination"]:
        from llama_plugin.eval.contamination import main as contamination

        return contamination(argv[1:])
    if argv[:1] == ["memorization"]:
        from llama_plugin.eval.memorization import main as memorization

        return memorization(argv[1:])
    p = argparse.ArgumentParser(prog="python -m llama_plugin.eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="HF folder or megatron-core checkpoint directory")
    p.add_argument("--tasks", default="", help=f"comma-separated: {', '.join(OLMO_TASKS)}, mmlu")
    p.add_argument("--data", type=Path, help="a JSONL of items instead of --tasks ({context, choices, gold, id})")
    p.add_argument("--shots", type=int, default=0,
                   help="few-shot examples (the data's own sets: 0 or 5; MMLU: 0-5 from its dev split)")
    p.add_argument("--limit", type=int, help="the first N items of each task")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: the HF folder's)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="HF folder: weights and compute dtype")
    p.add_argument("--batch-tokens", type=int, default=2048,
                   help="rows x longest row per forward (on CPU 1-2K is fastest)")
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
        write_text_atomic(args.out, json.dumps(results, indent=1) + "\n")
        write_text_atomic(args.out.with_suffix(".md"), table)
    print(table, end="")
    summary = {t: {m: v["value"] for m, v in r["metrics"].items()} for t, r in results["tasks"].items()}
    print(json.dumps({"tasks": summary, "speed": results["speed"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
