"""kill -9 at random moments, in bulk: one process imports the training code once, then forks a
training run (one process, gloo) per segment and kills it with SIGKILL at a random moment tied to
the run's own progress (after a seeded number of its steps have been logged, then a seeded delay
shorter than a step or a save), so a restart costs a fork, not a Python start, and a slow host
changes when kills land but not how far each segment gets. Between kills it may damage the newest checkpoint (a
flipped byte, a truncated file). Then it lets one run finish, and runs an uninterrupted reference.

    python -m tests.kill9_server --demo-data D --root R --kills 20 --seed 0 [recipe overrides]

Writes <root>/report.json: per segment the delay, whether the kill landed during a save (a step_*.tmp
directory left behind), the checkpoint expected to be resumed from, and what the segment printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import time
from pathlib import Path


def fork_training(argv: list[str], log: Path) -> int:
    pid = os.fork()
    if pid == 0:  # the child: one training process, output to its own log
        os.setpgid(0, 0)  # its own process group: the kill takes megatron's writer processes too
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            from llama_plugin.train import main

            code = main(argv)
        except BaseException:  # noqa: BLE001 - report anything, exit non-zero
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return pid


_STEP_LINE = re.compile(r"^step (\d+)/", re.M)


def wait_for_steps(log: Path, pid: int, steps: int, timeout_s: float = 300.0) -> bool:
    """Until the segment has logged `steps` training steps (or timeout_s passed); True if it ended
    before (it is then reaped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and len(_STEP_LINE.findall(log.read_text(errors="replace"))) >= steps:
            return False
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return True
        time.sleep(0.02)
    return False


def newest_intact(ckpt_root: Path, damaged: dict[str, tuple[str, bytes]]) -> str | None:
    """The newest complete checkpoint that does not hold a file this process damaged (a later
    checkpoint of the same step, written after the damaged one was set aside, is intact)."""
    from llama_plugin.checkpoint import complete_checkpoints

    for _, d in reversed(complete_checkpoints(ckpt_root)):
        file, data = damaged.get(d.name, (None, None))
        if file is None or not (d / file).is_file() or (d / file).read_bytes() != data:
            return d.name
    return None


def damage(ckpt: Path, how: str) -> tuple[str, bytes]:
    target = max(ckpt.glob("__*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x04
    else:
        data = data[: len(data) // 2]
    target.write_bytes(bytes(data))
    return target.name, bytes(data)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--demo-data", required=True)
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-steps", type=int, default=1, help="kill after this many logged steps at least")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--max-delay", type=float, default=0.3, help="then within this many seconds")
    args, overrides = p.parse_known_args()
    os.environ["DEMO_DATA"] = args.demo_data
    import llama_plugin.train  # noqa: F401 - imported once, before the forks
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._get_write_results_queue()  # megatron's writer queue (a spawned manager), shared by the forks

    rng = random.Random(args.seed)
    root = args.root
    run_dir = root / "killed"
    argv = ["tiny_cpu", *overrides, f"train.run_dir={run_dir}"]
    segments, damaged = [], {}
    for i in range(args.kills):
        expected = newest_intact(run_dir / "checkpoints", damaged)
        steps = rng.randint(args.min_steps, args.max_steps)
        delay = rng.uniform(0.0, args.max_delay)
        log = root / f"segment_{i:02d}.log"
        pid = fork_training(argv, log)
        ended = wait_for_steps(log, pid, steps)
        if not ended:
            time.sleep(delay)
        try:
            os.killpg(pid, signal.SIGKILL)  # as Slurm kills every process of a job
        except ProcessLookupError:
            pass
        if not ended:
            os.waitpid(pid, 0)
        during_save = any((run_dir / "checkpoints").glob("step_*.tmp")) if (run_dir / "checkpoints").is_dir() else False
        seg = {"steps": steps, "delay": round(delay, 3), "expected_resume": expected, "during_save": during_save,
               "log": log.read_text()}
        newest = newest_intact(run_dir / "checkpoints", damaged)
        if i in (args.kills // 3, 2 * args.kills // 3) and newest is not None:
            how = "flip" if i == args.kills // 3 else "truncate"
            damaged[newest] = damage(run_dir / "checkpoints" / newest, how)
            seg["damaged"] = {"checkpoint": newest, "file": damaged[newest][0], "how": how}
        segments.append(seg)
    final_log = root / "final.log"
    expected = newest_intact(run_dir / "checkpoints", damaged)
    pid = fork_training(argv, final_log)
    _, status = os.waitpid(pid, 0)
    final = {"exit": os.waitstatus_to_exitcode(status), "expected_resume": expected, "log": final_log.read_text()}
    ref_log = root / "reference.log"
    pid = fork_training(["tiny_cpu", *overrides, f"train.run_dir={root / 'reference'}"], ref_log)
    _, status = os.waitpid(pid, 0)
    reference = {"exit": os.waitstatus_to_exitcode(status), "log": ref_log.read_text()}
    (root / "report.json").write_text(json.dumps({"segments": segments, "final": final, "reference": reference}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
