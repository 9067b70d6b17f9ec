"""DeepSpeed checkpoints for exact resume, written atomically.

Layout: <run_dir>/checkpoints/step_NNNNNNNN/
    deepspeed/            engine.save_checkpoint (module, ZeRO-partitioned optimizer state)
    rng_rank<R>.pt        each rank's torch RNG state (LoRA dropout continues exactly)
    train_state.json      step and the recipe fields an exact resume must share
    manifest.json         size and SHA-256 of every file (llama_plugin/stability/manifest.py)
Each is written as step_NNNNNNNN.tmp, every rank fsyncs and hashes its own files, and the directory
is renamed when complete (the rename made durable); only renamed ones count, and a resume takes
the newest one that matches its manifest, setting aside (step_*.corrupt-<n>) any newer that does not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from llama_plugin.stability import manifest

TAG = "deepspeed"
TRAIN_STATE = "train_state.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete(root) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints, oldest first."""
    root = Path(root)
    found = []
    for d in root.glob("step_*") if root.is_dir() else []:
        name = d.name.removeprefix("step_")
        if name.isdigit() and (d / TRAIN_STATE).is_file() and (d / TAG).is_dir():
            found.append((int(name), d))
    return sorted(found)


def save(engine, root: Path, step: int, train_state: dict, keep: int) -> Path:
    """Collective: every rank writes its shards; rank 0 renames the directory into place."""
    rank = dist.get_rank()
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=TAG, client_state={"step": step}, save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=2) + "\n")
    dist.barrier()
    manifest.write_manifest(tmp, {"resume_fields": train_state.get("resume_fields")},
                            owner=manifest.written_by_deepspeed)
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        manifest.fsync_dir(final.parent)
        for _, old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in Path(root).glob("step_*.tmp"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def newest_verified(root) -> Path | None:
    """Collective: the newest complete checkpoint that matches its manifest; newer ones that do not
    are set aside as <name>.corrupt-<n> with a warning."""
    from llama_plugin.checkpoint import set_aside

    for _, ckpt in reversed(complete(root)):
        reason = manifest.verify(ckpt)
        if reason is None:
            return ckpt
        dist.barrier()
        if dist.get_rank() == 0:
            aside = set_aside(ckpt)
            print(f"[finetune] warning: {reason}; set aside as {aside.name}, trying an older checkpoint", flush=True)
        dist.barrier()
    return None


def load(engine, ckpt: Path) -> dict:
    """Restore module, optimizer and this rank's RNG from `ckpt`; returns train_state."""
    path, client = engine.load_checkpoint(str(ckpt), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"{ckpt}: DeepSpeed found no checkpoint under tag {TAG!r}")
    rng = ckpt / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((ckpt / TRAIN_STATE).read_text())


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
