"""Scores of generated answers, as the LLaMA paper reports them.

    exact_match   NaturalQuestions / TriviaQA: the answer normalized as SQuAD's evaluation does
                  (lower case, no punctuation, no articles a/an/the, single spaces) equal to any
                  normalized reference
    gsm8k_answer  the last number of a completion (thousands separators dropped); the reference is
                  what follows "####" in a GSM8K solution
    maj_at_k      maj1@k (Minerva): the most common of k extracted answers (ties: the one seen first)
                  is right
    pass_at_k     HumanEval's unbiased estimator from n samples with c correct (Chen et al., 2021):
                  1 - C(n - c, k) / C(n, k), computed as a product to stay exact for large n
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


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
