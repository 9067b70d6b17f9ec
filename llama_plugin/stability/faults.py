"""Faults injected on purpose (recipe group `faults`, off by default) to prove that the stability
machinery catches each one. Steps are 1-based. The one-off faults (NaN, spike, hang) fire once per
run: a marker in <run_dir>/incidents/ remembers, so a rolled-back or requeued run does not meet
them again. The bit flip is a faulty device: on from its step on, on `bitflip_node` only if set."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

# Faults are for test clusters: a paper-scale recipe (this many GPUs or more) refuses them.
MAX_FAULT_GPUS = 256


def any_enabled(f) -> bool:
    return any(v is not None for v in (f.loss_spike_at_step, f.nan_grad_at_step, f.bitflip_from_step,
                                        f.hang_at_step, f.straggler_rank))


class FaultInjector:
    def __init__(self, f, chunks, run_dir: Path):
        from llama_plugin.run_files import INCIDENTS_DIR, node_name

        self.f, self.chunks = f, chunks
        self.rank = dist.get_rank()
        self.markers = Path(run_dir) / INCIDENTS_DIR
        self._flip_calls = 0
        if (f.bitflip_from_step is not None and self.rank == f.bitflip_rank
                and f.bitflip_node in (None, node_name())):
            self._flip_target().register_forward_hook(self._maybe_flip)
        self._step = 0

    def _once(self, name: str, step: int, at: int | None, rank: int | None = None) -> bool:
        if at is None or step != at or (rank is not None and rank != self.rank):
            return False
        marker = self.markers / f"fault-{name}-rank{self.rank}.fired"  # per rank: all ranks must agree
        if marker.exists():
            return False
        self.markers.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"step {step}, rank {self.rank}\n")
        return True

    def before_step(self, step: int) -> None:
        """At the start of (1-based) `step`: the hang."""
        self._step = step
        if self._once("hang", step, self.f.hang_at_step, self.f.hang_rank):
            print(f"[faults] rank {self.rank}: hanging at step {step}", flush=True)
            while True:  # the watchdog (or the job's time limit) ends this
                time.sleep(1)

    def after_backward(self, step: int) -> None:
        """Once the gradients are reduced: a NaN in one element of nan_grad_rank's gradients (in
        nan_grad_steps steps in a row); the straggler's sleep."""
        first = self.f.nan_grad_at_step
        nan_step = step if first is not None and first <= step < first + self.f.nan_grad_steps else None
        if self._once(f"nan_grad-step{step}", step, nan_step, self.f.nan_grad_rank):
            buffer = self.chunks[0].buffers[0].grad_data
            buffer.view(-1)[buffer.numel() // 2] = float("nan")
            print(f"[faults] rank {self.rank}: NaN in a gradient at step {step}", flush=True)
        if self.f.straggler_rank == self.rank:
            time.sleep(self.f.straggler_sleep_s)

    def observed_loss(self, step: int, loss: float) -> float:
        """The loss as the run sees it: times loss_spike_factor at loss_spike_at_step (every rank)."""
        if self._once("spike", step, self.f.loss_spike_at_step):
            if self.rank == 0:
                print(f"[faults] loss spike injected at step {step}: {loss:.4f} x {self.f.loss_spike_factor:g}", flush=True)
            return loss * self.f.loss_spike_factor
        return loss

    def _flip_target(self):
        """The first transformer layer's MLP input projection (a ColumnParallelLinear) of this rank's
        first model chunk."""
        model = getattr(self.chunks[0], "module", self.chunks[0])
        return model.decoder.layers[0].mlp.linear_fc1

    def _maybe_flip(self, module, inputs, output):
        if self._step < self.f.bitflip_from_step or not torch.is_grad_enabled():
            return None
        self._flip_calls += 1
        if self._flip_calls % 2 == 0:
            return None
        out, bias = output if isinstance(output, tuple) else (output, None)
        out = out.clone()
        # The top mantissa bit of one element: a finite, silent change of up to half its value.
        if out.dtype == torch.float32:
            out.view(-1)[:1].view(torch.int32).bitwise_xor_(1 << 22)
        else:
            out.view(-1)[:1].view(torch.int16).bitwise_xor_(1 << 6)
        return (out, bias) if isinstance(output, tuple) else out
