"""Where metrics go: one plain log line per interval, metrics.jsonl in the run directory, and W&B.

Only the global rank 0 writes. W&B runs offline unless the recipe says otherwise; its files live in
<run_dir>/wandb and the run id is kept in <run_dir>/wandb_id so a resumed job continues the same
W&B run. On resume, metrics.jsonl is cut back to the resumed step, so it never holds a step twice;
a spike rollback moves the undone steps' rows to metrics.rolled_back.jsonl. W&B's history only
grows: rows logged after a rollback go under the next free W&B step, with `train/step` saying
which training step they are.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def truncate_jsonl_after(path: Path, step: int) -> list[str]:
    """Keep the rows of a metrics.jsonl up to `step` (a resume replays the rest); a line torn by a
    crash mid-append is dropped, not fatal. Returns the rows removed."""
    if not path.is_file():
        return []
    keep, removed = [], []
    for line in path.read_text().splitlines():
        try:
            (keep if json.loads(line)["step"] <= step else removed).append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return removed


class MetricsLog:
    def __init__(self, run_dir: Path, logging_cfg, run_config: dict, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        self._wandb_step = 0
        if not enabled:
            return
        self._truncate_after(resume_step)
        if logging_cfg.wandb_mode != "disabled":
            import wandb

            id_file = Path(run_dir) / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            self.wandb_run = wandb.init(
                project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity, name=run_config["name"],
                id=run_id, resume="allow", mode=logging_cfg.wandb_mode, dir=str(run_dir), config=run_config,
                settings=wandb.Settings(silent=True, console="off", disable_git=True),
            )

    def _truncate_after(self, step: int) -> None:
        truncate_jsonl_after(self.jsonl, step)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self._wandb_step = max(step, self._wandb_step + 1)
            self.wandb_run.log({**metrics, "train/step": step}, step=self._wandb_step)

    def rolled_back(self, step: int) -> None:
        """The steps after `step` were undone: their rows move to metrics.rolled_back.jsonl."""
        if not self.enabled:
            return
        removed = truncate_jsonl_after(self.jsonl, step)
        with open(self.jsonl.with_name("metrics.rolled_back.jsonl"), "a") as f:
            f.writelines(line + "\n" for line in removed)

    @property
    def wandb_dir(self) -> str | None:
        # run.dir is the files/ folder inside the offline run directory
        return str(Path(self.wandb_run.dir).parent) if self.wandb_run is not None else None

    def close(self) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish()
            wandb.teardown()  # finish() can return before the offline .wandb file is complete


def format_line(step: int, steps: int, m: dict) -> str:
    parts = [f"step {step}/{steps}"]
    for key, fmt in (("train/loss", "loss {:.4f}"), ("val/loss", "val {:.4f}"), ("train/lr", "lr {:.3e}"),
                     ("train/grad_norm", "gnorm {:.3f}"), ("throughput/tokens_per_sec_per_gpu", "tok/s/gpu {:.0f}"),
                     ("throughput/mfu", "mfu {:.3f}"), ("step_time_s", "step {:.3f}s")):
        if key in m:
            parts.append(fmt.format(m[key]))
    return " | ".join(parts)
