"""python -m llama_plugin.eval: the LLaMA paper's benchmarks, scored as the paper (and lm-eval) do.

    python -m llama_plugin.eval --model <HF folder | megatron checkpoint> --suite llama [--limit N]
        [--max-samples K] [--out results.json]   (the paper's Tables 3-9, published numbers beside; suite.py)
    python -m llama_plugin.eval --model <HF folder | megatron checkpoint> --tasks piqa,boolq,nq,...
        [--shots K] [--limit N] [--tokenizer tokenizer.model] [--data items.jsonl]
        [--tp N --pp N] [--dtype fp32|bf16] [--batch-tokens 2048] [--no-bos] [--out results.json]
        [--samples K --temperature T --top-p P --seed S --max-new-tokens N]   (generative tasks)

Multiple choice (tasks.py): acc, acc_norm, llama_acc. Generative (generation_tasks.py): nq and
triviaqa exact match (greedy, 0-64 shots), gsm8k maj1@k (k = --samples; greedy when 1, else
temperature 0.6 unless given), humaneval pass@1/10/100 up to --samples (temperature 0.1 unless
given; the paper's pass@100 used 0.8), its programs run in a sandbox (execution.py).

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

from llama_plugin.eval.backends import generate_texts, hf_scores, load_tokenizer, megatron_scores, model_kind
from llama_plugin.eval.generation_tasks import DEFAULT_MAX_NEW_TOKENS, GENERATION_TASKS, generation_items
from llama_plugin.eval.tasks import FORMATS, MMLU, OLMO_TASKS, EvalError, jsonl_items, task_items
from llama_plugin.run_files import write_text_atomic

DTYPES = ("fp32", "bf16")
# sampling temperature when --samples > 1 and no --temperature: Minerva's for maj1@k, the LLaMA
# paper's for HumanEval pass@1
SAMPLING_TEMPERATURE = {"gsm8k": 0.6, "math": 0.6, "humaneval": 0.1, "mbpp": 0.1}


def _cell(m: dict) -> str:
    return f"{m['value']:.4f} ± {m['stderr']:.4f}" if m["stderr"] is not None else f"{m['value']:.4f}"


def markdown(results: dict) -> str:
    choice = {t: r for t, r in results["tasks"].items() if "acc" in r["metrics"]}
    generative = {t: r for t, r in results["tasks"].items() if "acc" not in r["metrics"]}
    lines = []
    if choice:
        if results.get("format"):
            lines += [f"Multiple-choice prompts: {results['format']}", ""]
        lines += ["| task | n | acc | acc_norm | llama_acc | llama_acc rule |", "|---|---|---|---|---|---|"]
        for task, r in choice.items():
            m = r["metrics"]
            cells = [_cell(m[k]) for k in ("acc", "acc_norm", "llama_acc")]
            lines.append(f"| {task} | {m['acc']['n']} | " + " | ".join(cells) + f" | {m['llama_acc']['rule']} |")
    if generative:
        lines += [""] if lines else []
        lines += ["| task | n | metric | value | settings |", "|---|---|---|---|---|"]
        for task, r in generative.items():
            for name, m in r["metrics"].items():
                lines.append(f"| {task} | {m['n']} | {name} | {_cell(m)} | {r['settings']} |")
    return "\n".join(lines) + "\n"


def sampling(task: str, args) -> tuple[int, bool, float]:
    """(samples, greedy, temperature) for a generative task."""
    samples = 1 if task in ("nq", "triviaqa") else args.samples
    if samples == 1 and args.temperature is None:
        return 1, True, 1.0
    return samples, False, args.temperature if args.temperature is not None else SAMPLING_TEMPERATURE[task]


def evaluate_generative(args, kind: str, task: str) -> dict:
    from llama_plugin.eval.generative import task_metrics

    items = generation_items(task, args.shots)[:args.limit]
    samples, greedy, temperature = sampling(task, args)
    budget = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
    generations, speed = generate_texts(args, kind, items, samples, greedy, temperature, args.top_p, lambda _: budget)
    metrics, rows = task_metrics(items, generations)
    settings = (f"{'greedy' if greedy else f'T={temperature} top_p={args.top_p}'}, {samples} sample(s), "
                f"<= {budget} new tokens")
    return {"metrics": metrics, "items": rows, "settings": settings, "speed": speed}


def evaluate(args) -> dict:
    from llama_plugin.eval.scoring import requests, task_metrics

    generative = [t for t in args.tasks if t in GENERATION_TASKS]
    if args.data:
        by_task = {args.data.stem: jsonl_items(args.data)}
    else:
        by_task = {t: task_items(t, args.shots or 0, args.format) for t in args.tasks if t not in GENERATION_TASKS}
        for t in generative:
            generation_items(t, args.shots)  # bad shots or missing data: an error before any model loads
    kind = model_kind(args.model)
    if args.limit:
        by_task = {t: items[:args.limit] for t, items in by_task.items()}
    load_tokenizer(args, kind)  # a missing tokenizer is an error before the model loads
    results = {"model": str(args.model), "backend": kind, "format": None if args.data else args.format,
               "shots": args.shots, "bos": not args.no_bos,
               "dtype": args.dtype, "layout": {"tp": args.tp, "pp": args.pp} if kind == "megatron" else None,
               "speed": None, "tasks": {}}
    if by_task:
        all_items = [i for items in by_task.values() for i in items]
        pairs = requests(all_items)
        lls, _, results["speed"] = (hf_scores if kind == "hf" else megatron_scores)(args, pairs)
        ll = dict(zip(pairs, lls))
        for task, items in by_task.items():
            metrics, rows = task_metrics(items, ll)
            results["tasks"][task] = {"metrics": metrics, "items": rows}
    for task in generative:
        results["tasks"][task] = evaluate_generative(args, kind, task)
    return results


def run_llama_suite(args) -> int:
    from llama_plugin.eval.suite import markdown as suite_markdown
    from llama_plugin.eval.suite import plot, run_suite

    for flag in ("limit", "max_samples", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')}: must be >= 1")
    suite = run_suite(args, evaluate)
    table = suite_markdown(suite)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(suite, indent=1) + "\n")
        write_text_atomic(args.out.with_suffix(".md"), table)
        plot(suite, args.out.with_suffix(".png"))
    print(table, end="")
    print(json.dumps({"tables": {t: {c: v["value"] for c, v in cols.items()} for t, cols in suite["tables"].items()}}),
          flush=True)
    return 0


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
    p.add_argument("--tasks", default="",
                   help=f"comma-separated: {', '.join(OLMO_TASKS)}, {MMLU}, {', '.join(GENERATION_TASKS)}")
    p.add_argument("--data", type=Path, help="a JSONL of items instead of --tasks ({context, choices, gold, id})")
    p.add_argument("--suite", help="llama: the paper's Tables 3-9 with its settings, published numbers beside (and a PNG)")
    p.add_argument("--max-samples", type=int, help="--suite: cap the samples of its @k columns (the paper's 256/100/80)")
    p.add_argument("--format", default="lm-eval",
                   help=f"multiple-choice prompts: {' | '.join(FORMATS)} (lm-eval's task definitions, zero-shot; "
                        f"OLMES's request files, 0 or 5 shots)")
    p.add_argument("--shots", type=int,
                   help="few-shot examples (multiple choice: the data's own sets, 0 (default) or 5; MMLU: 0-5 "
                        "from its dev split; nq/triviaqa 0 (default) to 64; gsm8k 8; humaneval 0)")
    p.add_argument("--limit", type=int, help="the first N items of each task")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: the HF folder's)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="HF folder: weights and compute dtype")
    p.add_argument("--batch-tokens", type=int, default=2048,
                   help="rows x longest row per forward (on CPU 1-2K is fastest)")
    p.add_argument("--no-bos", action="store_true", help="no BOS before the context (lm-eval's default)")
    p.add_argument("--out", type=Path, help="write results.json here (and the table next to it as .md)")
    p.add_argument("--samples", type=int, default=1, help="generations per item: maj1@k (gsm8k), pass@k (humaneval)")
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy for one sample)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: nq/triviaqa 32, gsm8k 256, "
                                                      "humaneval 512)")
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    try:
        if args.suite is not None:
            if args.suite != "llama":
                raise EvalError(f"--suite: unknown suite {args.suite!r}; known: llama")
            if args.tasks or args.data:
                raise EvalError("--suite: runs its own tasks; give no --tasks or --data")
            return run_llama_suite(args)
        if bool(args.tasks) == bool(args.data):
            raise EvalError("--tasks: give --tasks or --data (one of them)")
        for flag in ("limit", "tp", "pp", "batch_tokens", "samples", "max_new_tokens", "max_samples"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise EvalError(f"--{flag.replace('_', '-')}: must be >= 1")
        if (args.temperature is not None and args.temperature <= 0) or not 0 < args.top_p <= 1:
            raise EvalError("--temperature: must be > 0 (and --top-p in (0, 1])")
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
