"""Read an offline W&B run file (run-<id>.wandb) without network: history rows, config, exit code.

wandb 0.31 ships no reader for its transaction log. The file is a 7-byte header (":W&B", magic
0xBEE1, version 0) followed by leveldb-log framing: 32 KiB blocks of chunks, each with a header
<crc32 u32, length u16, type u8> (type 1 full, 2 first, 3 middle, 4 last, 0 padding); each
reassembled record is a `wandb.proto.wandb_internal_pb2.Record`.
"""

import json
import struct
import zlib

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK, _HEADER = 32768, 7


def records(path):
    data = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, f"{path}: not a W&B run file"
    pos, buf = 7, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # zero trailer at the end of a block
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        if len(chunk) < length:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"{path}: bad checksum at {pos}"
        pos += _HEADER + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _key(item):
    return item.key or "/".join(item.nested_key)


def read_run(path):
    """(history rows, config, exit code or None if the file is incomplete)."""
    history, config, exit_code = [], {}, None
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind in ("run", "config"):
            cfg = rec.run.config if kind == "run" else rec.config
            config.update({_key(i): json.loads(i.value_json) for i in cfg.update})
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    config.pop("_wandb", None)
    return history, config, exit_code
