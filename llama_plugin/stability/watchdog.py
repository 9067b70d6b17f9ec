"""A hang watchdog: when no step has finished for `timeout_s`, every thread's stack goes to a file in
the run directory (faulthandler) and the process exits with EXIT_REQUEUE, which the Slurm job turns
into a requeue. Every rank runs one, so the stacks show both the rank that hangs and the ranks
waiting for it in a collective.

Which rank hangs: each watchdog records whether its main thread is inside a communication call
(torch.distributed or megatron's pipeline/tensor-parallel communication) in
incidents/hang-step<N>-rank<r>.json; rank 0's watchdog waits for every rank's record (a rank
without one counts as hung) and writes the one requeue.json, naming the ranks that were not waiting
for others. If they are fewer than all ranks and on one node, the job is requeued without it
(a node that keeps hanging is left out like one that corrupts data). Under NCCL a waiting rank can
also block outside a communication call (a host sync on an asynchronous collective's result);
then the named ranks span nodes and nothing is excluded.
"""

from __future__ import annotations

import faulthandler
import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

from llama_plugin.run_files import (EXIT_REQUEUE, INCIDENTS_DIR, REQUEUE_REQUEST, node_name, write_requeue_request,
                                     write_text_atomic)

# Where a rank waiting for another one sits (paths of its main thread's frames).
_COMMUNICATION = ("torch/distributed/", "megatron/core/pipeline_parallel/p2p_communication",
                  "megatron/core/tensor_parallel/mappings", "megatron/core/distributed/")


class HangWatchdog:
    def __init__(self, run_dir: Path, rank: int, timeout_s: float, world: int = 1):
        self.run_dir, self.rank, self.timeout_s, self.world = Path(run_dir), rank, timeout_s, world
        self.main_thread = threading.main_thread().ident
        # this launch: records an earlier job left for the same step are not its ranks' (same job
        # and restart, written after this process started, allowing a minute of clock skew)
        self.job = "/".join(os.environ.get(k, "") for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID",
                                                              "TORCHELASTIC_RESTART_COUNT"))
        self.started = time.time()
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
            try:
                self._report(idle)
            finally:  # whatever failed above, the rank must not stay hung
                # os._exit skips the cleanup that would end megatron's checkpoint-writer manager (and
                # its resource tracker); left alive they keep the task's output open after the rank is gone.
                for child in multiprocessing.active_children():
                    child.kill()
                os._exit(EXIT_REQUEUE)

    def _report(self, idle: float) -> None:
        host = node_name()
        out = self.run_dir / INCIDENTS_DIR
        out.mkdir(parents=True, exist_ok=True)
        stacks = out / f"hang-step{self.step + 1}-rank{self.rank}-{host}.txt"
        with open(stacks, "w") as f:
            f.write(f"rank {self.rank} on {host}: no step finished for {idle:.0f} s "
                    f"(stability.hang_timeout_s={self.timeout_s:g}); step {self.step + 1} in progress\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        step = self.step + 1
        record = {"rank": self.rank, "host": host, "waiting": self._main_thread_communicating(), "job": self.job}
        write_text_atomic(out / f"hang-step{step}-rank{self.rank}.json", json.dumps(record) + "\n")
        print(f"[stability] rank {self.rank} ({host}): hang, no progress for {idle:.0f} s; stacks in {stacks}; "
              f"exiting for a requeue", flush=True)
        self._request_requeue(out, step)

    def _main_thread_communicating(self) -> bool:
        frame = sys._current_frames().get(self.main_thread)
        while frame is not None:
            if any(part in frame.f_code.co_filename for part in _COMMUNICATION):
                return True
            frame = frame.f_back
        return False

    def _request_requeue(self, out: Path, step: int) -> None:
        """Rank 0 gathers every rank's record and writes requeue.json; the others wait for it (a
        worker that exits first makes torchrun end rank 0 before it has written)."""
        wait_s = min(60.0, max(5.0, self.timeout_s / 2))
        deadline = time.monotonic() + wait_s
        if self.rank != 0:
            while time.monotonic() < deadline + 5 and not (self.run_dir / REQUEUE_REQUEST).exists():
                time.sleep(0.2)
            return
        records = {}
        while time.monotonic() < deadline and len(records) < self.world:
            for r in range(self.world):
                path = out / f"hang-step{step}-rank{r}.json"
                try:
                    record = json.loads(path.read_text()) if r not in records and path.exists() else None
                except (OSError, json.JSONDecodeError):
                    record = None
                if record is not None and record.get("job") == self.job and path.stat().st_mtime > self.started - 60:
                    records[r] = record
            time.sleep(0.2)
        hung = [r for r in range(self.world) if r not in records or not records[r]["waiting"]]
        hosts = sorted({records[r]["host"] for r in hung if r in records})
        localized = 0 < len(hung) < self.world and len(hosts) == 1 and all(r in records for r in hung)
        write_requeue_request(self.run_dir, {"reason": "hang", "step": step, "ranks": hung, "hosts": hosts,
                                             "exclude_hosts": hosts if localized else [],
                                             "stacks": str(out)})
