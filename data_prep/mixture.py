"""The data mixture: blend weights for training and the epochs a token budget implies per source.

Each source of a recipe's `data.sources` has a sampling share (`weight`) and optionally the epochs
the reference run made over it (LLaMA table 1). megatron-core samples source i with probability
weight_i / sum(weights) (its blend normalizes), so those are the blend weights. A budget of B
training tokens reads share * B tokens from a source of T tokens: share * B / T epochs. With the
paper's 1.4T tokens, a source of share * 1.4T / epochs tokens is read exactly the paper's epochs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.tokenize_parallel import INDEX_HEADER

ITEMSIZE_BY_CODE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core's DType codes
EPOCHS_TOLERANCE = 1e-6  # relative: equal within float rounding is not "more"


class MixtureError(ValueError):
    """A source's weight or dataset is unusable; the message names the source or file."""


def blend_weights(weights: dict[str, float]) -> dict[str, float]:
    """Sampling probability of each source: weight / sum of weights."""
    if not weights:
        raise MixtureError("no data sources")
    for name, w in weights.items():
        if not w > 0:
            raise MixtureError(f"data.sources.{name}.weight: must be > 0, got {w}")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def implied_source_tokens(share: float, epochs: float, budget_tokens: float) -> float:
    """Tokens a source must hold to be read `epochs` times when `share` of `budget_tokens` come from it."""
    return share * budget_tokens / epochs


def effective_epochs(share: float, budget_tokens: float, source_tokens: int) -> float:
    if source_tokens <= 0:
        return float("inf")
    return share * budget_tokens / source_tokens


def dataset_size(prefix: str | Path) -> tuple[int, int]:
    """(documents, tokens) of an indexed dataset, read from its .idx (megatron-core format)."""
    idx = Path(str(prefix) + ".idx")
    try:
        with open(idx, "rb") as f:
            head = f.read(len(INDEX_HEADER) + 8 + 1 + 8 + 8)
            if len(head) < len(INDEX_HEADER) + 25 or head[:len(INDEX_HEADER)] != INDEX_HEADER:
                raise MixtureError(f"{idx}: not a megatron-core index file")
            sequences = struct.unpack("<Q", head[len(INDEX_HEADER) + 9:len(INDEX_HEADER) + 17])[0]
            lengths = np.fromfile(f, dtype=np.int32, count=sequences)
    except FileNotFoundError:
        raise MixtureError(f"{idx}: no such file (tokenize the source first: python -m data_prep tokenize)") from None
    if len(lengths) != sequences:
        raise MixtureError(f"{idx}: truncated ({len(lengths)} of {sequences} sequence lengths)")
    tokens = int(lengths.sum(dtype=np.int64))
    itemsize = ITEMSIZE_BY_CODE.get(head[len(INDEX_HEADER) + 8])
    bin_path = Path(str(prefix) + ".bin")
    if itemsize is None or not bin_path.is_file() or bin_path.stat().st_size != tokens * itemsize:
        raise MixtureError(f"{bin_path}: missing or not the size its .idx implies ({tokens:,} tokens)")
    return int(sequences), tokens


@dataclass
class SourceRow:
    name: str
    share: float
    documents: int
    tokens: int
    epochs: float  # effective, for the budget
    reference_epochs: float | None
    warning: str | None


def mixture_report(sources: dict, budget_tokens: float) -> list[SourceRow]:
    """One row per source of a recipe's data.sources (each with prefix, weight, epochs)."""
    shares = blend_weights({name: float(s["weight"]) for name, s in sources.items()})
    rows = []
    for name, src in sources.items():
        docs, tokens = dataset_size(src["prefix"])
        epochs = effective_epochs(shares[name], budget_tokens, tokens)
        ref = None if src.get("epochs") is None else float(src["epochs"])
        warning = None
        if ref is not None and epochs > ref * (1 + EPOCHS_TOLERANCE):
            warning = f"{name}: {epochs:.2f} epochs > the reference {ref:.2f}; the source is repeated more than planned"
        rows.append(SourceRow(name, shares[name], docs, tokens, epochs, ref, warning))
    return rows


def format_report(rows: list[SourceRow], budget_tokens: float) -> str:
    lines = [f"token budget: {budget_tokens:,.0f}",
             f"{'source':<14} {'share':>7} {'documents':>12} {'tokens':>16} {'epochs':>8} {'reference':>9}"
             f" {'tokens for reference epochs':>28}"]
    for r in rows:
        ref = needed = ""
        if r.reference_epochs is not None:
            ref = f"{r.reference_epochs:.2f}"
            needed = f"{implied_source_tokens(r.share, r.reference_epochs, budget_tokens):,.0f}"
        lines.append(f"{r.name:<14} {r.share:>7.4f} {r.documents:>12,} {r.tokens:>16,} {r.epochs:>8.3f} {ref:>9} {needed:>28}")
    lines += [f"WARNING {r.warning}" for r in rows if r.warning]
    return "\n".join(lines)
