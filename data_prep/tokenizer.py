"""SentencePiece BPE with LLaMA's settings (LLaMA paper, section 2.1): byte-pair encoding, all numbers
split into single digits, unknown UTF-8 characters decomposed into bytes (byte fallback).

Ids: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), as in LLaMA's tokenizer; no pad piece.

SentencePiece trains on "sentences" and silently skips any longer than `max_sentence_length`
(4,192 bytes): whole documents would leave every book, most web pages and most source files out.
Documents go in line by line, and a longer line in pieces cut at spaces. No training sentence
holds a newline, so "\n" is encoded by byte fallback, as in LLaMA's tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm

from data_prep.tokenize_parallel import InputError, iter_texts


MAX_SENTENCE_BYTES = 4192  # SentencePiece's max_sentence_length default


def training_sentences(text: str, limit: int = MAX_SENTENCE_BYTES):
    """The lines of `text`, each cut at spaces into pieces of at most `limit` UTF-8 bytes (the space
    at a cut is dropped: SentencePiece puts its "▁" before every sentence). A run of `limit` bytes
    without a space is cut at a character boundary."""
    for line in text.split("\n"):
        data = line.encode("utf-8")
        while len(data) > limit:
            cut = data.rfind(b" ", 1, limit + 1)
            if cut > 0:
                head, data = data[:cut], data[cut + 1:]
            else:
                cut = limit
                while data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: inside a character
                    cut -= 1
                head, data = data[:cut], data[cut:]
            yield head.decode("utf-8")
        if data:
            yield data.decode("utf-8")


def train_tokenizer(jsonl_files: list[Path], out_prefix: Path, vocab_size: int = 32000,
                    character_coverage: float = 0.99995, max_sentences: int = 0) -> Path:
    """Train on the "text" fields of JSONL documents (plain, .gz or .zst), all of every document;
    returns <out_prefix>.model. The default vocabulary is LLaMA's 32,000; a small corpus needs a
    smaller one. `max_sentences` (0: all) samples that many training sentences (lines)."""
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = out_prefix.with_name(out_prefix.name + ".tmp")  # renamed when complete

    bad_input = []  # an InputError inside the iterator reaches us wrapped by sentencepiece: keep it

    def sentences():
        try:
            for path in jsonl_files:
                for text in iter_texts(path):
                    yield from training_sentences(text)
        except InputError as e:
            bad_input.append(e)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=str(tmp_prefix),
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
            max_sentence_length=MAX_SENTENCE_BYTES,
            shuffle_input_sentence=True,
            num_threads=1,  # deterministic output
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high (32000). Please set it to a value <= 1234."
        if bad_input:
            raise bad_input[0] from None
        files = ", ".join(str(p) for p in jsonl_files)
        raise ValueError(f"training the tokenizer on {files} failed: {e}") from None
    if bad_input:
        for suffix in (".vocab", ".model"):
            Path(str(tmp_prefix) + suffix).unlink(missing_ok=True)
        raise bad_input[0]
    for suffix in (".vocab", ".model"):
        os.replace(str(tmp_prefix) + suffix, str(out_prefix) + suffix)
    return Path(str(out_prefix) + ".model")
