"""Checkpoint manifests: a checkpoint loads only if every file is there, whole and unchanged.

`manifest.json` lists each file of a checkpoint directory with its size and SHA-256, and a hash of
the configuration it was saved under. Writing (collective, before the directory is renamed into
place): each rank fsyncs and hashes the files it wrote itself (torch_dist names them
`__<rank>_<i>.distcp`; rank 0 owns the rest), because on a shared file system only the writer's
fsync reaches the disk; rank 0 gathers the digests and writes the manifest. Verifying (collective):
rank r re-hashes every world-th file, so the work is spread like the writing was.
A directory without a manifest is accepted (with a warning, never preferred over a verified one)
only if it predates manifests: its model record (llama_model.json) lacks the `"manifest": true`
that every checkpoint written with manifests carries. One whose record says it had a manifest, or
that has no record, is a partly deleted or damaged checkpoint and is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch.distributed as dist

MANIFEST = "manifest.json"
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def written_by(name: str, rank: int) -> bool:
    m = _RANK_FILE.match(name)
    return int(m.group(1)) == rank if m else rank == 0


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


_DEEPSPEED_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")


def written_by_deepspeed(name: str, rank: int) -> bool:
    """DeepSpeed checkpoints: each data-parallel rank writes its ZeRO shards
    (zero_pp_rank_<r>_...) and the trainer its RNG state (rng_rank<r>.pt); rank 0 the rest."""
    m = _DEEPSPEED_RANK_FILE.search(name)
    return int(m.group(1)) == rank if m else rank == 0


def write_manifest(ckpt_dir: Path, config: dict, owner=written_by) -> None:
    """Collective: fsync and hash this rank's files (subdirectories included; `owner(name, rank)`
    says who wrote a file); rank 0 writes manifest.json and fsyncs the directories. Call when every
    file is written (after a barrier)."""
    ckpt_dir = Path(ckpt_dir)
    rank = dist.get_rank()
    mine = {}
    for p in sorted(ckpt_dir.rglob("*")):
        name = p.relative_to(ckpt_dir).as_posix()
        if name != MANIFEST and owner(p.name, rank) and p.is_file():  # stat only this rank's files
            fsync_file(p)
            mine[name] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        files = {name: entry for part in gathered for name, entry in part.items()}
        manifest = {"files": dict(sorted(files.items())), "config_sha256": config_hash(config)}
        path = ckpt_dir / MANIFEST
        path.write_text(json.dumps(manifest, indent=1) + "\n")
        fsync_file(path)
        for d in [ckpt_dir, *(p for p in ckpt_dir.rglob("*") if p.is_dir())]:
            fsync_dir(d)
    dist.barrier()


def read_manifest(ckpt_dir: Path) -> dict | None:
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def verify_share(ckpt_dir: Path, rank: int = 0, world: int = 1) -> str | None:
    """Why this rank's share of `ckpt_dir` fails verification, or None. Sizes of all files are
    checked by every rank (cheap), contents of every world-th file from `rank` on."""
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = read_manifest(ckpt_dir)
    except (OSError, json.JSONDecodeError) as e:
        return f"{ckpt_dir / MANIFEST}: unreadable ({e})"
    if manifest is None:
        return _without_manifest(ckpt_dir)
    names = list(manifest.get("files", {}))
    if not names:
        return f"{ckpt_dir / MANIFEST}: lists no files"
    # Each rank stats and hashes its share only: a 65B checkpoint's ~4,100 files are read once in
    # all, not once per rank.
    for name in names[rank::world]:
        p = ckpt_dir / name
        if not p.is_file():
            return f"{p}: missing"
        if p.stat().st_size != manifest["files"][name]["bytes"]:
            return f"{p}: {p.stat().st_size} bytes, the manifest says {manifest['files'][name]['bytes']}"
        if file_digest(p) != manifest["files"][name]["sha256"]:
            return f"{p}: checksum differs from the manifest"
    return None


def _without_manifest(ckpt_dir: Path) -> str | None:
    """None for a checkpoint that predates manifests, else why one without its manifest is refused."""
    from llama_plugin.checkpoint import MODEL_FILE

    try:
        record = json.loads((ckpt_dir / MODEL_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return f"{ckpt_dir / MANIFEST}: missing, and {MODEL_FILE} is unreadable: an incomplete checkpoint"
    if record.get("manifest"):
        return (f"{ckpt_dir / MANIFEST}: missing, though {MODEL_FILE} says the checkpoint was written with one "
                f"(partly deleted or damaged)")
    return None


def verify(ckpt_dir: Path) -> str | None:
    """Collective over the default group: why `ckpt_dir` fails verification on any rank, or None."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    reason = verify_share(ckpt_dir, rank, world)
    if world == 1:
        return reason
    reasons = [None] * world
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r), None)
