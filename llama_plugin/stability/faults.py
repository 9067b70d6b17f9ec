"""Faults injected on purpose (recipe group `faults`, off by default) to prove that the stability
machinery catches each one. Steps are 1-based. The hang and the kill fire once per run: a marker in
<run_dir>/incidents/ remembers, so a rolled-back or requeued run does not meet them again. The NaN
and the loss spike fire in the first nan_grad_steps / loss_spike_steps steps run from their step
on (replays after a rollback count, and so does a restart): 1 is a one-off, more than the run a
device or a data region that stays bad. The bit flip is a faulty device: on from its step on, on
`bitflip_node` only if set. The straggler computes longer before the gradient reduction."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Faults are for test clusters: a paper-scale recipe (this many GPUs or more) refuses them.
MAX_FAULT_GPUS = 256


def any_enabled(f) -> bool:
    return any(v is not None for v in (f.loss_spike_at_step, f.nan_grad_at_step, f.bitflip_from_step,
                                        f.hang_at_step, f.straggler_rank, f.kill_at_step))


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
        """At the start of (1-based) `step`: the kill (a lost node), the hang."""
        self._step = step
        if self._once("kill", step, self.f.kill_at_step, self.f.kill_rank):
            print(f"[faults] rank {self.rank}: killed (SIGKILL) at the start of step {step}", flush=True)
            for child in multiprocessing.active_children():  # as a lost node: its helpers die too
                child.kill()
            os.kill(os.getpid(), signal.SIGKILL)
        if self._once("hang", step, self.f.hang_at_step, self.f.hang_rank):
            print(f"[faults] rank {self.rank}: hanging at step {step}", flush=True)
            while True:  # the watchdog (or the job's time limit) ends this
                time.sleep(1)

    def before_grad_sync(self, step: int) -> None:
        """This rank's forward and backward are done, the gradient reduction not started: the
        straggler computes straggler_sleep_s longer (a slow GPU, which its peers then wait for)."""
        if self.f.straggler_rank == self.rank:
            time.sleep(self.f.straggler_sleep_s)

    def after_backward(self, step: int) -> None:
        """Once the gradients are reduced: a NaN in one element of nan_grad_rank's gradients, in
        the first nan_grad_steps steps run from nan_grad_at_step on (replays after a rollback
        count: a count longer than the run is a device that stays broken). The count survives a
        restart (a marker in incidents/)."""
        if self.rank != self.f.nan_grad_rank or not self._counted("nan_grad", step, self.f.nan_grad_at_step,
                                                                  self.f.nan_grad_steps):
            return
        # In the middle of this rank's own shard of the first bucket: the distributed optimizer
        # reads only the shard it owns (the rest of its buffer is stale after the reduce-scatter).
        from megatron.core import parallel_state

        grads = self.chunks[0].buffers[0].buckets[0].grad_data.view(-1)
        dp = parallel_state.get_data_parallel_world_size()
        shard = grads.numel() // dp
        grads[parallel_state.get_data_parallel_rank() * shard + shard // 2] = float("nan")
        print(f"[faults] rank {self.rank}: NaN in a gradient at step {step}", flush=True)

    def _counted(self, name: str, step: int, first: int | None, times: int) -> bool:
        """Whether a fault fires in this run of `step`: in the first `times` steps run from step
        `first` on (replays after a rollback count), counted across restarts in incidents/."""
        if first is None or step < first:
            return False
        marker = self.markers / f"fault-{name}-rank{self.rank}.count"  # per rank: all ranks must agree
        fired = int(marker.read_text()) if marker.exists() else 0
        if fired >= times:
            return False
        self.markers.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{fired + 1}\n")
        return True

    def observed_loss(self, step: int, loss: float) -> float:
        """The loss as the run sees it: times loss_spike_factor from loss_spike_at_step on, in
        loss_spike_steps steps run (every rank; more than the run: a lasting rise)."""
        if self._counted("spike", step, self.f.loss_spike_at_step, self.f.loss_spike_steps):
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
