"""JSONL documents -> a megatron-core indexed dataset (<prefix>.bin / <prefix>.idx), EOS appended.

One document per JSONL line ({"text": ...}); each becomes its token ids followed by EOS, so the
training sequences that GPTDataset packs across documents keep the document boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import llama_plugin  # noqa: F401  (its warning filters quiet megatron-core's CPU notices)
import sentencepiece as spm
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def tokenize_jsonl(jsonl: Path, tokenizer_model: Path, out_prefix: Path) -> dict:
    """Write the indexed dataset; returns counts and the unigram token counts for reports."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    dtype = np.uint16 if sp.vocab_size() < 2**16 else np.int32
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(out_prefix) + ".bin", dtype=dtype)
    counts = np.zeros(sp.vocab_size(), dtype=np.int64)
    docs = tokens = 0
    with open(jsonl, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{jsonl}:{line_no}: not a JSON object with a 'text' field") from None
            ids = sp.encode(text) + [sp.eos_id()]
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            np.add.at(counts, ids, 1)
            docs += 1
            tokens += len(ids)
    builder.finalize(str(out_prefix) + ".idx")
    return {"documents": docs, "tokens": tokens, "unigram_counts": counts}


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the unigram token distribution: the loss of a model that ignores context."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
