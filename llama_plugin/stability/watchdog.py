"""A hang watchdog: when no step has finished for `timeout_s`, every thread's stack goes to a file in
the run directory (faulthandler) and the process exits with EXIT_REQUEUE, which the Slurm job turns
into a requeue. Every rank runs one, so the stacks show both the rank that hangs and the ranks
waiting for it in a collective."""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import threading
import time
from pathlib import Path

from llama_plugin.run_files import EXIT_REQUEUE, INCIDENTS_DIR, node_name, write_requeue_request


class HangWatchdog:
    def __init__(self, run_dir: Path, rank: int, timeout_s: float):
        self.run_dir, self.rank, self.timeout_s = Path(run_dir), rank, timeout_s
        self.last_progress = time.monotonic()
        self.step = 0
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()

    def progress(self, step: int) -> None:
        self.step = step
        self.last_progress = time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            idle = time.monotonic() - self.last_progress
            if idle < self.timeout_s:
                continue
            host = node_name()
            out = self.run_dir / INCIDENTS_DIR
            out.mkdir(parents=True, exist_ok=True)
            stacks = out / f"hang-step{self.step + 1}-rank{self.rank}-{host}.txt"
            with open(stacks, "w") as f:
                f.write(f"rank {self.rank} on {host}: no step finished for {idle:.0f} s "
                        f"(stability.hang_timeout_s={self.timeout_s:g}); step {self.step + 1} in progress\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            write_requeue_request(self.run_dir, {"reason": "hang", "rank": self.rank, "host": host,
                                                 "step": self.step + 1, "stacks": str(stacks)})
            print(f"[stability] rank {self.rank} ({host}): hang, no progress for {idle:.0f} s; stacks in {stacks}; "
                  f"exiting for a requeue", flush=True)
            # os._exit skips the cleanup that would end megatron's checkpoint-writer manager (and its
            # resource tracker); left alive they keep the task's output open after the rank is gone.
            for child in multiprocessing.active_children():
                child.kill()
            os._exit(EXIT_REQUEUE)
