"""Multiple-choice accuracy from log-likelihoods, three ways, each with n and a standard error.

    acc        argmax_i  log P(c_i | x)                         (lm-eval's acc)
    acc_norm   argmax_i  log P(c_i | x) / chars(c_i)            (lm-eval's acc_norm: per character)
    llama_acc  the LLaMA paper's rule: acc_norm, except for OpenBookQA and BoolQ,
               argmax_i  log P(c_i | x) - log P(c_i | "Answer:")

chars(c) counts the choice without its delimiter space, as lm-eval does; ties go to the first
choice (numpy's argmax). The standard error is lm-eval's: the sample standard deviation of the
per-item 0/1 scores over sqrt(n).
"""

from __future__ import annotations

import math

from llama_plugin.eval.tasks import ANSWER_RULE_TASKS, UNCONDITIONAL_CONTEXT, Item


def uses_answer_rule(task: str) -> bool:
    return task in ANSWER_RULE_TASKS


def requests(items: list[Item]) -> list[tuple[str, str]]:
    """Every (context, continuation) the metrics need, without repeats, in a fixed order."""
    seen, out = set(), []
    for item in items:
        pairs = list(zip(item.contexts, item.continuations))
        if uses_answer_rule(item.task):
            pairs += [(UNCONDITIONAL_CONTEXT, c) for c in item.continuations]
        for pair in pairs:
            if pair not in seen:
                seen.add(pair)
                out.append(pair)
    return out


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def predictions(item: Item, ll: dict) -> dict:
    """The choice each rule picks, and the numbers it compared."""
    cond = [ll[(x, c)] for x, c in zip(item.contexts, item.continuations)]
    norm = [v / n for v, n in zip(cond, item.choice_lengths())]
    out = {"acc": argmax(cond), "acc_norm": argmax(norm), "loglikelihoods": cond}
    if uses_answer_rule(item.task):
        uncond = [ll[(UNCONDITIONAL_CONTEXT, c)] for c in item.continuations]
        out["llama_acc"] = argmax([a - b for a, b in zip(cond, uncond)])
        out["unconditional_loglikelihoods"] = uncond
    else:
        out["llama_acc"] = out["acc_norm"]
    return out


def mean_and_stderr(scores: list[float]) -> dict:
    n = len(scores)
    mean = sum(scores) / n
    stderr = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else None
    return {"value": mean, "stderr": stderr, "n": n}


def task_metrics(items: list[Item], ll: dict) -> tuple[dict, list[dict]]:
    """{metric: {value, stderr, n}} over the items, and one row per item."""
    rows, hits = [], {"acc": [], "acc_norm": [], "llama_acc": []}
    for item in items:
        pred = predictions(item, ll)
        for metric in hits:
            hits[metric].append(float(pred[metric] == item.gold))
        rows.append({"id": item.id, "gold": item.gold, **pred})
    metrics = {m: mean_and_stderr(v) for m, v in hits.items()}
    metrics["llama_acc"]["rule"] = ("log P(c|x) - log P(c|'Answer:')" if uses_answer_rule(items[0].task)
                                    else "log P(c|x) / chars(c)")
    return metrics, rows
