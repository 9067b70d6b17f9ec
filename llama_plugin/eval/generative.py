"""Scores of generated answers, as the LLaMA paper reports them.

    qa_answer     NaturalQuestions / TriviaQA: a generation up to its first line break, comma or
                  sentence-ending period (the LLaMA paper's answer extraction)
    exact_match   NaturalQuestions / TriviaQA: the answer normalized as SQuAD's evaluation does
                  (lower case, no punctuation, no articles a/an/the, single spaces) equal to any
                  normalized reference
    gsm8k_answer  the last number of a completion (thousands separators dropped); the reference is
                  what follows "####" in a GSM8K solution
    maj_at_k      maj1@k (Minerva): the most common of k extracted answers (ties: the one seen first)
                  is right
    math_answer   MATH: the final answer of a Minerva-format solution ("Final Answer: The final answer
                  is X. I hope it is correct."; else the last \\boxed{}), normalized as Minerva's
                  appendix D.1 lists (normalize_final_answer); the reference normalized alike
    pass_at_k     HumanEval's (and MBPP's) unbiased estimator from n samples with c correct (Chen et al., 2021):
                  1 - C(n - c, k) / C(n, k), computed as a product to stay exact for large n
    task_metrics  a task's metric from its items' generations: exact_match (NQ, TriviaQA), maj1@k
                  (GSM8K, k = samples per item), pass@k for k in 1, 10, 100 up to the samples
                  (HumanEval, programs run in execution.py's sandbox); each with n and the standard
                  error of the per-item scores' mean
"""

from __future__ import annotations

import os
import re
import string
from collections import Counter

import numpy as np

from llama_plugin.eval.scoring import mean_and_stderr

_QA_END = re.compile(r"\n|,|\.(?=\s|$)")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
PASS_AT = (1, 10, 80, 100)  # pass@80: the LLaMA paper's MBPP column

# Minerva (Lewkowycz et al. 2022), appendix D.1: what normalize_final_answer substitutes and removes
MINERVA_SUBSTITUTIONS = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""),
                         ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
MINERVA_REMOVED = ("square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots",
                   "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
                   "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}",
                   "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ",
                   "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots")
_FINAL = re.compile(r"The final answer is (.*?)(?:\.? I hope it is correct|$)", re.M)


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def qa_answer(generation: str) -> str:
    return _QA_END.split(generation, maxsplit=1)[0].strip()


def exact_match(prediction: str, references: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def gsm8k_answer(text: str) -> str | None:
    if "####" in text:
        text = text.split("####")[-1]
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalization of a final answer (appendix D.1), step by step."""
    answer = answer.split("=")[-1]
    for before, after in MINERVA_SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in MINERVA_REMOVED:
        answer = answer.replace(expression, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)  # the math between the first $...$
    for command in ("text", "textbf", "overline"):
        answer = re.sub(r"(\\" + command + r"\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)  # \fracab -> \frac{a}{b}
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)  # \sqrta -> \sqrt{a}
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (braces balanced)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def math_answer(generation: str) -> str | None:
    found = _FINAL.findall(generation)
    if found:
        answer = found[-1].strip()
        return normalize_final_answer(answer[:-1] if answer.endswith(".") else answer)  # "is 5." without the sign-off
    boxed = last_boxed(generation)
    return normalize_final_answer(boxed) if boxed is not None else None


def maj_at_k(answers: list[str | None], reference: str) -> float:
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return float(winner == reference)


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def task_metrics(items: list, generations: list[list[str]], timeout_s: float = 10.0) -> tuple[dict, list[dict]]:
    """{metric: {value, stderr, n}} and one row per item; generations[i] are item i's samples (text
    before the stop strings)."""
    task, samples = items[0].task, len(generations[0])
    rows = [{"id": it.id, "generations": g} for it, g in zip(items, generations)]
    if task in ("nq", "triviaqa"):
        for row, item in zip(rows, items):
            row["answer"] = qa_answer(row["generations"][0])
            row["exact_match"] = exact_match(row["answer"], list(item.references))
        return {"exact_match": mean_and_stderr([r["exact_match"] for r in rows])}, rows
    if task in ("gsm8k", "math"):
        name, extract = f"maj1@{samples}", gsm8k_answer if task == "gsm8k" else math_answer
        for row, item in zip(rows, items):
            row["answers"] = [extract(g) for g in row["generations"]]
            reference = item.references[0] if task == "gsm8k" else normalize_final_answer(item.references[0])
            row[name] = maj_at_k(row["answers"], reference)
        return {name: mean_and_stderr([r[name] for r in rows])}, rows
    if task in ("humaneval", "mbpp"):
        from concurrent.futures import ThreadPoolExecutor

        from llama_plugin.eval.execution import humaneval_program, isolation, mbpp_program, run_program

        jobs = [humaneval_program(it.prompt, g, it.test, it.entry_point) if task == "humaneval" else
                mbpp_program(g, it.test) for it, gs in zip(items, generations) for g in gs]
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            outcomes = list(pool.map(lambda src: run_program(src, timeout_s=timeout_s), jobs))
        metrics = {}
        for i, row in enumerate(rows):
            mine = outcomes[i * samples:(i + 1) * samples]
            row["outcomes"] = [o.reason for o in mine]
            row["correct"] = sum(o.passed for o in mine)
        for k in PASS_AT:
            if k <= samples:
                for row in rows:
                    row[f"pass@{k}"] = pass_at_k(samples, row["correct"], k)
                metrics[f"pass@{k}"] = mean_and_stderr([r[f"pass@{k}"] for r in rows])
        for m in metrics.values():
            m["sandbox"] = isolation()
        return metrics, rows
    raise ValueError(f"no generative metric for task {task!r}")
