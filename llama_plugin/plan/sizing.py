"""Compute-optimal sizing (Hoffmann et al. 2022, "Chinchilla") and LLaMA's answer to it.

For a budget of C training FLOPs (C = 6 N D):
- Chinchilla-optimal: D = 20 N, so N = sqrt(C / 120). Hoffmann et al.'s approaches 1 and 2 (N and D
  both ~ C^0.5) give the same: 5.76e23 FLOPs -> about 70B parameters and 1.4T tokens.
- Their approach 3, the fitted loss L(N, D) = E + A / N^alpha + B / D^beta (E 1.69, A 406.4, B 410.7,
  alpha 0.34, beta 0.28), has its own optimum, at smaller N and larger D.
LLaMA trains smaller models longer because inference costs 2N FLOPs per token for the model's whole
life (the "Chinchilla trap"). Each option here is a smaller model trained, by the fitted law, to the
same loss as the law's own optimum: it costs more to train and less to serve, and pays off after
(extra training FLOPs) / (2 x difference in N) inference tokens.
"""

from __future__ import annotations

import math

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TOKENS_PER_PARAMETER = 20
OPTION_FRACTIONS = (1 / 2, 1 / 3, 1 / 5)


def loss(n: float, d: float) -> float:
    return E + A / n**ALPHA + B / d**BETA


def chinchilla_20x(flops: float) -> tuple[float, float]:
    n = math.sqrt(flops / (6 * TOKENS_PER_PARAMETER))
    return n, TOKENS_PER_PARAMETER * n


def fitted_optimum(flops: float) -> tuple[float, float]:
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    return g * (flops / 6) ** (BETA / (ALPHA + BETA)), (flops / 6) ** (ALPHA / (ALPHA + BETA)) / g


def tokens_for_loss(n: float, target: float) -> float | None:
    """Tokens a model of n parameters needs to reach `target` by the fitted law (None: never)."""
    rest = target - E - A / n**ALPHA
    return (B / rest) ** (1 / BETA) if rest > 0 else None


def size(flops: float, flops_to_gpu_hours) -> dict:
    """The options for a FLOPs budget; `flops_to_gpu_hours` converts FLOPs at the planned MFU."""
    n20, d20 = chinchilla_20x(flops)
    n3, d3 = fitted_optimum(flops)
    target = loss(n3, d3)
    options = []
    for frac in (1.0, *OPTION_FRACTIONS):
        n = n3 * frac
        d = tokens_for_loss(n, target) if frac < 1 else d3
        train = 6 * n * d
        extra = train - flops
        options.append({
            "parameters": n, "tokens": d, "tokens_per_parameter": d / n, "predicted_loss": loss(n, d),
            "train_flops": train, "train_gpu_hours": flops_to_gpu_hours(train),
            "inference_flops_per_million_tokens": 2 * n * 1e6,
            "inference_gpu_hours_per_million_tokens": flops_to_gpu_hours(2 * n * 1e6),
            "break_even_inference_tokens": None if frac == 1 else extra / (2 * (n3 - n)),
        })
    return {
        "budget_flops": flops, "budget_gpu_hours": flops_to_gpu_hours(flops),
        "chinchilla_optimal": {"rule": "D = 20 N", "parameters": n20, "tokens": d20, "predicted_loss": loss(n20, d20)},
        "fitted_law_optimum": {"rule": "argmin of Hoffmann et al.'s approach-3 L(N, D) at 6ND = C",
                               "parameters": n3, "tokens": d3, "predicted_loss": target},
        "same_loss_options": options,
    }
