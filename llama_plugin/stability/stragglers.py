"""Stragglers: every rank's time to reach the end of the step, compared with the median of the ranks.

The time is taken from the start of the step until the rank arrives at the end-of-step agreement
(the all-reduce that decides whether to apply the update). A rank that is slow outside collectives
(data loading, its host, work after the last collective) arrives late and shows; slowness inside a
tensor-parallel collective is shared by the whole group and shows on the group's step time only.

Every rank's time goes to <run_dir>/step_times.jsonl (rank 0 writes it) at each logged step: one row
{"step", "ms": [per rank]}, about 6 bytes a rank. It is a log: a rolled-back or resumed run appends
the replayed steps again.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from llama_plugin.distributed import device
from llama_plugin.run_files import node_name


class StragglerMonitor:
    def __init__(self, factor: float, run_dir: Path):
        self.factor = factor
        self.path = Path(run_dir) / "step_times.jsonl"
        self.times: list[float] = []
        world = dist.get_world_size()
        self.hosts = [None] * world
        dist.all_gather_object(self.hosts, node_name())

    def check(self, seconds: float) -> tuple[list[tuple[int, str, float]], float]:
        """Collective: ([(rank, host, ratio to the median)] of the stragglers, the largest ratio)."""
        times = [torch.zeros(1, dtype=torch.float64, device=device()) for _ in self.hosts]
        dist.all_gather(times, torch.tensor([seconds], dtype=torch.float64, device=device()))
        values = self.times = [t.item() for t in times]
        median = statistics.median(values)
        ratios = [v / median if median > 0 else 1.0 for v in values]
        slow = [(r, self.hosts[r], ratio) for r, ratio in enumerate(ratios) if ratio > self.factor]
        return slow, max(ratios)

    def log(self, step: int) -> None:
        """Rank 0: append every rank's time of the last checked step."""
        if dist.get_rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "ms": [round(v * 1e3) for v in self.times]}) + "\n")
