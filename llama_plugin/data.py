"""Training and validation data: megatron-core GPTDatasets over indexed datasets, blended by weight.

Sample order is a pure function of (seed, data files, sizes): the global sample index of micro-batch
m of data-parallel rank r at step s is s*G + r*(G/DP) + m*B, so a resumed run reads exactly the
samples the uninterrupted run would, and any layout with the same global batch G reads the same
samples per step. Every rank reads its own micro-batches (no broadcast); tensor- and pipeline-
parallel peers read the same ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from llama_plugin.train_step import Batch
from recipes import RecipeError


class SentencePieceIds:
    """The special-token facts GPTDataset needs from a tokenizer (it never tokenizes)."""

    def __init__(self, model_file: str):
        sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = sp.vocab_size()
        self.eod = sp.eos_id()
        self.bos = sp.bos_id()
        # Part of the key of megatron's sample-index cache.
        self.unique_identifiers = {"class": type(self).__name__, "tokenizer_path": [model_file],
                                   "vocab_size": self.vocab_size, "eod": self.eod}


def check_data_files(data_cfg, model_vocab_size: int | None = None) -> SentencePieceIds:
    """Fail before any work if a tokenizer or dataset file is missing or does not fit the model."""
    if not data_cfg.sources:
        raise RecipeError("data.sources: no data sources")
    tok = Path(data_cfg.tokenizer_model)
    if not tok.is_file():
        raise RecipeError(f"data.tokenizer_model: {tok} does not exist")
    ids = SentencePieceIds(str(tok))
    if model_vocab_size is not None and ids.vocab_size > model_vocab_size:
        raise RecipeError(f"model.vocab_size: {model_vocab_size} is smaller than the tokenizer's {ids.vocab_size} ({tok})")
    for name, src in data_cfg.sources.items():
        for suffix in (".bin", ".idx"):
            if not Path(src.prefix + suffix).is_file():
                raise RecipeError(f"data.sources.{name}.prefix: {src.prefix + suffix} does not exist")
        if src.weight <= 0:
            raise RecipeError(f"data.sources.{name}.weight: must be > 0, got {src.weight}")
    parts = data_cfg.split.split(",")
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        shares = []
    if len(shares) != 3 or min(shares) < 0 or shares[0] <= 0:
        raise RecipeError(f"data.split: expected 'train,valid,test' shares like '98,2,0', got {data_cfg.split!r}")
    return ids


def build_datasets(data_cfg, seq_length: int, seed: int, train_samples: int, valid_samples: int, cache_dir: str):
    """(train, valid, source names) datasets; valid is None when the split gives it no share."""
    ids = check_data_files(data_cfg)
    names = list(data_cfg.sources)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([data_cfg.sources[n].prefix for n in names], [float(data_cfg.sources[n].weight) for n in names]),
        split=data_cfg.split,
        path_to_cache=cache_dir,
        tokenizer=ids,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    has_valid = float(data_cfg.split.split(",")[1]) > 0
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples if has_valid else 0, 0], lambda: True, config
    ).build()
    return train, (valid if has_valid else None), names


def source_counts(dataset, start: int, stop: int, num_sources: int) -> np.ndarray:
    """Samples per blend source among global sample indices [start, stop)."""
    if hasattr(dataset, "dataset_index"):
        return np.bincount(np.asarray(dataset.dataset_index[start:stop]), minlength=num_sources).astype(np.int64)
    return np.array([stop - start], dtype=np.int64)


def micro_batches(dataset, first_sample: int, count: int, micro_batch_size: int) -> list[Batch]:
    """`count` micro-batches of consecutive samples starting at `first_sample`."""
    out = []
    for m in range(count):
        start = first_sample + m * micro_batch_size
        samples = [dataset[i] for i in range(start, start + micro_batch_size)]
        out.append(Batch(
            tokens=torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long(),
            labels=torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long(),
            loss_mask=torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float(),
        ))
    return out
