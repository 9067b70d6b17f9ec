"""The memory breakdown as a PNG: one stacked bar per layout (its fullest pipeline stage)."""

from __future__ import annotations

from pathlib import Path

TERMS = ("weights", "gradients", "optimizer", "buffer_padding", "activations", "recompute_working", "reserve")


def memory_png(rows: list[tuple[str, dict]], path: Path, gpu_memory_gb: float | None) -> None:
    """rows: (label, plan_memory result)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.6))
    left = [0.0] * len(rows)
    for term in TERMS:
        values = [mem["stages"][mem["peak_stage"]]["terms"][term] / 2**30 for _, mem in rows]
        ax.barh(range(len(rows)), values, left=left, label=term)
        left = [a + b for a, b in zip(left, values)]
    if gpu_memory_gb:
        ax.axvline(gpu_memory_gb, color="black", linestyle="--", label=f"{gpu_memory_gb:g} GiB")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("GiB per GPU (fullest pipeline stage)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
