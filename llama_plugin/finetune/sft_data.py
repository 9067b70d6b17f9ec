"""Supervised fine-tuning data: records of one or several files -> token ids + loss labels.

Every sample is a concatenation of segments (sft_formats.py makes them from Alpaca records and
conversations) so that the boundary between what the model is given (prompt, user turns: label
-100) and what it must produce (response, assistant turns: label = the token) is exact:

    alpaca: <s> template(instruction[, input]) | output </s>
    vicuna: <s> system USER: u1 ASSISTANT: | a1 </s> USER: u2 ASSISTANT: | a2 </s> ...

Labels are aligned with input ids (HF convention: the model shifts them), and truncation to
max_length cuts ids and labels at the same place. A mixture (data.mixture) concatenates the samples
of several files; schedule.BatchPlan decides how many of each form every global batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llama_plugin.finetune.sft_formats import (ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, FORMATS, PARSERS,
                                               Rendering, SftDataError)

__all__ = ["ALPACA_PROMPT_NO_INPUT", "ALPACA_PROMPT_WITH_INPUT", "IGNORE_INDEX", "Record", "SftDataError", "SftDataset",
           "Source", "collate", "load_tokenizer", "read_records", "read_sources", "tokenize_record",
           "tokenize_records"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Record:
    """One sample before tokenization, and where it came from (for error messages)."""

    source: str  # "file:line"
    segments: tuple  # ((text, carries_loss), ...)


@dataclass(frozen=True)
class Source:
    """One training file of the run; `per_epoch` samples of it go into every epoch."""

    name: str
    format: str
    train_file: str
    records: tuple
    per_epoch: int


def read_records(path, fmt: str, rendering: Rendering = Rendering()) -> list[Record]:
    """Samples of a JSON array file or a JSONL file, in order; a bad record raises SftDataError with
    file:line. Linear in the file's size."""
    path = Path(path)
    if fmt not in PARSERS:
        raise SftDataError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise SftDataError(f"{path}: training file not found (data.train_file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SftDataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    parse = PARSERS[fmt]
    records = []
    items = _array_items(text, path) if text.lstrip().startswith("[") else _jsonl_items(text, path)
    for where, obj in items:
        if not isinstance(obj, dict):
            raise SftDataError(f"{where}: a record must be a JSON object")
        records += [Record(where, segments) for segments in parse(obj, where, rendering)]
    if not records:
        raise SftDataError(f"{path}: no records" + (" (no OpenAssistant thread passed the filters: "
                                                    "data.oasst_languages, data.oasst_top_k)" if fmt == "oasst" else ""))
    return records


def _jsonl_items(text: str, path: Path):
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise SftDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def _array_items(text: str, path: Path):
    """The top-level items of one JSON array, each with "file:line (record i)" of where it starts;
    one pass over the text (the line count advances with the position)."""
    decoder, n = json.JSONDecoder(), len(text)

    def skip(pos):
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def fail(pos, msg):
        raise SftDataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: not valid JSON ({msg})")

    pos = skip(0) + 1  # past "["
    line, counted, i = 1, 0, 0
    pos = skip(pos)
    if pos < n and text[pos] == "]":
        pos += 1
    else:
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise SftDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            yield f"{path}:{line} (record {i})", obj
            i += 1
            pos = skip(pos)
            if pos < n and text[pos] == ",":
                pos = skip(pos + 1)
            elif pos < n and text[pos] == "]":
                pos += 1
                break
            else:
                fail(pos, "expected ',' or ']' after a record")
    if skip(pos) != n:
        fail(skip(pos), "extra data after the array")


def read_sources(data_cfg) -> list[Source]:
    """The run's training files: data.train_file, or every entry of data.mixture, with how many of
    their samples an epoch takes (all of them; `samples`; or `weight` x all the mixture's samples)."""
    rendering = Rendering.from_config(data_cfg)
    if not data_cfg.mixture:
        records = tuple(read_records(data_cfg.train_file, data_cfg.format, rendering))
        return [Source(data_cfg.name, data_cfg.format, data_cfg.train_file, records, len(records))]
    read = [(m, tuple(read_records(m.train_file, m.format, rendering))) for m in data_cfg.mixture]
    total = sum(len(records) for _, records in read)
    weights = sum(m.weight or 0 for m, _ in read)
    sources = [Source(m.name, m.format, m.train_file, records,
                      m.samples if m.samples is not None else round(total * m.weight / weights))
               for m, records in read]
    for i, s in enumerate(sources):
        if s.per_epoch < 1:
            raise SftDataError(f"data.mixture[{i}].weight: {s.name} gets no sample of the {total} per epoch")
    return sources


def load_tokenizer(tokenizer_model):
    """HF LlamaTokenizer over a SentencePiece model file.

    Loaded with from_pretrained on a folder holding it as tokenizer.model (constructing the class
    from vocab_file builds an empty tokenizer in transformers 5); ids equal sentencepiece's for text
    that does not start with a space (tests/test_finetune.py checks the fixtures).
    """
    import shutil
    import tempfile

    from transformers import LlamaTokenizer

    path = Path(tokenizer_model)
    if not path.is_file():
        raise SftDataError(f"{path}: tokenizer model not found (data.tokenizer_model)")
    folder = path.parent
    if path.name != "tokenizer.model":
        folder = Path(tempfile.mkdtemp(prefix="sp_tokenizer_"))
        shutil.copyfile(path, folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=False, add_eos_token=False)
    tokenizer.sentencepiece_model = str(path)  # tokenize_records encodes with SentencePiece itself
    return tokenizer


_SP = {}


def _encoder(tokenizer):
    """texts -> ids: SentencePiece's own batch encode for a tokenizer.model (2.5x the HF tokenizer's
    speed, the same ids: tests/test_finetune.py), else the tokenizer's."""
    path = getattr(tokenizer, "sentencepiece_model", None)
    if path is None:
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    if path not in _SP:
        import sentencepiece as spm

        _SP[path] = spm.SentencePieceProcessor(model_file=path)
    return _SP[path].encode


def tokenize_record(record: Record, tokenizer, max_length: int) -> dict:
    """{'input_ids', 'labels'} (lists of ints), as stanford_alpaca's `preprocess` (train.py) makes
    them, turn by turn: BOS; each prompt and its response tokenized together (the response is not
    a sentence of its own, so it gets no extra "▁"), then EOS; the loss on the tokens after the
    first len(tokenize(prompt)) of the pair, EOS included; all cut at max_length."""
    return tokenize_records([record], tokenizer, max_length)[0]


def tokenize_records(records: list[Record], tokenizer, max_length: int, chunk: int = 8192) -> list[dict]:
    """tokenize_record for many records, the texts encoded in batches (one call into the
    tokenizer per `chunk` records instead of two per turn)."""
    out, encode = [], _encoder(tokenizer)
    for start in range(0, len(records), chunk):
        turns = [_turns(r) for r in records[start:start + chunk]]
        joint = [prompt + (response or "") for pairs in turns for prompt, response in pairs]
        prompts = [prompt for pairs in turns for prompt, response in pairs if response is not None and prompt]
        joint_ids, prompt_ids = iter(encode(joint)), iter(encode(prompts))
        for pairs in turns:
            ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
            for prompt, response in pairs:
                if response is None:  # a prompt without a response (the parsers refuse one): no loss
                    tail = next(joint_ids)
                    ids += tail
                    labels += [IGNORE_INDEX] * len(tail)
                    continue
                pair = next(joint_ids) + [tokenizer.eos_token_id]
                masked = len(next(prompt_ids)) if prompt else 0
                ids += pair
                labels += [IGNORE_INDEX] * masked + pair[masked:]
            out.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return out


def _turns(record: Record) -> list[tuple[str, str | None]]:
    """(prompt, response) per turn; response None for a trailing prompt."""
    pairs, prompt = [], ""
    for text, carries_loss in record.segments:
        if carries_loss:
            pairs.append((prompt, text))
            prompt = ""
        else:
            prompt += text
    return pairs + [(prompt, None)] if prompt else pairs


class SftDataset:
    """Tokenized samples of every source, concatenated in source order.

    In a distributed run each of the W processes tokenizes every W-th record and the processes
    exchange their shares as flat int32 arrays, so each holds all samples after about 1/W of the
    encoding work (on 2 cores: 8.7 s instead of 13.6 s for 52K records; benchmarks/sft_load.py)."""

    def __init__(self, data_cfg, sources: list[Source] | None = None):
        import torch.distributed as dist

        self.sources = sources if sources is not None else read_sources(data_cfg)
        self.tokenizer = load_tokenizer(data_cfg.tokenizer_model)
        records = [r for source in self.sources for r in source.records]
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            self.samples = tokenize_records(records, self.tokenizer, data_cfg.max_length)
            return
        rank, world = dist.get_rank(), dist.get_world_size()
        shares = [None] * world
        dist.all_gather_object(shares, _pack(tokenize_records(records[rank::world], self.tokenizer,
                                                              data_cfg.max_length)))
        self.samples = [None] * len(records)
        for r, share in enumerate(shares):
            self.samples[r::world] = _unpack(share)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def _pack(samples: list[dict]):
    import numpy as np

    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
    ids = np.array([t for s in samples for t in s["input_ids"]], dtype=np.int32)
    labels = np.array([t for s in samples for t in s["labels"]], dtype=np.int32)
    return lengths, ids, labels


def _unpack(packed) -> list[dict]:
    import numpy as np

    lengths, ids, labels = packed
    cuts = np.cumsum(lengths)[:-1]
    return [{"input_ids": i, "labels": la} for i, la in zip(np.split(ids, cuts), np.split(labels, cuts))]


def collate(samples: list[dict], pad_id: int = 0) -> dict:
    """Right-padded LongTensors input_ids / labels (-100 on padding) / attention_mask."""
    import torch

    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n] = torch.tensor(s["input_ids"])
        labels[row, :n] = torch.tensor(s["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
