"""Loss-spike detection (PaLM section 5.1: ~20 spikes despite clipping, handled by a rollback and a
data skip). A spike is a finite loss above the running mean of the recent losses by more than
`std_factor` standard deviations, or above `ratio` times that mean. The window is part of the
checkpoint, so a resumed run detects exactly what the uninterrupted one would."""

from __future__ import annotations

import math
from collections import deque


class SpikeDetector:
    def __init__(self, window: int, warmup_steps: int, std_factor: float | None, ratio: float | None,
                 enabled: bool = True):
        self.window, self.warmup_steps = window, warmup_steps
        self.std_factor, self.ratio, self.enabled = std_factor, ratio, enabled
        self.losses: deque[float] = deque(maxlen=window)

    @classmethod
    def from_config(cls, s) -> "SpikeDetector":
        return cls(s.spike_window, s.spike_warmup_steps, s.spike_std_factor, s.spike_ratio, s.spike_detection)

    def check(self, step: int, loss: float) -> str | None:
        """Why the loss of (1-based) `step` is a spike, or None; a normal loss joins the window."""
        if not math.isfinite(loss):
            return None  # non-finite steps are skipped and counted elsewhere
        reason = None
        if self.enabled and step > self.warmup_steps and len(self.losses) == self.window:
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
            if self.std_factor is not None and loss > mean + self.std_factor * std:
                reason = f"loss {loss:.4f} > mean {mean:.4f} + {self.std_factor:g} x std {std:.4f}"
            elif self.ratio is not None and loss > self.ratio * mean:
                reason = f"loss {loss:.4f} > {self.ratio:g} x mean {mean:.4f}"
        if reason is None:
            self.losses.append(loss)
        return reason

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict | None) -> None:
        self.losses = deque((state or {}).get("losses", []), maxlen=self.window)
