"""Stop a run's Slurm jobs cleanly.

    python -m slurm.stop <run_dir> [--wait]

Leaves <run_dir>/slurm/STOPPED (no job of the run trains, requeues or submits a successor once it
is there), cancels the run's pending jobs (chain successors, replacements), and asks the running one
to checkpoint and exit with a STOP file in the run directory. With --wait it returns once no job of
the run is left. `python -m slurm.launch` onto the run directory starts it again.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from llama_plugin.run_files import STOP_FILE
from slurm.render import CHAIN_STOP, JOBS_FILE


def live_jobs(run_dir: Path) -> dict[str, str]:
    """{job id: state} of the run's jobs that are pending or running (squeue)."""
    jobs_file = Path(run_dir) / "slurm" / JOBS_FILE
    ids = sorted(set(jobs_file.read_text().split())) if jobs_file.is_file() else []
    if not ids:
        return {}
    r = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True, text=True)
    live = {}
    for line in r.stdout.splitlines():
        job, state = line.split()
        if state not in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT"):
            live[job] = state
    return live


def stop(run_dir: Path, wait: bool = False, timeout: float = 3600) -> dict[str, str]:
    """What was live: {job id: state}."""
    slurm_dir = Path(run_dir) / "slurm"
    (slurm_dir / CHAIN_STOP).write_text("stopped by python -m slurm.stop\n")
    live = live_jobs(run_dir)
    pending = [j for j, state in live.items() if state == "PENDING"]
    if pending:
        subprocess.run(["scancel", *pending], check=False)
    if any(state != "PENDING" for state in live.values()):
        (Path(run_dir) / STOP_FILE).touch()  # training checkpoints after its current step and exits 0
    deadline = time.time() + timeout
    while wait and live_jobs(run_dir):
        if time.time() > deadline:
            raise TimeoutError(f"{run_dir}: jobs still live after {timeout:.0f} s")
        time.sleep(1)
    return live


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    run_dir = Path(argv[0])
    if not (run_dir / "slurm" / JOBS_FILE).is_file():
        print(f"error: {run_dir / 'slurm' / JOBS_FILE}: no Slurm jobs recorded for this run directory", file=sys.stderr)
        return 2
    live = stop(run_dir, wait="--wait" in argv)
    print(", ".join(f"job {j} ({s})" for j, s in sorted(live.items())) or "no live jobs", "->",
          "cancelled the pending ones; the running one checkpoints and exits" if live else "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
