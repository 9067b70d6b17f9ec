"""Files in a run directory through which schedulers talk to a training run (slurm/render.py):
`STOP` asks the run to checkpoint after the current step and exit 0; `FINISHED` says the last
step is done; `run_state.json` says where the run stands; `requeue.json` says why training exited
for a requeue (a hang, or silent data corruption on a named node), and `incidents/` holds the
evidence (stack dumps). `StopRequest` is the run's side of STOP
(pretraining and fine-tuning alike)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

RUN_STATE = "run_state.json"
FINISHED_MARKER = "FINISHED"
# Training reached train.exit_at_step (before train.steps): the job chain ends there; a new launch
# (slurm.launch removes it) goes on.
PAUSED_MARKER = "PAUSED"
STOP_FILE = "STOP"
REQUEUE_REQUEST = "requeue.json"
INCIDENTS_DIR = "incidents"
# Exit codes of a training process that asks its job to be requeued: after a hang; after silent
# data corruption (requeue without the named node). torchrun reports any worker failure as 1, so
# the job script reads requeue.json rather than the code.
EXIT_REQUEUE = 75
EXIT_SDC = 76


# Environment variables whose values are secrets (cluster.env): never written to a file or printed.
# slurm.launch hands them to sbatch in its environment, which Slurm gives the job and its requeues;
# training redacts them from the configs it writes.
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.I)


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name))


def redact_secrets(config: dict) -> dict:
    """A plain config with the values of secret cluster.env entries replaced."""
    env = (config.get("cluster") or {}).get("env") or {}
    for name in env:
        if is_secret(name):
            env[name] = "<redacted>"
    return config


def node_name() -> str:
    """This process's node as the scheduler names it (what `--exclude` takes), else the host name."""
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def write_requeue_request(run_dir: Path, record: dict) -> None:
    """Atomically (any rank may write; the content is the same kind either way)."""
    path = Path(run_dir) / REQUEUE_REQUEST
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


class StopRequest:
    """A checkpoint and a clean exit at the end of the current step, asked for by SIGUSR1/SIGTERM
    to any rank or by a STOP file in the run directory. The file is how a Slurm batch script asks
    (slurm/render.py): a signal to a job step reaches every process in it, helper processes too."""

    def __init__(self, stop_file: Path):
        self.requested = False
        self.stop_file = stop_file
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        """Whether any rank was asked (all ranks must stop at the same step): a collective."""
        import torch
        import torch.distributed as dist

        asked = self.requested or (dist.get_rank() == 0 and self.stop_file.exists())
        flag = torch.tensor([1 if asked else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def write_text_atomic(path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a reader sees the old file or
    the whole new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
