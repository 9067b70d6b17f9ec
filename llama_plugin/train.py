"""Pretrain LLaMA with megatron-core from a recipe.

    torchrun --nproc_per_node N -m llama_plugin.train <recipe> [hydra overrides]
    torchrun ... -m llama_plugin.train --config <run_dir>/slurm/recipe.yaml [key=value ...]
    python -m llama_plugin.train <recipe> [overrides]            (one process)

The run directory (train.run_dir) holds everything: resolved config, checkpoints/step_*/,
metrics.jsonl, wandb/. A run resumes from its newest verified checkpoint automatically; a fresh
run can start from other weights (train.load, e.g. a converted HF checkpoint). SIGUSR1 or SIGTERM
(or a file named STOP in the run directory) make the run checkpoint after the current step and exit
0 with `stopped` in run_state.json, so a scheduler can requeue it; `finished` there, and a FINISHED
file, mark a completed run.

Stability (llama_plugin/stability/, recipe group `stability`): a step with a non-finite loss or grad
norm on any rank is not applied; a loss spike, or too many such steps in a row, rolls back to an
older checkpoint and skips data through the spike (skipped_batches.json); rollbacks that keep
meeting it are capped (non-finite: exit 75 and requeue.json naming the ranks' node; a loss rise:
accepted); every sdc_check_interval steps one micro-batch is recomputed and compared bitwise (a
mismatch: checkpoint, exit 76 and requeue.json naming the node); a hang dumps stacks to incidents/
and exits 75 for a requeue; every rank's compute time goes to step_times.jsonl. Goodput goes to
run_state.json and W&B. train.exit_at_step leaves PAUSED (a Slurm chain ends there).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from omegaconf import OmegaConf

from llama_plugin import checkpoint, flops, throughput
from llama_plugin.data import build_datasets, check_data_files, micro_batches, source_counts
from llama_plugin.distributed import DeviceError, device, init_distributed, process_group_timeout_minutes, shutdown
from llama_plugin.layout import num_microbatches, resolve
from llama_plugin.optim import batch_ramp
from llama_plugin.metrics_log import MetricsLog, format_line
from llama_plugin.run_files import (EXIT_REQUEUE, EXIT_SDC, FINISHED_MARKER, PAUSED_MARKER, RUN_STATE, STOP_FILE,
                                     StopRequest, node_name, redact_secrets, write_requeue_request)
from llama_plugin.model import ModelConfigError, build_gpt_model, transformer_config
from llama_plugin.stability import manifest
from llama_plugin.stability.faults import FaultInjector, any_enabled
from llama_plugin.stability.goodput import Goodput
from llama_plugin.stability.ledger import LEDGER_FILE, LedgerError, SkipLedger
from llama_plugin.stability.rollback import (RollbackBudget, StabilityError, finish_interrupted_rollback,
                                             set_aside_abandoned)
from llama_plugin.stability.rollback import plan as rollback_plan
from llama_plugin.stability.sdc import recompute_check
from llama_plugin.stability.spikes import SpikeDetector
from llama_plugin.stability.stragglers import StragglerMonitor
from llama_plugin.stability.watchdog import HangWatchdog
from llama_plugin.train_step import build_optimizer, eval_loss, train_step, wrap_ddp
from recipes import RecipeError, compose, load_file
from recipes.schema import RecipeConfig

_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}


def lr_at(step: int, o, total_steps: int) -> float:
    """The closed form of the schedule: the lr used by optimizer step `step` (0-based).

    Linear warm-up from 0 to the peak over warmup_steps (or the peak throughout, warmup_style
    constant), then cosine (or linear) decay to min_lr_ratio * peak at decay_steps, constant after;
    PaLM's inverse square root optional: peak * sqrt(warmup_steps / step) (with a constant warm-up,
    PaLM's 1 / sqrt(max(step, 10^4)) at peak 1e-2, steps counted from 0 as T5X counts them).
    """
    peak, floor = o.lr, o.lr * o.min_lr_ratio
    decay = o.decay_steps if o.decay_steps is not None else total_steps
    if o.warmup_steps > 0 and step <= o.warmup_steps:
        return peak if o.warmup_style == "constant" else peak * step / o.warmup_steps
    if o.decay_style == "constant":
        return peak
    if step > decay:
        return floor
    if o.decay_style == "inverse-square-root":
        return max(floor, peak * math.sqrt(max(o.warmup_steps, 1)) / math.sqrt(max(step, 1)))
    ratio = (step - o.warmup_steps) / (decay - o.warmup_steps)
    coeff = 0.5 * (math.cos(math.pi * ratio) + 1) if o.decay_style == "cosine" else 1 - ratio
    return floor + coeff * (peak - floor)


def build_scheduler(optimizer, o, total_steps: int) -> OptimizerParamScheduler:
    """megatron-core's scheduler, counting optimizer steps; it implements `lr_at`."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=o.lr if o.warmup_style == "constant" else 0.0,  # megatron warms up linearly from init_lr
        max_lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=o.decay_steps if o.decay_steps is not None else total_steps,
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )


def transformer_overrides(p) -> dict:
    """Recompute, overlap and uneven-stage settings of the parallel recipe, as TransformerConfig fields."""
    out = {}
    if p.recompute == "selective":
        out.update(recompute_granularity="selective")  # attention core: cheap to recompute, big to keep
    elif p.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if p.tp_comm_overlap:
        out.update(tp_comm_overlap=True)
    if p.get("first_stage_layers") is not None:
        out.update(num_layers_in_first_pipeline_stage=p.first_stage_layers)
    if p.get("last_stage_layers") is not None:
        out.update(num_layers_in_last_pipeline_stage=p.last_stage_layers)
    return out


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _init_tp_comm_overlap(cfg, dtype: torch.dtype) -> None:
    """TransformerEngine userbuffers for overlapping TP communication with GEMMs (GPU, te only).

    As Megatron-LM's megatron/training/initialize.py `_initialize_tp_communicators`: one buffer of
    [seq * micro_batch, hidden] per TP group. TE allocates it in `dtype` (its default is bf16, so an
    fp32 run must say so).
    """
    import inspect

    from transformer_engine.pytorch import module as te_module

    shape = [cfg.model.seq_length * cfg.train.micro_batch_size, cfg.model.hidden_size]
    kwargs = {"dtype": dtype} if "dtype" in inspect.signature(te_module.base.initialize_ub).parameters else {}
    if dtype != torch.bfloat16 and not kwargs:
        raise RuntimeError(f"parallel.tp_comm_overlap: this TransformerEngine's initialize_ub has no dtype; "
                           f"its buffers are bf16, the run is {dtype}")
    te_module.base.initialize_ub(shape=shape, tp_size=cfg.parallel.tensor, use_fp8=False, **kwargs)


def build_model_and_optimizer(cfg):
    """(model, DDP-wrapped chunks, megatron optimizer) for a resolved recipe; distributed state
    must be initialized (init_distributed)."""
    p, t, o = cfg.parallel, cfg.train, cfg.optimizer
    dtype = _DTYPE[t.precision]
    config = transformer_config(
        cfg.model, tensor_parallel=p.tensor, pipeline_parallel=p.pipeline, sequence_parallel=p.sequence_parallel,
        params_dtype=dtype, transformer_impl=cfg.model.transformer_impl, **transformer_overrides(p),
    )
    if p.tp_comm_overlap:
        _init_tp_comm_overlap(cfg, dtype)
    model = build_gpt_model(cfg.model, config, transformer_impl=cfg.model.transformer_impl)
    chunks = wrap_ddp([model], config, overlap_grad_reduce=p.overlap_grad_reduce,
                      use_distributed_optimizer=p.distributed_optimizer,
                      overlap_param_gather=p.overlap_param_gather, bucket_size=p.bucket_size)
    optimizer = build_optimizer(
        chunks, lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps, clip_grad=o.clip_grad,
        params_dtype=dtype, use_distributed_optimizer=p.distributed_optimizer,
        overlap_param_gather=p.overlap_param_gather, min_lr=o.lr * o.min_lr_ratio,
        adafactor=adafactor_settings(o),
    )
    return model, chunks, optimizer


def adafactor_settings(o) -> dict | None:
    """Adafactor's settings from the optimizer recipe, or None for AdamW."""
    if o.name != "adafactor":
        return None
    return dict(beta1=o.beta1, decay_rate=o.beta2_decay, clip_threshold=o.clip_threshold,
                scale_parameter=o.scale_parameter, weight_decay_lr_power=o.weight_decay_lr_power)


def run(cfg, notes: list[str]) -> dict:
    """Train; returns a summary (final losses, where things are, the exit code it asks for)."""
    p, t, o, s = cfg.parallel, cfg.train, cfg.optimizer, cfg.stability
    init_distributed(p.tensor, p.pipeline, seed=t.seed, timeout_minutes=process_group_timeout_minutes(s.hang_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = _DTYPE[t.precision]
    run_dir, ckpt_root = Path(t.run_dir), Path(t.run_dir) / "checkpoints"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        (run_dir / PAUSED_MARKER).unlink(missing_ok=True)  # this run goes on
    dist.barrier()

    model, chunks, optimizer = build_model_and_optimizer(cfg)
    scheduler = build_scheduler(optimizer, o, t.steps)
    detector = SpikeDetector.from_config(s)
    events = {"spikes": 0, "rollbacks": 0, "skipped_steps": 0, "sdc_probes": 0}
    goodput = Goodput()
    budget = RollbackBudget(s.max_rollbacks)

    # Resume from the newest verified checkpoint, else start from train.load, else from scratch.
    start_step, load_time = 0, 0.0
    t_load = time.perf_counter()
    if rank == 0:
        for aside in finish_interrupted_rollback(ckpt_root, run_dir / LEDGER_FILE):
            notes.append(f"{aside.name}: saved before a rollback that was interrupted; set aside")
    dist.barrier()
    resume_dir = newest_verified_checkpoint(ckpt_root, notes)
    if resume_dir is not None:
        state = checkpoint.load_checkpoint(chunks, resume_dir, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        detector.load_state_dict(state.get("spike_detector"))
        events.update(state.get("stability", {}))
        goodput = Goodput(state.get("goodput"))
        budget = RollbackBudget(s.max_rollbacks, state.get("rollback_budget"))
        notes.append(f"resumed from {resume_dir} (step {start_step})")
    elif t.load:
        reason = manifest.verify(Path(t.load))
        if reason:
            raise checkpoint.CheckpointError(f"train.load: {reason}")
        checkpoint.load_checkpoint(chunks, t.load)
        # With bf16 the optimizer copied the (random) weights into its fp32 main params when it was
        # built; without this the first step would overwrite the loaded weights with them.
        optimizer.reload_model_params()
        notes.append(f"initial weights from {t.load}")
    for c in chunks:
        c.broadcast_params()
    if resume_dir is not None or t.load:
        load_time = time.perf_counter() - t_load
        goodput.add("checkpoint_load", load_time)
    if rank == 0 and resume_dir is not None:  # the steps a crash lost since that checkpoint
        goodput.add("restart", logged_time_after(run_dir / "metrics.jsonl", start_step, cfg.logging.log_interval))

    n_micro = num_microbatches(cfg)
    dp_rank, seq, G = parallel_state.get_data_parallel_rank(), cfg.model.seq_length, t.global_batch_size
    # Data batch b holds ramp.global_batch(b) sequences from sample ramp.first_sample(b) on; without
    # train.batch_ramp that is G and b * G.
    ramp = batch_ramp.from_recipe(t, p.data)
    valid_samples = t.eval_batches * G
    # Built s.data_reserve_batches global batches longer than the run: batches the skip ledger
    # jumps over are replaced from there.
    ledger = SkipLedger(run_dir / LEDGER_FILE, s.data_reserve_batches)

    def consumed_samples(steps: int) -> int:
        """Samples read by the first `steps` steps (the end of step steps-1's global batch)."""
        return ramp.first_sample(ledger.batch_index(steps - 1) + 1) if steps else 0

    if resume_dir is not None and state.get("consumed_samples", consumed_samples(start_step)) != consumed_samples(start_step):
        raise LedgerError(f"{ledger.path}: with it, the {start_step} steps of {resume_dir} read "
                          f"{consumed_samples(start_step)} samples, but the checkpoint says {state['consumed_samples']}: "
                          f"the run directory lost (or gained) its skip ledger; restore it, or start a new train.run_dir")
    train_ds, valid_ds, source_names = build_datasets(
        cfg.data, seq, t.seed, ramp.first_sample(t.steps + s.data_reserve_batches), max(valid_samples, 1),
        cfg.data.cache_dir or str(run_dir / "data_cache"))

    n_params = count_parameters(model)
    flops_per_token = flops.flops_per_token(n_params, cfg.model)
    peak, peak_source = throughput.peak_flops_per_device(cfg.cluster.peak_flops_per_gpu)
    run_config = redact_secrets(OmegaConf.to_container(cfg))
    run_config["derived"] = {"world_size": world, "num_microbatches": n_micro, "num_parameters": n_params,
                             "flops_per_token": flops_per_token, "flops_formula": flops.FORMULA,
                             "peak_flops_per_device": peak, "peak_flops_source": peak_source, "notes": notes}
    metrics = MetricsLog(run_dir, cfg.logging, run_config, start_step, enabled=rank == 0)
    if rank == 0:
        for note in notes:
            print(f"[llama_plugin.train] {note}", flush=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(run_config)))

    benchmarks = None
    if t.eval_tasks:
        from llama_plugin.eval.in_loop import InLoopEval

        benchmarks = InLoopEval(cfg, chunks)

    def validation() -> float | None:
        if valid_ds is None or t.eval_batches == 0:
            return None
        vb = micro_batches(valid_ds, dp_rank * (valid_samples // p.data), valid_samples // p.data // t.micro_batch_size,
                           t.micro_batch_size)
        return eval_loss(chunks, vb)

    def save(step: int, prune: bool) -> None:
        if (ckpt_root / checkpoint.step_dir_name(step)).exists():
            return  # this step is saved already (a stop right after a periodic save)
        t0 = time.perf_counter()
        if p.overlap_param_gather:
            # The last update's all-gather is still pending (it runs in the next forward): finish it
            # so the checkpoint holds the updated weights.
            for c in chunks:
                c.disable_forward_pre_hook(param_sync=True)
        state = {"step": step, "scheduler": scheduler.state_dict(), "consumed_samples": consumed_samples(step),
                 "resume_fields": resume_fields(cfg), "spike_detector": detector.state_dict(),
                 "stability": dict(events), "goodput": goodput.state_dict(), "rollback_budget": budget.state_dict()}
        checkpoint.save_checkpoint(chunks, ckpt_root / checkpoint.step_dir_name(step), cfg.model, dtype,
                                   optimizer=optimizer, train_state=state)
        if p.overlap_param_gather:
            for c in chunks:
                c.enable_forward_pre_hook()
        # A run whose last step was not applied (non-finite) keeps its older checkpoints: they are
        # the way back. Retention keeps one old enough for a spike rollback.
        if rank == 0 and prune:
            checkpoint.prune_checkpoints(ckpt_root, t.keep_checkpoints,
                                         s.rollback_steps if s.spike_detection else None)
        goodput.add("checkpoint_save", time.perf_counter() - t0)

    def rollback(at_step: int, reason: str) -> int:
        """PaLM's protocol (stability/rollback.py): back to a verified checkpoint at least
        rollback_steps before `at_step`, the data from there on skipped through the spike plus
        skip_batches. The ledger entry is on disk before any checkpoint is set aside. Returns the
        step resumed at."""
        plan = rollback_plan(ckpt_root, at_step, s.rollback_steps, s.skip_batches)
        t0 = time.perf_counter()
        skipped = ledger.add(plan.skip_from_step, plan.skip, write=rank == 0, reason=reason, detected_at_step=at_step,
                             checkpoint=plan.target.name)
        dist.barrier()
        if rank == 0:  # checkpoints of the abandoned steps must never be resumed from
            set_aside_abandoned(ckpt_root, plan.target_step)
        dist.barrier()
        state = checkpoint.load_checkpoint(chunks, plan.target, optimizer)
        scheduler.num_steps = 0  # its load_state_dict adds the saved count to the current one
        scheduler.load_state_dict(state["scheduler"])
        detector.load_state_dict(state.get("spike_detector"))
        for c in chunks:
            c.broadcast_params()
        goodput.add("checkpoint_load", time.perf_counter() - t0)
        goodput.rolled_back(plan.target_step)
        events["rollbacks"] += 1
        budget.spend(at_step)
        if rank == 0:
            first = ledger.batch_index(plan.skip_from_step) - skipped
            print(f"[stability] step {at_step}: {reason}; rolled back to {plan.target.name}, skipping global batches "
                  f"{first}..{first + skipped - 1} from step {plan.skip_from_step} on ({skipped}: through step {at_step}'s "
                  f"batch plus stability.skip_batches={s.skip_batches}; ledger {ledger.path})", flush=True)
            if skipped < plan.skip:
                print(f"[stability] warning: the data reserve is used up (stability.data_reserve_batches="
                      f"{s.data_reserve_batches}); skipped {skipped} of {plan.skip}", flush=True)
        return plan.target_step

    def escalate_nonfinite(at_step: int, suspects: list[int]) -> int:
        """Rollbacks did not help: exit for a requeue without the node(s) of the ranks that
        produced the non-finite values, or fail when every rank did (nothing to exclude)."""
        hosts = [None] * world
        dist.all_gather_object(hosts, node_name())
        named = sorted({hosts[r] for r in suspects})
        what = (f"after {budget.futile} rollback(s) in a row, {s.max_consecutive_skips} non-finite steps again at step "
                f"{at_step} (stability.max_rollbacks={s.max_rollbacks})")
        if not suspects or len(suspects) == world:
            raise StabilityError(f"{what}, on every rank: not a faulty device that a requeue could leave out "
                                 f"(look at the data and the learning rate; skipped_batches.json)")
        if rank == 0:
            ranks = ", ".join(f"rank {r} on {hosts[r]}" for r in suspects)
            print(f"[stability] {what}; produced by {ranks}; exiting ({EXIT_REQUEUE}) for a requeue without "
                  f"{', '.join(named)}", file=sys.stderr, flush=True)
            write_requeue_request(run_dir, {"reason": "nonfinite", "step": at_step, "ranks": suspects,
                                            "hosts": named, "exclude_hosts": named})
        return EXIT_REQUEUE

    def count_sources(steps: int):
        total = np.zeros(len(source_names), dtype=np.int64)
        for first, stop in ledger.batch_ranges(steps):
            total += source_counts(train_ds, ramp.first_sample(first), ramp.first_sample(stop), len(source_names))
        return total

    stop = StopRequest(run_dir / STOP_FILE)
    # Per-source shares are logged by rank 0 only; other ranks skip the counting.
    consumed = count_sources(start_step) if rank == 0 else None
    bar = None
    if rank == 0 and cfg.logging.progress_bar:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (CI logs keep the plain log lines).
        bar = tqdm(total=t.steps, initial=start_step, desc=cfg.name, unit="step", dynamic_ncols=True,
                   mininterval=0.5, disable=None)
    # megatron's checkpoint writer spawns a helper process (a multiprocessing manager, seconds) at the
    # first save; started here, it is not mistaken for a stalled step by the hang watchdog.
    from megatron.core.dist_checkpointing.strategies.filesystem_async import _get_write_results_queue

    _get_write_results_queue()
    faults = FaultInjector(cfg.faults, chunks, run_dir) if any_enabled(cfg.faults) else None
    stragglers = StragglerMonitor(s.straggler_factor, run_dir)
    watchdog = HangWatchdog(run_dir, rank, s.hang_timeout_s, world)
    last_loss = last_val = None
    first_val = None
    window_tokens, window_time = 0, 0.0  # training steps only: evaluation and saving excluded
    final_step = t.exit_at_step or t.steps
    step = start_step
    stopped, exit_code, consecutive_skips = False, 0, 0
    goodput.add("restart", goodput.since_start() - load_time)
    while step < final_step:
        watchdog.progress(step)
        if faults:
            faults.before_step(step + 1)
        t0 = time.perf_counter()
        batch = ledger.batch_index(step)
        G_b = ramp.global_batch(batch)
        batches = micro_batches(train_ds, ramp.first_sample(batch) + dp_rank * (G_b // p.data),
                                ramp.num_microbatches(batch), t.micro_batch_size)
        if s.sdc_check_interval and (step + 1) % s.sdc_check_interval == 0:
            bad = recompute_check(chunks, batches[0])
            events["sdc_probes"] += 1
            goodput.add("sdc_checks", time.perf_counter() - t0)
            if bad:
                exit_code = report_sdc(run_dir, bad, step + 1, rank)
                save(step, prune=False)
                break
            t0 = time.perf_counter()
        arrived, report = [0.0], {}

        def before_grad_sync():
            # This rank's compute is done; what follows waits for the slowest data-parallel peer.
            if faults:
                faults.before_grad_sync(step + 1)
            arrived[0] = time.perf_counter() - t0

        loss, grad_norm, ok = train_step(chunks, optimizer, batches, before_grad_sync=before_grad_sync,
                                         after_backward=(lambda: faults.after_backward(step + 1)) if faults else None,
                                         report=report)
        if faults:
            loss = faults.observed_loss(step + 1, loss)
        lr = optimizer.param_groups[0]["lr"]
        if ok:
            scheduler.step(increment=1)  # the schedule counts applied updates
            budget.progress(step + 1)
        else:
            suspects = report.get("nonfinite_ranks", [])
        slow, slowest = stragglers.check(arrived[0])
        step_time = time.perf_counter() - t0
        if rank == 0:
            consumed += source_counts(train_ds, ramp.first_sample(batch), ramp.first_sample(batch + 1), len(source_names))
        step += 1
        goodput.step(step, step_time, ok)
        window_tokens += G_b * seq
        window_time += step_time
        last_loss = loss if ok else float("nan")
        consecutive_skips = 0 if ok else consecutive_skips + 1
        if not ok:
            events["skipped_steps"] += 1
            if rank == 0:
                print(f"[stability] step {step}: a non-finite loss or grad norm (ranks {suspects} produced non-finite "
                      f"values; here: loss {loss}, grad norm {grad_norm}); update skipped on every rank "
                      f"({consecutive_skips} in a row)", flush=True)
        # Every rank takes the same decision (the losses agree, but one rank's verdict must not
        # leave the others in a collective): one flag, all-reduced.
        spike = agreed(detector.check(step, loss) if ok else None, "a loss spike seen by another rank")
        if spike:
            events["spikes"] += 1
        if rank == 0 and slow:
            print(f"[stability] step {step}: straggler(s): " + ", ".join(
                f"rank {r} ({h}) at {ratio:.2f}x the median step time" for r, h, ratio in slow), flush=True)
        m = {}
        if step % t.eval_interval == 0 or step == t.steps:
            t_eval = time.perf_counter()
            last_val = validation()
            goodput.add("evaluation", time.perf_counter() - t_eval)
            if last_val is not None:
                m["val/loss"] = last_val
                first_val = last_val if first_val is None else first_val
        if benchmarks and (step % (t.eval_tasks_interval or t.eval_interval) == 0 or step == t.steps):
            t_eval = time.perf_counter()
            m.update(benchmarks())
            goodput.add("evaluation", time.perf_counter() - t_eval)
        if step % cfg.logging.log_interval == 0 or m or spike or not ok:
            m.update({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "step_time_s": step_time,
                      "tokens_seen": ramp.first_sample(step) * seq, "train/global_batch_size": G_b, "train/skipped_update": int(not ok),
                      "stability/spikes": events["spikes"], "stability/rollbacks": events["rollbacks"],
                      "stability/skipped_steps": events["skipped_steps"],
                      "stability/skipped_batches": ledger.skipped_total,
                      "stability/stragglers": len(slow), "stability/slowest_rank_ratio": slowest})
            m.update(throughput.speed_metrics(window_tokens, window_time, world, flops_per_token, peak))
            m["memory/max_allocated_gb"] = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                                            else _peak_rss_bytes()) / 2**30
            if rank == 0:
                for name, count in zip(source_names, consumed):
                    m[f"data/{name}_share"] = float(count) / float(consumed.sum())
                m.update(goodput.metrics())
            metrics.log(step, m)
            stragglers.log(step)
            if rank == 0:
                line = format_line(step, t.steps, m)
                (bar.write(line) if bar and not bar.disable else print(line, flush=True))
            window_tokens, window_time = 0, 0.0  # training steps only: evaluation and saving excluded
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        if (spike or consecutive_skips >= s.max_consecutive_skips) and budget.exhausted():
            if not spike:
                exit_code = escalate_nonfinite(step, suspects)
                break
            detector.load_state_dict(None)
            budget.reset()
            if rank == 0:
                print(f"[stability] step {step}: {spike}, after {s.max_rollbacks} rollback(s) in a row "
                      f"(stability.max_rollbacks): a lasting change of the loss, accepted; the spike window starts afresh",
                      flush=True)
            spike = None
        if spike or consecutive_skips >= s.max_consecutive_skips:
            step = rollback(step, spike or f"{consecutive_skips} non-finite steps in a row")
            metrics.rolled_back(step)
            watchdog.progress(step)
            consecutive_skips = 0
            consumed = count_sources(step) if rank == 0 else None
            if bar:
                bar.n = step
            continue
        stop_now = stop.agreed(device()) or bool(t.exit_interval and step % t.exit_interval == 0)
        if step % t.save_interval == 0 or step == final_step or stop_now:
            watchdog.progress(step)
            save(step, prune=ok)
            watchdog.progress(step)
        if stop_now and step < final_step:
            stopped = True
            break
    watchdog.close()
    if bar:
        bar.close()
    summary = {
        "run_dir": str(run_dir), "step": step, "finished": step >= t.steps and not exit_code, "stopped": stopped,
        "train_loss": last_loss, "val_loss": last_val, "first_val_loss": first_val,
        "metrics_jsonl": str(metrics.jsonl), "wandb_dir": metrics.wandb_dir,
        "checkpoint": str(ckpt_root / checkpoint.step_dir_name(step)), "exit_code": exit_code,
        "stability": {**events, "skipped_batches": ledger.skipped_total}, "goodput": goodput.state_dict(),
        "goodput_share": goodput.metrics()["goodput/share"],
    }
    metrics.close()
    if rank == 0:
        _write_json_atomic(run_dir / RUN_STATE, summary)
        if stopped:
            stop.stop_file.unlink(missing_ok=True)  # served; a resumed run must not stop at once
        if summary["finished"]:
            _write_json_atomic(run_dir / FINISHED_MARKER, {"step": step, "checkpoint": summary["checkpoint"]})
        elif t.exit_at_step and step >= t.exit_at_step and not stopped and not exit_code:
            _write_json_atomic(run_dir / PAUSED_MARKER, {"step": step, "exit_at_step": t.exit_at_step})
    dist.barrier()
    return summary


def agreed(reason: str | None, elsewhere: str) -> str | None:
    """Collective: `reason` if this rank has one, `elsewhere` if only another rank does, else None."""
    flag = torch.tensor([1.0 if reason else 0.0], device=device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return reason or (elsewhere if flag.item() else None)


def report_sdc(run_dir: Path, bad: list[tuple[int, str]], step: int, rank: int) -> int:
    """Name the ranks whose own computation differed (stability/sdc.py); ask for a requeue without
    their node.

    A data-parallel rank computes alone; a pipeline stage that received the same activations (and
    gradients) in both passes but produced different ones is the faulty one, not the stages after
    it. Tensor-parallel peers share activations, so they are named together, but they share a node
    (slurm.launch keeps TP within one). Named ranks on several nodes do not localize the fault, and
    no node is excluded.
    """
    hosts = sorted({h for _, h in bad})
    exclude = hosts if len(hosts) == 1 else []
    if rank == 0:
        names = ", ".join(f"rank {r} on {h}" for r, h in bad)
        where = (f"for a requeue without {exclude[0]}" if exclude else
                 "for a requeue; the ranks span several nodes (pipeline stages pass corruption on), so no node "
                 "is excluded")
        print(f"[stability] silent data corruption at step {step}: {names} computed the same micro-batch twice "
              f"with different results; checkpointing and exiting ({EXIT_SDC}) {where}", file=sys.stderr, flush=True)
        write_requeue_request(run_dir, {"reason": "sdc", "step": step, "ranks": [r for r, _ in bad], "hosts": hosts,
                                        "exclude_hosts": exclude})
    return EXIT_SDC


def logged_time_after(jsonl: Path, step: int, log_interval: int) -> float:
    """Seconds of the steps after `step` in metrics.jsonl (logged every log_interval steps): what a
    crash lost."""
    lost = 0.0
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            try:
                row = json.loads(line)
                if row["step"] > step:
                    lost += float(row.get("step_time_s", 0.0)) * log_interval
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                pass
    return lost


def newest_verified_checkpoint(ckpt_root: Path, notes: list[str]) -> Path | None:
    """Collective: the newest complete checkpoint whose files match their manifest. Newer ones that
    do not (a torn write, a flipped byte) are set aside as <name>.corrupt-<n>, with a note."""
    for _, ckpt in reversed(checkpoint.complete_checkpoints(ckpt_root)):
        reason = manifest.verify(ckpt)
        if reason is None:
            if manifest.read_manifest(ckpt) is None:
                notes.append(f"warning: {ckpt} has no manifest (written before manifests); loaded unverified")
            return ckpt
        dist.barrier()
        if dist.get_rank() == 0:
            aside = checkpoint.set_aside(ckpt)
            print(f"[llama_plugin.train] warning: {reason}; set aside as {aside.name}, trying an older checkpoint",
                  file=sys.stderr, flush=True)
        notes.append(f"warning: {ckpt} failed verification ({reason}); set aside")
        dist.barrier()
    return None


def count_parameters(model) -> int:
    """Parameters of the whole model from this rank's part: tensor-parallel shards summed over the
    model-parallel group, replicated weights (norms) counted once."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
    total = torch.tensor([local], dtype=torch.int64, device=device())
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total.item())


def _peak_rss_bytes() -> int:
    """On a CPU: this process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Fields a resumed run must share with the checkpoint to continue exactly: the data order (batch,
# sequence, seed, steps -> dataset size, sources), the schedule (weight decay is also part of the
# optimizer's saved param groups, which megatron asserts on after the model is built), and for the distributed optimizer
# (saved per data-parallel shard of its buckets) the model-parallel layout and bucket size.
_RESUME_FIELDS = ("train.global_batch_size", "train.batch_ramp", "optimizer.name", "optimizer.warmup_style",
                  "model.seq_length", "train.seed", "train.steps", "data.sources",
                  "data.split", "optimizer.lr", "optimizer.min_lr_ratio", "optimizer.warmup_steps",
                  "optimizer.decay_steps", "optimizer.decay_style", "optimizer.weight_decay",
                  "parallel.distributed_optimizer", "stability.data_reserve_batches")
_DISTOPT_RESUME_FIELDS = ("parallel.tensor", "parallel.pipeline", "parallel.bucket_size")


def resume_fields(cfg) -> dict:
    keys = _RESUME_FIELDS + (_DISTOPT_RESUME_FIELDS if cfg.parallel.distributed_optimizer else ())
    fields = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v := OmegaConf.select(cfg, k)) else v for k in keys}
    # A source's planned epochs do not change the data order (and checkpoints before the field lack it).
    fields["data.sources"] = {n: {"prefix": s["prefix"], "weight": s["weight"]} for n, s in fields["data.sources"].items()}
    return fields


def check_resume(cfg) -> None:
    """Before any work: a run directory's newest checkpoint must fit the recipe (or the load must)."""
    for _, ckpt in reversed(checkpoint.complete_checkpoints(Path(cfg.train.run_dir) / "checkpoints")):
        try:  # a torn newest checkpoint is set aside later (newest_verified_checkpoint); compare with the next
            saved = json.loads((ckpt / checkpoint.TRAIN_STATE_FILE).read_text()).get("resume_fields", {})
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        now = resume_fields(cfg)
        for key, value in saved.items():
            if key in now and now[key] != value:
                raise RecipeError(f"{key}: {now[key]!r} differs from {value!r} in {ckpt}; an exact resume "
                                  f"needs the same value (or use a new train.run_dir)")
        return
    if cfg.train.load:
        saved_model, _ = checkpoint.read_model_record(cfg.train.load)
        for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "vocab_size"):
            if saved_model[key] != cfg.model[key]:
                raise RecipeError(f"model.{key}: {cfg.model[key]} but train.load={cfg.train.load} has {saved_model[key]}")


def load_recipe(argv: list[str]):
    """The validated config from command-line arguments: `<recipe> [overrides]` or
    `--config <composed recipe.yaml> [overrides]`."""
    if argv and argv[0] == "--config":
        if len(argv) < 2:
            raise RecipeError("--config needs a file")
        return load_file(argv[1], argv[2:], RecipeConfig)
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        raise RecipeError("usage: python -m llama_plugin.train <recipe> [overrides]; recipes: "
                          + ", ".join(sorted(f.stem for f in Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml")
                                             if f.stem != "describe")))
    return compose(argv[0], argv[1:], RecipeConfig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg = load_recipe(argv)
        cfg, notes = resolve(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        check_data_files(cfg.data, cfg.model.vocab_size)
        check_resume(cfg)
        SkipLedger(Path(cfg.train.run_dir) / LEDGER_FILE, cfg.stability.data_reserve_batches)  # readable, fits
    except (RecipeError, ModelConfigError, checkpoint.CheckpointError, LedgerError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg, notes)
    except (checkpoint.CheckpointError, LedgerError, StabilityError, DeviceError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary), flush=True)
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
