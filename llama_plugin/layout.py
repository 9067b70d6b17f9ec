"""The parallel plan: a recipe checked against the world it runs in, before any work starts.

`resolve(cfg, world_size)` returns the recipe with `parallel.data` filled in and knobs that cannot
apply turned off, plus notes saying what was turned off and why. Everything inconsistent raises a
RecipeError naming the field.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from llama_plugin.model import ModelConfigError, check_model_shape
from llama_plugin.layers.spec import IMPLS, te_importable
from llama_plugin.stability.checks import check_stability
from recipes import RecipeError

CHOICES = {
    "optimizer.decay_style": ("cosine", "linear", "constant", "inverse-square-root"),
    "optimizer.name": ("adamw", "adafactor"),
    "optimizer.warmup_style": ("linear", "constant"),
    "parallel.recompute": ("none", "selective", "full"),
    "train.precision": ("bf16", "fp32"),
    "model.transformer_impl": IMPLS,
    "logging.wandb_mode": ("offline", "online", "disabled"),
}
POSITIVE = (
    "train.steps", "train.global_batch_size", "train.micro_batch_size", "train.eval_interval",
    "train.save_interval", "train.keep_checkpoints", "logging.log_interval", "parallel.tensor",
    "parallel.pipeline", "optimizer.lr", "cluster.nodes", "cluster.gpus_per_node",
)


def _get(cfg, dotted):
    return OmegaConf.select(cfg, dotted)


def resolve(cfg, world_size: int, have_te: bool | None = None, have_cuda: bool | None = None):
    """(resolved mutable config, notes). Raises RecipeError naming the first bad field."""
    have_cuda = torch.cuda.is_available() if have_cuda is None else have_cuda
    have_te = te_importable() if have_te is None else have_te
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    notes = []
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise RecipeError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise RecipeError(f"{key}: must be > 0, got {_get(cfg, key)}")
    p, t, o = cfg.parallel, cfg.train, cfg.optimizer
    if cfg.model.transformer_impl == "te" and not have_te:
        raise RecipeError("model.transformer_impl: 'te' needs TransformerEngine, which does not import here "
                          "(install it, or use the default 'local')")

    model_parallel = p.tensor * p.pipeline
    if world_size % model_parallel:
        raise RecipeError(
            f"parallel.tensor * parallel.pipeline = {p.tensor} * {p.pipeline} does not divide the world size {world_size}")
    if p.data is None:
        p.data = world_size // model_parallel
    elif model_parallel * p.data != world_size:
        raise RecipeError(
            f"parallel.data: tensor * pipeline * data = {p.tensor} * {p.pipeline} * {p.data} != world size {world_size}")
    if t.global_batch_size % (t.micro_batch_size * p.data):
        raise RecipeError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by micro_batch_size * data-parallel "
            f"size = {t.micro_batch_size} * {p.data}")
    previous = 0
    for i, stage in enumerate(t.batch_ramp):
        if stage.global_batch_size < 1 or stage.global_batch_size % (t.micro_batch_size * p.data):
            raise RecipeError(
                f"train.batch_ramp[{i}].global_batch_size: {stage.global_batch_size} is not a positive multiple of "
                f"micro_batch_size * data-parallel size = {t.micro_batch_size} * {p.data}")
        if not previous < stage.until_step < t.steps:
            raise RecipeError(f"train.batch_ramp[{i}].until_step: {stage.until_step} must lie after the previous "
                              f"stage's ({previous}) and before train.steps={t.steps}")
        previous = stage.until_step
    if t.eval_tasks:
        from llama_plugin.eval.generation_tasks import IN_LOOP_GENERATIVE
        from llama_plugin.eval.tasks import MMLU, OLMO_TASKS

        known = [*OLMO_TASKS, MMLU, *IN_LOOP_GENERATIVE]
        for task in t.eval_tasks:
            if task not in known:
                raise RecipeError(f"train.eval_tasks: unknown task {task!r}; known in the loop: {', '.join(known)}")
        for key in ("eval_tasks_interval", "eval_tasks_limit", "eval_tasks_max_new_tokens"):
            if t[key] is not None and t[key] < 1:
                raise RecipeError(f"train.{key}: must be >= 1 or null, got {t[key]}")
    try:
        check_model_shape(cfg.model, p.tensor, p.pipeline, p.first_stage_layers, p.last_stage_layers)
    except ModelConfigError as e:
        raise RecipeError(str(e)) from None

    if p.sequence_parallel and p.tensor == 1:
        p.sequence_parallel = False
        notes.append("parallel.sequence_parallel turned off: it needs parallel.tensor > 1")
    if p.sequence_parallel and cfg.model.seq_length % p.tensor:
        raise RecipeError(f"model.seq_length: {cfg.model.seq_length} is not divisible by parallel.tensor={p.tensor} "
                          "(sequence parallelism splits the sequence)")
    if p.overlap_param_gather and not p.distributed_optimizer:
        raise RecipeError("parallel.overlap_param_gather: needs parallel.distributed_optimizer=true")
    if p.tp_comm_overlap:
        missing = [why for ok, why in (
            (have_cuda, "CUDA"), (cfg.model.transformer_impl == "te", "model.transformer_impl=te"),
            (p.tensor > 1, "parallel.tensor > 1"),
            (p.sequence_parallel, "parallel.sequence_parallel")) if not ok]
        if missing:
            p.tp_comm_overlap = False
            notes.append(f"parallel.tp_comm_overlap turned off: it needs {', '.join(missing)}")

    decay_steps = o.decay_steps if o.decay_steps is not None else t.steps
    if not 0 <= o.min_lr_ratio <= 1:
        raise RecipeError(f"optimizer.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < 0 or (o.decay_style != "constant" and o.warmup_steps >= decay_steps):
        raise RecipeError(f"optimizer.warmup_steps: {o.warmup_steps} must be >= 0 and below the decay steps ({decay_steps})")
    if o.clip_grad < 0 or o.weight_decay < 0 or not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1) or o.eps <= 0:
        bad = next(k for k, ok in (("clip_grad", o.clip_grad >= 0), ("weight_decay", o.weight_decay >= 0),
                                   ("beta1", 0 <= o.beta1 < 1), ("beta2", 0 <= o.beta2 < 1), ("eps", o.eps > 0)) if not ok)
        raise RecipeError(f"optimizer.{bad}: out of range ({o[bad]})")
    if t.exit_at_step is not None and not 0 < t.exit_at_step <= t.steps:
        raise RecipeError(f"train.exit_at_step: must be in [1, train.steps={t.steps}], got {t.exit_at_step}")
    if t.exit_interval is not None and t.exit_interval <= 0:
        raise RecipeError(f"train.exit_interval: must be > 0, got {t.exit_interval}")
    if t.eval_batches < 0:
        raise RecipeError(f"train.eval_batches: must be >= 0, got {t.eval_batches}")
    check_stability(cfg, world_size)
    return cfg, notes


def num_microbatches(cfg) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * cfg.parallel.data)
