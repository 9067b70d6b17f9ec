"""The skip ledger: which global batches of data a run leaves out, so every resume reads the same.

`<run_dir>/skipped_batches.json` holds entries {"at_step", "skip", "reason", ...}: from optimizer
step `at_step` on (the number of steps done when the entry was made), the data stream jumps
`skip` global batches further. The global batch that step s (0-based) reads is

    batch(s) = s + sum(e.skip for e in entries if e.at_step <= s)

so the sample order stays a pure function of the data files, the seed and the ledger. The data set is
built `reserve` batches longer than train.steps to have batches to skip to; a skip that would pass
the end is shortened, with a warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LEDGER_FILE = "skipped_batches.json"


class LedgerError(ValueError):
    """The ledger file is unreadable or inconsistent; names the file."""


class SkipLedger:
    def __init__(self, path: Path, reserve: int):
        self.path = Path(path)
        self.reserve = reserve
        self.entries: list[dict] = []
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.entries = [dict(e) for e in data["entries"]]
                for e in self.entries:
                    if not (isinstance(e["at_step"], int) and isinstance(e["skip"], int)
                            and e["at_step"] >= 0 and e["skip"] >= 0):
                        raise ValueError(f"bad entry {e}")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise LedgerError(f"{self.path}: unreadable skip ledger ({e})") from None
        if self.skipped_total > reserve:
            raise LedgerError(f"{self.path}: skips {self.skipped_total} batches, more than the data set's reserve "
                              f"of {reserve} (stability.data_reserve_batches)")

    @property
    def skipped_total(self) -> int:
        return sum(e["skip"] for e in self.entries)

    def batch_index(self, step: int) -> int:
        """The global batch that optimizer step `step` (0-based) reads."""
        return step + sum(e["skip"] for e in self.entries if e["at_step"] <= step)

    def batch_ranges(self, steps: int) -> list[tuple[int, int]]:
        """The global batches steps 0..steps-1 read, as contiguous [first, stop) ranges."""
        ranges, step = [], 0
        for at in sorted({e["at_step"] for e in self.entries if e["at_step"] < steps} | {steps}):
            if at > step:
                first = self.batch_index(step)
                ranges.append((first, first + at - step))
            step = at
        return ranges

    def add(self, at_step: int, skip: int, write: bool, **record) -> int:
        """Skip `skip` batches from step `at_step` on (at most what the reserve has left); returns
        the number skipped. Every rank adds the same entry; the one with `write` saves the file."""
        skip = max(0, min(skip, self.reserve - self.skipped_total))
        entry = {"at_step": at_step, "skip": skip, **record}
        self.entries.append(entry)
        if write:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"entries": self.entries}, indent=2) + "\n")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY)  # the rename itself must be durable
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return skip


def default_reserve(steps: int, configured: int | None) -> int:
    """Spare global batches: the configured number, else 5% of the steps (PaLM skipped ~20 x 200-500
    batches over ~250k steps: 2-4%)."""
    return configured if configured is not None else -(-steps * 5 // 100)
