"""Supervised fine-tuning data: Alpaca records and multi-turn chats -> token ids + loss labels.

Every sample is a concatenation of segments, each tokenized on its own so that the boundary between
what the model is given (prompt, user turns: label -100) and what it must produce (response,
assistant turns: label = the token) is exact:

    alpaca: <s> template(instruction[, input]) | output </s>
    chat:   <s> "USER: " u1 " ASSISTANT:" | a1 </s> | "USER: " u2 " ASSISTANT:" | a2 </s> ...

Labels are aligned with input ids (HF convention: the model shifts them), and truncation to
max_length cuts ids and labels at the same place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IGNORE_INDEX = -100

# Stanford Alpaca's two prompt templates (tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
CHAT_USER_PREFIX = "USER: "
CHAT_ASSISTANT_PREFIX = " ASSISTANT:"


class SftDataError(ValueError):
    """A malformed training record; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Record:
    """One parsed record and where it came from (for error messages)."""

    source: str  # "file:line"
    segments: tuple  # ((text, carries_loss), ...)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _string_field(obj: dict, key: str, where: str, required: bool = True) -> str:
    if key not in obj:
        if required:
            raise SftDataError(f"{where}: field '{key}' missing")
        return ""
    if not isinstance(obj[key], str):
        raise SftDataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def alpaca_segments(obj: dict, where: str) -> tuple:
    instruction = _string_field(obj, "instruction", where)
    input_text = _string_field(obj, "input", where, required=False)
    output = _string_field(obj, "output", where)
    return ((alpaca_prompt(instruction, input_text), False), (output, True))


def chat_segments(obj: dict, where: str) -> tuple:
    messages = obj.get("messages")
    if messages is None:
        raise SftDataError(f"{where}: field 'messages' missing")
    if not isinstance(messages, list) or not messages:
        raise SftDataError(f"{where}: field 'messages' must be a non-empty list of turns")
    segments = []
    for i, turn in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(turn, dict):
            raise SftDataError(f"{at} must be an object with 'role' and 'content'")
        role = _string_field(turn, "role", at)
        content = _string_field(turn, "content", at)
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise SftDataError(f"{at}: field 'role' is {role!r}; turns alternate user, assistant, ... (expected {want!r})")
        if role == "user":
            segments.append((CHAT_USER_PREFIX + content + CHAT_ASSISTANT_PREFIX, False))
        else:
            segments.append((content, True))
    if len(messages) % 2:
        raise SftDataError(f"{where}: field 'messages' ends with a user turn; a conversation ends with the assistant")
    return tuple(segments)


_PARSERS = {"alpaca": alpaca_segments, "chat": chat_segments}


def read_records(path, fmt: str) -> list[Record]:
    """Records of a JSON array file or a JSONL file; a bad one raises SftDataError with file:line."""
    path = Path(path)
    if fmt not in _PARSERS:
        raise SftDataError(f"data.format: {fmt!r} is not one of {', '.join(_PARSERS)}")
    if not path.is_file():
        raise SftDataError(f"{path}: training file not found (data.train_file)")
    text = path.read_text(encoding="utf-8")
    parse = _PARSERS[fmt]
    records = []
    if text.lstrip().startswith("["):  # one JSON array
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise SftDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        line_of = _array_item_lines(text, len(items))
        for i, obj in enumerate(items):
            where = f"{path}:{line_of[i]} (record {i})"
            if not isinstance(obj, dict):
                raise SftDataError(f"{where}: a record must be a JSON object")
            records.append(Record(where, parse(obj, where)))
    else:  # JSONL
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SftDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise SftDataError(f"{where}: a record must be a JSON object")
            records.append(Record(where, parse(obj, where)))
    if not records:
        raise SftDataError(f"{path}: no records")
    return records


def _array_item_lines(text: str, count: int) -> list[int]:
    """The line on which each top-level item of a JSON array starts (for error messages)."""
    decoder = json.JSONDecoder()
    lines, pos = [], text.index("[") + 1
    for _ in range(count):
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
    return lines


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
    return LlamaTokenizer.from_pretrained(str(folder), add_bos_token=False, add_eos_token=False)


def tokenize_record(record: Record, tokenizer, max_length: int) -> dict:
    """{'input_ids', 'labels'} (lists of ints), as stanford_alpaca's `preprocess` (train.py) makes
    them, turn by turn: BOS; each prompt and its response tokenized together (the response is not
    a sentence of its own, so it gets no extra "▁"), then EOS; the loss on the tokens after the
    first len(tokenize(prompt)) of the pair, EOS included; all cut at max_length."""
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    prompt = ""
    for text, carries_loss in record.segments:
        if not carries_loss:
            prompt += text
            continue
        pair = tokenizer.encode(prompt + text, add_special_tokens=False) + [tokenizer.eos_token_id]
        masked = len(tokenizer.encode(prompt, add_special_tokens=False)) if prompt else 0
        ids += pair
        labels += [IGNORE_INDEX] * masked + pair[masked:]
        prompt = ""
    if prompt:  # a prompt without a response (the parsers refuse one): no loss
        tail = tokenizer.encode(prompt, add_special_tokens=False)
        ids += tail
        labels += [IGNORE_INDEX] * len(tail)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


class SftDataset:
    """Tokenized records, in file order."""

    def __init__(self, data_cfg):
        self.records = read_records(data_cfg.train_file, data_cfg.format)
        self.tokenizer = load_tokenizer(data_cfg.tokenizer_model)
        self.samples = [tokenize_record(r, self.tokenizer, data_cfg.max_length) for r in self.records]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


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
