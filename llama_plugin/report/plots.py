"""One PNG per concern from the rows of a metrics.jsonl (pretraining's `train/loss`, ... keys or the
fine-tuning loop's `loss`, ... keys); a figure whose metrics the run never logged is not drawn."""

from __future__ import annotations

import json
import os
from pathlib import Path

# figure -> [(label, keys that may hold it)], y-axis label, log scale
FIGURES = {
    "loss": ([("train", ("train/loss", "loss")), ("validation", ("val/loss",))], "loss (nats/token)", False),
    "lr": ([("learning rate", ("train/lr", "lr"))], "learning rate", False),
    "grad_norm": ([("gradient norm", ("train/grad_norm", "grad_norm"))], "global gradient norm", True),
    "throughput": ([("tokens/s/GPU", ("throughput/tokens_per_sec_per_gpu",))], "tokens / s / GPU", False),
}


class ReportError(ValueError):
    """A run directory without readable metrics."""


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: not found (is {run_dir} a run directory?)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    if not rows:
        raise ReportError(f"{path}: no rows")
    return rows


def series(rows: list[dict], keys: tuple) -> tuple[list, list]:
    xs, ys = [], []
    for row in rows:
        for key in keys:
            if isinstance(row.get(key), (int, float)):
                xs.append(row["step"])
                ys.append(row[key])
                break
    return xs, ys


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_plots(run_dir: Path, out_dir: Path) -> dict:
    """{figure name: PNG path} of every figure with data."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = read_rows(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    figures = dict(FIGURES)
    eval_keys = sorted({k for row in rows for k in row if k.startswith("eval/")})
    if eval_keys:
        figures["eval"] = ([(k[len("eval/"):], (k,)) for k in eval_keys], "score", False)
    for name, (lines, ylabel, log) in figures.items():
        data = [(label, *series(rows, keys)) for label, keys in lines]
        data = [d for d in data if d[1]]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, xs, ys in data:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log and all(y > 0 for _, _, ys in data for y in ys):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_title(f"{Path(run_dir).name}: {name}")
        fig.tight_layout()
        written[name] = out_dir / f"{name}.png"
        _save(fig, written[name])
        plt.close(fig)
    return written
