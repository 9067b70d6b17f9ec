"""Where a rollback goes and what it skips (PaLM section 5.1), and when rollbacks stop helping.

A spike (or a run of non-finite steps) detected at step S (1-based: S steps were run):
- restart: the newest verified checkpoint at or before S - rollback_steps (else the oldest verified
  one before S, with a warning); steps from it up to S - rollback_steps replay the same data;
- skip: from step max(checkpoint, S - rollback_steps) on, the batches through the spike's own
  (S - that step) plus skip_batches more, one ledger entry. With PaLM's numbers (a spike 500 steps
  after a checkpoint, rollback_steps 100, skip_batches 200) the data restarts 100 steps before the
  spike and 300 batches are left out, the spike's among them.
- checkpoints newer than the restart point were saved on the way to the spike: they are set aside
  as `<name>.abandoned-<n>` (never resumed from, never deleted here; pruning removes one once a
  newer checkpoint of the kept trajectory exists), after the ledger entry is on disk.

`RollbackBudget`: rollbacks in a row that do not get the run past the step where the first of
them was detected are futile (a device that keeps producing NaN, a lasting loss rise); after
stability.max_rollbacks of them the next trigger escalates instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from llama_plugin import checkpoint
from llama_plugin.stability import manifest

ABANDONED = ".abandoned-"


@dataclass
class RollbackPlan:
    target_step: int  # the checkpoint's step
    target: Path
    skip_from_step: int  # ledger at_step
    skip: int  # batches


class StabilityError(RuntimeError):
    """The run cannot recover by itself (no checkpoint to roll back to, every rank non-finite)."""


def plan(ckpt_root: Path, at_step: int, rollback_steps: int, skip_batches: int) -> RollbackPlan:
    """Collective (verifies checkpoints)."""
    limit = at_step - rollback_steps
    target_step, target = rollback_target(ckpt_root, limit, at_step)
    skip_from = max(target_step, limit)
    return RollbackPlan(target_step, target, skip_from, at_step - skip_from + skip_batches)


def rollback_target(ckpt_root: Path, limit: int, at_step: int) -> tuple[int, Path]:
    """Collective: the newest verified checkpoint at or before step `limit`; if there is none, the
    oldest verified one before `at_step`, with a warning."""
    candidates = [(k, d) for k, d in checkpoint.complete_checkpoints(ckpt_root) if k < at_step]
    ordered = [c for c in reversed(candidates) if c[0] <= limit] + [c for c in candidates if c[0] > limit]
    for k, d in ordered:
        if manifest.verify(d) is None:
            if k > limit and dist.get_rank() == 0:
                print(f"[stability] warning: no verified checkpoint at or before step {limit}; rolling back to "
                      f"{d.name}", flush=True)
            return k, d
    raise StabilityError(f"step {at_step}: no verified checkpoint before it to roll back to (stability.rollback_steps)")


def set_aside_abandoned(ckpt_root: Path, after_step: int, only: set | None = None) -> list[Path]:
    """Rename the complete checkpoints newer than `after_step` (those of `only`, if given) out of
    the resume path (rank 0)."""
    moved = []
    for step, d in checkpoint.complete_checkpoints(ckpt_root):
        if step > after_step and (only is None or step in only):
            n = 0
            while d.with_name(f"{d.name}{ABANDONED}{n}").exists():
                n += 1
            aside = d.with_name(f"{d.name}{ABANDONED}{n}")
            d.rename(aside)
            moved.append(aside)
    if moved:
        manifest.fsync_dir(Path(ckpt_root))
    return moved


def finish_interrupted_rollback(ckpt_root: Path, ledger_path: Path) -> list[Path]:
    """A rollback writes its ledger entry, then sets newer checkpoints aside; a crash between the
    two leaves checkpoints of the abandoned trajectory in the resume path. Those are the ones newer
    than the last entry's target and older than the ledger file (checkpoints of the kept trajectory
    are written after it): set them aside now (rank 0, before choosing where to resume)."""
    import json

    try:
        entries = json.loads(Path(ledger_path).read_text())["entries"]
        target = entries[-1]["checkpoint"]
        written = Path(ledger_path).stat().st_mtime
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return []
    target_step = int(target.removeprefix("step_")) if target.removeprefix("step_").isdigit() else None
    if target_step is None:
        return []
    stale = [step for step, d in checkpoint.complete_checkpoints(ckpt_root)
             if step > target_step and d.stat().st_mtime < written]
    return set_aside_abandoned(ckpt_root, target_step, only=set(stale)) if stale else []


class RollbackBudget:
    def __init__(self, max_rollbacks: int, state: dict | None = None):
        self.max_rollbacks = max_rollbacks
        state = state or {}
        self.futile = int(state.get("futile", 0))  # rollbacks in a row not yet got past `first_at`
        self.first_at = state.get("first_at")

    def progress(self, step: int) -> None:
        """An update at (1-based) `step` was applied."""
        if self.first_at is not None and step > self.first_at:
            self.reset()

    def reset(self) -> None:
        self.futile, self.first_at = 0, None

    def exhausted(self) -> bool:
        return self.futile >= self.max_rollbacks

    def spend(self, at_step: int) -> None:
        if self.first_at is None:
            self.first_at = at_step
        self.futile += 1

    def state_dict(self) -> dict:
        return {"futile": self.futile, "first_at": self.first_at}
