"""SentencePiece BPE with LLaMA's settings (LLaMA paper, section 2.1): byte-pair encoding, all numbers
split into single digits, unknown UTF-8 characters decomposed into bytes (byte fallback).

Ids: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), as in LLaMA's tokenizer; no pad piece.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm


def train_tokenizer(jsonl_files: list[Path], out_prefix: Path, vocab_size: int = 32000,
                    character_coverage: float = 0.99995, max_sentences: int = 0) -> Path:
    """Train on the "text" fields of JSONL documents; returns <out_prefix>.model."""
    out_prefix.parent.mkdir(parents=True, exist_ok=True)

    def sentences():
        for path in jsonl_files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)["text"]

    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_prefix=str(out_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        split_digits=True,
        byte_fallback=True,
        # As LLaMA's tokenizer: text is not normalized and whitespace is kept (code indentation).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=character_coverage,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=1,  # deterministic output
        minloglevel=2,
    )
    return out_prefix.with_suffix(".model")
