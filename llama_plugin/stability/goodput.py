"""Goodput: the share of wall time spent on training steps whose updates were kept.

Seconds are counted per kind and kept across restarts (in each checkpoint's train_state.json and in
run_state.json); wall time runs from each process's start (imports included):
  productive      training steps whose update stands
  evaluation      validation passes
  checkpoint_save, checkpoint_load
  restart         process start until the first step (imports, rendezvous, model build, data
                  index; the load is counted apart), plus the steps a crash lost since the last
                  checkpoint (their logged step times)
  rollback        steps undone by a spike rollback
  skipped_steps   steps whose update was skipped (non-finite loss or gradient)
  sdc_checks      the silent-data-corruption recomputations
"""

from __future__ import annotations

import time

import psutil

KINDS = ("productive", "evaluation", "checkpoint_save", "checkpoint_load", "restart", "rollback", "skipped_steps",
         "sdc_checks")


class Goodput:
    def __init__(self, state: dict | None = None):
        state = state or {}
        self.seconds = {k: float(state.get(k, 0.0)) for k in KINDS}
        self.wall_before = float(state.get("wall", 0.0))
        self.process_start = psutil.Process().create_time()
        self.kept: list[tuple[int, float]] = []  # (step, seconds) of this process's kept steps

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] += seconds

    def step(self, step: int, seconds: float, kept: bool) -> None:
        self.add("productive" if kept else "skipped_steps", seconds)
        if kept:
            self.kept.append((step, seconds))

    def rolled_back(self, to_step: int) -> None:
        """The steps after `to_step` are undone: their time moves from productive to rollback."""
        undone = sum(s for step, s in self.kept if step > to_step)
        self.kept = [(step, s) for step, s in self.kept if step <= to_step]
        self.seconds["productive"] -= undone
        self.seconds["rollback"] += undone

    def wall(self) -> float:
        return self.wall_before + (time.time() - self.process_start)

    def since_start(self) -> float:
        return time.time() - self.process_start

    def state_dict(self) -> dict:
        return {**self.seconds, "wall": self.wall()}

    def metrics(self) -> dict:
        wall = self.wall()
        out = {"goodput/share": self.seconds["productive"] / wall if wall > 0 else 0.0, "goodput/wall_s": wall}
        out.update({f"goodput/{k}_s": v for k, v in self.seconds.items()})
        return out
