"""Model checkpoints: a megatron-core distributed checkpoint plus the model recipe beside it.

Layout of a checkpoint directory:
    llama_model.json      the model recipe (recipes/schema.py ModelConfig) and the parameter dtype
    hf_config.json        optional: the Hugging Face config.json the weights came from
    train_state.json      training checkpoints: step, scheduler state, samples consumed
    metadata.json, ...    megatron-core dist_checkpointing (torch_dist) files

A distributed checkpoint stores global tensors, so its weights load into any TP/PP layout the shape
allows; the distributed optimizer's state is per data-parallel shard of its buckets (see
OPTIMIZER_METADATA), so a training resume with it keeps TP, PP and the bucket size.
Saving is atomic and verified: everything is written to a temporary sibling directory, every rank
fsyncs what it wrote, manifest.json records a checksum per file (stability/manifest.py), and only
then is the directory renamed into place; a crash never leaves a directory that looks like a
checkpoint, and training never resumes from one whose files do not match their manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from omegaconf import OmegaConf

from llama_plugin.stability import manifest
from recipes.schema import ModelConfig
from recipes import validate

MODEL_FILE = "llama_model.json"
HF_CONFIG_FILE = "hf_config.json"
TRAIN_STATE_FILE = "train_state.json"
# The distributed optimizer's state is saved per data-parallel shard ("dp_reshardable"): without
# TransformerEngine/apex the default format fails on save (flattened ranges) and the fully
# reshardable one on load; this one resumes exactly at the same data-parallel size.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or does not fit the model; names the file."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unwrap(chunk):
    """The GPTModel inside a DDP wrapper: checkpoints name parameters as the bare model does."""
    return getattr(chunk, "module", chunk)


def model_sharded_state_dict(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(m).sharded_state_dict() for i, m in enumerate(model_chunks)}


def save_checkpoint(model_chunks, out_dir, model_cfg, dtype: torch.dtype, optimizer=None,
                    train_state: dict | None = None, extra_files: dict | None = None) -> None:
    """Collective: every rank calls it with its own model chunks (and optimizer, for training).

    `train_state` (step, scheduler, ...) is written as train_state.json; the directory appears
    under its final name only once every file is on disk.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    rank = dist.get_rank()
    if out_dir.exists():  # every rank checks (shared file system), so all raise rather than hang
        raise CheckpointError(f"{out_dir}: already exists; refusing to overwrite a checkpoint")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        train_state = dict(train_state or {}, adam_steps=_adam_steps(optimizer))
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"] if len(model_chunks) == 1 else state, metadata=OPTIMIZER_METADATA)
    dist_checkpointing.save(state, str(tmp))
    # "manifest": this checkpoint has one (stability/manifest.py refuses it if manifest.json is gone).
    record = {"model": OmegaConf.to_container(model_cfg), "params_dtype": dtype_name(dtype), "manifest": True}
    if rank == 0:
        files = {MODEL_FILE: json.dumps(record, indent=2) + "\n", **(extra_files or {})}
        if train_state is not None:
            files[TRAIN_STATE_FILE] = json.dumps(train_state, indent=2) + "\n"
        for name, text in files.items():
            (tmp / name).write_text(text)
    dist.barrier()
    # Every rank fsyncs and hashes its own files; then the rename, made durable by the parent's fsync.
    manifest.write_manifest(tmp, {"model": record, "resume_fields": (train_state or {}).get("resume_fields")})
    if rank == 0:
        os.replace(tmp, out_dir)
        manifest.fsync_dir(out_dir.parent)
    dist.barrier()


def set_aside(ckpt_dir) -> Path:
    """Rename a checkpoint that failed verification out of the way (kept for inspection, never
    loaded or pruned): <name>.corrupt-<n>."""
    ckpt_dir = Path(ckpt_dir)
    n = 1
    while (target := ckpt_dir.with_name(f"{ckpt_dir.name}.corrupt-{n}")).exists():
        n += 1
    os.replace(ckpt_dir, target)
    return target


def read_model_record(ckpt_dir) -> tuple:
    """(ModelConfig, params dtype) stored with a checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / MODEL_FILE
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; not a checkpoint written by llama_plugin")
    if not (ckpt_dir / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt_dir / 'metadata.json'}: missing; incomplete distributed checkpoint")
    try:
        record = json.loads(path.read_text())
        model_cfg = validate(OmegaConf.create(record["model"]), ModelConfig)
        dtype = _DTYPES[record["params_dtype"]]
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable model record ({e})") from None
    return model_cfg, dtype


def load_checkpoint(model_chunks, ckpt_dir, optimizer=None) -> dict | None:
    """Collective: load weights (and optimizer state) into this rank's chunks, whatever the layout.

    Returns the train_state.json contents when present.
    """
    ckpt_dir = Path(ckpt_dir)
    read_model_record(ckpt_dir)
    template = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        _prime_distributed_optimizer_state(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(
            template["model"] if len(model_chunks) == 1 else template, is_loading=True, metadata=OPTIMIZER_METADATA)
    keys = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    with torch.no_grad():
        # TransformerEngine's attention core keeps `_extra_state` (FP8 scaling metadata) that
        # checkpoints of the local modules and converted HF weights lack; everything else must be
        # there. StrictHandling.RETURN_UNEXPECTED (megatron-core dist_checkpointing/validation.py)
        # returns the requested keys the checkpoint lacks ("unexpected" in its terms) and leaves
        # them out of the load; it needs no global metadata exchange.
        state, _, lacking = dist_checkpointing.load(template, str(ckpt_dir), strict=StrictHandling.RETURN_UNEXPECTED)
    absent = sorted(k for k in lacking if not k.endswith("_extra_state"))
    if absent:
        raise CheckpointError(f"{ckpt_dir}: tensors missing from the checkpoint: {', '.join(absent[:5])}")
    for chunk, key in zip(model_chunks, keys):
        result = _unwrap(chunk).load_state_dict(state[key], strict=False)
        bad = [k for k in result.missing_keys if not k.endswith("_extra_state")] + list(result.unexpected_keys)
        if bad:
            raise CheckpointError(f"{ckpt_dir}: does not fit the model: {', '.join(bad[:5])}")
    path = ckpt_dir / TRAIN_STATE_FILE
    train_state = json.loads(path.read_text()) if path.is_file() else None
    if optimizer is not None:
        with torch.no_grad():  # the distributed optimizer copies into views of its fp32 main params
            optimizer.load_state_dict(state["optimizer"])
        if train_state and "adam_steps" in train_state:
            _set_adam_steps(optimizer, train_state["adam_steps"])
    return train_state


def _inner_optimizers(optimizer) -> list:
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _adam_steps(optimizer) -> list:
    """Adam's step count per inner optimizer (None before the first step)."""
    steps = []
    for inner in _inner_optimizers(optimizer):
        values = {float(s["step"]) for s in inner.state.values() if "step" in s}
        steps.append(values.pop() if len(values) == 1 else None)
    return steps


def _step_per_parameter(inner) -> bool:
    """Whether an inner optimizer keeps Adam's step in each parameter's state (torch's Adam(W), our
    Adafactor) rather than in its parameter groups (TransformerEngine's and apex's FusedAdam, which
    megatron picks where they import: their state_dict() fails on a per-parameter 'step')."""
    return not type(inner).__module__.startswith(("transformer_engine", "apex"))


def _set_adam_steps(optimizer, steps: list) -> None:
    """Restore Adam's step counts: without TE/apex the distributed optimizer's dp_reshardable load
    leaves them at the primed 0, which would redo the bias correction of the first steps. (FusedAdam
    keeps its step in the parameter groups, which megatron's load restores.)"""
    for inner, step in zip(_inner_optimizers(optimizer), steps):
        if step is not None and _step_per_parameter(inner):
            for s in inner.state.values():
                s["step"] = torch.tensor(float(step))


def _prime_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh DistributedOptimizer zero Adam state at step 0 before loading into it.

    Without TE/apex its state_dict() (called to build the load template) requires every parameter
    to carry an Adam 'step'; a fresh optimizer has none. The real moments and step then come from
    the checkpoint.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or len(opt.optimizer.state) or not _step_per_parameter(opt.optimizer):
            continue  # FusedAdam's state_dict() reads the step from its groups: nothing to prime
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                opt.optimizer.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                                          "step": torch.tensor(0.0)}


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ckpt_root) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints under `ckpt_root`, oldest first.

    Only directories renamed into place count; a `.tmp` left by a crash is not a checkpoint.
    """
    root = Path(ckpt_root)
    found = []
    for d in root.glob("step_*") if root.is_dir() else []:
        name = d.name.removeprefix("step_")
        if d.is_dir() and name.isdigit() and (d / MODEL_FILE).is_file() and (d / TRAIN_STATE_FILE).is_file():
            found.append((int(name), d))
    return sorted(found)


def prune_checkpoints(ckpt_root, keep: int, rollback_steps: int | None = None) -> None:
    """Delete all but the newest `keep` complete checkpoints, and stale temporary directories.

    With `rollback_steps`, the newest checkpoint at least that many steps before the step after the
    newest one is kept too: a loss spike right after it must find one to roll back to.
    """
    complete = complete_checkpoints(ckpt_root)
    kept = {d for _, d in complete[-keep:]}
    if rollback_steps is not None and complete:
        limit = complete[-1][0] + 1 - rollback_steps
        older = [d for step, d in complete if step <= limit]
        if older:
            kept.add(older[-1])
    for _, d in complete:
        if d not in kept:
            shutil.rmtree(d, ignore_errors=True)
    for d in Path(ckpt_root).glob("step_*.tmp"):
        shutil.rmtree(d, ignore_errors=True)
    # Set aside by a rollback (stability/rollback.py): no longer needed once the kept trajectory
    # has a checkpoint at or past their step.
    for d in Path(ckpt_root).glob("step_*.abandoned-*"):
        step = d.name.removeprefix("step_").split(".")[0]
        if complete and step.isdigit() and int(step) <= complete[-1][0]:
            shutil.rmtree(d, ignore_errors=True)
