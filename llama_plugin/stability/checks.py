"""The `stability` and `faults` recipe groups checked against the run, before any work starts."""

from __future__ import annotations

from llama_plugin.stability.faults import MAX_FAULT_GPUS, any_enabled
from llama_plugin.stability.ledger import default_reserve
from recipes import RecipeError


def check_stability(cfg, world_size: int) -> None:
    """Raise RecipeError naming the field; fill in stability.data_reserve_batches (mutable cfg)."""
    s, f = cfg.stability, cfg.faults
    rules = (
        ("spike_window", s.spike_window > 0, "must be > 0"),
        ("spike_warmup_steps", s.spike_warmup_steps >= 0, "must be >= 0"),
        ("spike_std_factor", s.spike_std_factor is None or s.spike_std_factor > 0, "must be > 0 or null"),
        ("spike_ratio", s.spike_ratio is None or s.spike_ratio > 1, "must be > 1 or null"),
        ("rollback_steps", s.rollback_steps >= 0, "must be >= 0"),
        ("skip_batches", s.skip_batches >= 0, "must be >= 0"),
        ("data_reserve_batches", s.data_reserve_batches is None or s.data_reserve_batches >= 0, "must be >= 0"),
        ("max_consecutive_skips", s.max_consecutive_skips > 0, "must be > 0"),
        ("max_rollbacks", s.max_rollbacks >= 0, "must be >= 0"),
        ("sdc_check_interval", s.sdc_check_interval >= 0, "must be >= 0 (0: off)"),
        ("hang_timeout_s", s.hang_timeout_s >= 0, "must be >= 0 (0: off)"),
        ("straggler_factor", s.straggler_factor > 1, "must be > 1"),
    )
    for key, ok, why in rules:
        if not ok:
            raise RecipeError(f"stability.{key}: {why}, got {s[key]}")
    if s.spike_detection and s.spike_std_factor is None and s.spike_ratio is None:
        raise RecipeError("stability.spike_std_factor: with spike_ratio also null nothing is a spike; "
                          "set one, or stability.spike_detection=false")
    s.data_reserve_batches = default_reserve(cfg.train.steps, s.data_reserve_batches)

    for key in ("loss_spike_at_step", "nan_grad_at_step", "bitflip_from_step", "hang_at_step", "kill_at_step"):
        if f[key] is not None and f[key] <= 0:
            raise RecipeError(f"faults.{key}: steps count from 1, got {f[key]}")
    for key in ("nan_grad_rank", "bitflip_rank", "hang_rank", "straggler_rank", "kill_rank"):
        if f[key] is not None and not 0 <= f[key] < world_size:
            raise RecipeError(f"faults.{key}: {f[key]} is not a rank of this run (world size {world_size})")
    for key in ("nan_grad_steps", "loss_spike_steps"):
        if f[key] < 1:
            raise RecipeError(f"faults.{key}: must be >= 1, got {f[key]}")
    if f.straggler_sleep_s < 0:
        raise RecipeError(f"faults.straggler_sleep_s: must be >= 0, got {f.straggler_sleep_s}")
    gpus = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if any_enabled(f) and gpus >= MAX_FAULT_GPUS:
        raise RecipeError(f"faults: fault injection is for test runs; cluster {cfg.cluster.name} has {gpus} GPUs "
                          f"(refused from {MAX_FAULT_GPUS})")
