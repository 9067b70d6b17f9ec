"""Tokenizer training and tokenization as datatrove steps, so that `python -m data_prep pipeline`
runs them like the clean stages: locally or as Slurm array jobs, each stage depending on the one
before.

Tokenizing one source is three stages over the same shard plan as tokenize_parallel.py (the output
is byte-identical to it, and to tokenize_docs.tokenize_jsonl, for any task count):

    prepare   1 task   the shard plan of the source's cleaned JSONL; shards of another plan removed
    tokenize  N tasks  task r tokenizes shards r, r + N, ... (complete shards are kept: a rerun or
                       a requeued task redoes only the missing ones)
    merge     1 task   <prefix>.bin/.idx from the shards, in order; <prefix>.tokenize.json the counts
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from data_prep.clean import Stage
from data_prep.tokenize_parallel import (SHARD_BYTES, merge_shards, plan_shards, prepare_shards, shard_complete,
                                         shard_dir_of, tokenize_shard)


def jsonl_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.jsonl"))
    if not files:
        from data_prep.sources import InputError

        raise InputError(f"{folder}: no *.jsonl files to tokenize")
    return files


class _Step(PipelineStep):
    type = "🔢 - TOKENIZE"

    def __init__(self, input_dir: str, tokenizer: str, out_prefix: str, shard_bytes: int = SHARD_BYTES):
        super().__init__()
        self.input_dir, self.tokenizer, self.out_prefix = Path(input_dir), Path(tokenizer), Path(out_prefix)
        self.shard_bytes = shard_bytes

    def shards(self):
        return plan_shards(jsonl_files(self.input_dir), self.shard_bytes)


class PrepareShards(_Step):
    name = "prepare shards"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        shards, reused = prepare_shards(jsonl_files(self.input_dir), self.tokenizer, self.out_prefix,
                                        self.shard_bytes, log=lambda m: None)
        self.stat_update("shards", value=len(shards))
        self.stat_update("reused_shards", value=reused)
        yield from ()


class TokenizeShards(_Step):
    name = "tokenize shards"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for shard in self.shards()[rank::world_size]:
            if not shard_complete(self.out_prefix, shard, self.tokenizer):
                self.stat_update("documents", value=tokenize_shard(shard, str(self.tokenizer),
                                                                   shard_dir_of(self.out_prefix)))
                self.stat_update("shards")
        yield from ()


class MergeShards(_Step):
    name = "merge shards"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        result = merge_shards(self.shards(), self.tokenizer, self.out_prefix)
        out = Path(str(self.out_prefix) + ".tokenize.json")
        out.with_suffix(".tmp").write_text(json.dumps(result) + "\n")
        os.replace(out.with_suffix(".tmp"), out)
        self.stat_update("documents", value=result["documents"])
        yield from ()


class TrainTokenizer(PipelineStep):
    """One task: SentencePiece BPE with LLaMA's settings on every *.jsonl of the given folders."""

    name = "train tokenizer"
    type = "🔢 - TOKENIZE"

    def __init__(self, folders: list[str], out_prefix: str, vocab_size: int, character_coverage: float,
                 max_sentences: int):
        super().__init__()
        self.folders, self.out_prefix = [Path(f) for f in folders], Path(out_prefix)
        self.settings = (vocab_size, character_coverage, max_sentences)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from data_prep.tokenizer import train_tokenizer

        train_tokenizer([p for f in self.folders for p in jsonl_files(f)], self.out_prefix, *self.settings)
        yield from ()


def tokenize_stages(input_dir: Path, tokenizer: Path, out_prefix: Path, tasks: int,
                    shard_bytes: int = SHARD_BYTES) -> list[Stage]:
    args = (str(input_dir), str(tokenizer), str(out_prefix), shard_bytes)
    return [Stage("prepare", [PrepareShards(*args)], 1), Stage("tokenize", [TokenizeShards(*args)], tasks),
            Stage("merge", [MergeShards(*args)], 1)]
