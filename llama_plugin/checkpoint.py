"""Model checkpoints: a megatron-core distributed checkpoint plus the model recipe beside it.

Layout of a checkpoint directory:
    llama_model.json      the model recipe (recipes/schema.py ModelConfig) and the parameter dtype
    hf_config.json        optional: the Hugging Face config.json the weights came from
    metadata.json, ...    megatron-core dist_checkpointing (torch_dist) files

A distributed checkpoint stores global tensors, so it loads into any TP/PP layout the shape allows.
Saving is atomic: everything is written to a temporary sibling directory that is renamed into place
only when complete, so a crash never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from omegaconf import OmegaConf

from recipes.schema import ModelConfig
from recipes import validate

MODEL_FILE = "llama_model.json"
HF_CONFIG_FILE = "hf_config.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or does not fit the model; names the file."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_sharded_state_dict(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(model_chunks)}


def save_model_checkpoint(model_chunks, out_dir, model_cfg, dtype: torch.dtype, extra_files=None):
    """Collective: every rank calls it with its own model chunks."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        if out_dir.exists():
            raise CheckpointError(f"{out_dir}: already exists; refusing to overwrite a checkpoint")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(model_chunks), str(tmp))
    if rank == 0:
        record = {"model": OmegaConf.to_container(model_cfg), "params_dtype": dtype_name(dtype)}
        (tmp / MODEL_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _fsync_dir(tmp)
        os.replace(tmp, out_dir)
    dist.barrier()


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


def load_model_checkpoint(model_chunks, ckpt_dir) -> None:
    """Collective: load the weights into this rank's model chunks, in whatever layout they are."""
    read_model_record(ckpt_dir)
    state = dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(ckpt_dir))
    keys = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    for chunk, key in zip(model_chunks, keys):
        chunk.load_state_dict(state[key], strict=True)


def _fsync_dir(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
