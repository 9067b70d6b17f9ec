"""JSONL documents of one source -> one megatron-core indexed dataset, tokenized by N processes.

The output is byte-identical to `tokenize_docs.tokenize_jsonl` (token ids + EOS per document) for
any worker count. The input files (plain, .gz or .zst JSONL, one {"text": ...} per line) are cut
into shards that depend only on the files and `shard_bytes`: a plain file into byte ranges (a
shard holds the lines that start in its range), a compressed file is one shard. Each shard is
tokenized into <prefix>.shards/NNNNNN.bin and NNNNNN.len (its document lengths), each written as
.tmp and renamed, .len last: a .len file marks a complete shard. A rerun after a crash or `kill -9`
reuses the complete shards when plan.json (inputs, sizes, mtimes, tokenizer, shard size) still
matches. The shards are concatenated in order into <prefix>.bin and <prefix>.idx (megatron-core's
index format), both written as .tmp and renamed, .idx last (an old .idx is removed first), so a
.bin/.idx pair that exists is complete. <prefix>.lock keeps a second run off the same prefix.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_prep.sources import InputError  # a bad input file; the message names it (and the line)

SHARD_BYTES = 32 << 20
MIN_SHARDS, MIN_SHARD_BYTES = 16, 1 << 20
BATCH_DOCS = 256
COMPRESSED = (".gz", ".zst")
# megatron-core's .idx layout (megatron/core/datasets/indexed_dataset.py, _IndexWriter)
INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


@dataclass(frozen=True)
class Shard:
    index: int
    path: str
    start: int  # byte range [start, end) of a plain file; a compressed file is one shard (0, -1)
    end: int

    @property
    def compressed(self) -> bool:
        return self.end < 0


def token_dtype(vocab_size: int) -> np.dtype:
    """The .bin token type tokenize_jsonl uses: uint16 when the ids fit."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.int32)


def shard_size(files: list[Path], shard_bytes: int) -> int:
    """Plain-file shard size: `shard_bytes`, or less for a small input so that it still makes
    MIN_SHARDS shards of at least MIN_SHARD_BYTES (a 25 MB file feeds 16 workers, not one). It
    depends on the inputs only, never on the worker count, so a rerun with other --workers
    reuses the shards."""
    plain = sum(p.stat().st_size for p in files if not str(p).endswith(COMPRESSED))
    return max(1, min(shard_bytes, max(MIN_SHARD_BYTES, -(-plain // MIN_SHARDS))))


def plan_shards(files: list[Path], shard_bytes: int) -> list[Shard]:
    shard_bytes = shard_size(files, shard_bytes)
    shards = []
    for path in files:
        if str(path).endswith(COMPRESSED):
            shards.append(Shard(len(shards), str(path), 0, -1))
            continue
        size = path.stat().st_size
        for start in range(0, max(size, 1), shard_bytes):
            shards.append(Shard(len(shards), str(path), start, min(start + shard_bytes, size)))
    return shards


def _zstd_chunks(path: str, chunk_bytes: int = 1 << 20):
    """Decompressed bytes of a .zst file (any number of frames); a frame cut short is an error
    (zstandard's stream reader would end quietly)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj, in_frame = dctx.decompressobj(), False
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            while chunk:
                in_frame = True
                if out := obj.decompress(chunk):
                    yield out
                if not obj.eof:
                    break
                chunk, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
    if in_frame:
        raise EOFError("the last zstd frame is cut short")


def _gzip_chunks(path: str, chunk_bytes: int = 1 << 20):
    with gzip.open(path, "rb") as f:  # raises EOFError on a truncated member
        while chunk := f.read(chunk_bytes):
            yield chunk


def _range_lines(shard: Shard):
    """(byte offset, line) for the lines of a plain file that start in [start, end)."""
    with open(shard.path, "rb") as f:
        pos = shard.start
        if pos > 0:
            f.seek(pos - 1)
            pos += len(f.readline()) - 1  # the line holding byte start-1 belongs to the shard before
        while pos < shard.end:
            line = f.readline()
            if not line:
                break
            yield pos, line
            pos += len(line)


def _compressed_lines(shard: Shard):
    """(line number, line) of a whole .gz / .zst file; an unreadable archive names the file."""
    import zstandard

    chunks = _gzip_chunks(shard.path) if shard.path.endswith(".gz") else _zstd_chunks(shard.path)
    line_no, rest = 0, b""
    try:
        for chunk in chunks:
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                line_no += 1
                yield line_no, line + b"\n"
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise InputError(f"{shard.path}: not a readable {Path(shard.path).suffix[1:]} archive ({e})") from None
    if rest:
        yield line_no + 1, rest


def _line_number(shard: Shard, where: int) -> int:
    if shard.compressed:
        return where
    newlines, left = 0, where
    with open(shard.path, "rb") as f:
        while left > 0 and (chunk := f.read(min(left, 16 << 20))):
            newlines += chunk.count(b"\n")
            left -= len(chunk)
    return newlines + 1


def _text(shard: Shard, where: int, line: bytes) -> str:
    try:
        text = json.loads(line.decode("utf-8"))["text"]
        if isinstance(text, str):
            return text
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        pass
    raise InputError(f"{shard.path}:{_line_number(shard, where)}: not a UTF-8 JSON object with a string 'text' field")


def iter_texts(path: Path):
    """The "text" of every document of one JSONL file (plain, .gz or .zst), in order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such input file")
    shard = Shard(0, str(path), 0, -1) if str(path).endswith(COMPRESSED) else Shard(0, str(path), 0, path.stat().st_size)
    lines = _compressed_lines(shard) if shard.compressed else _range_lines(shard)
    for where, line in lines:
        yield _text(shard, where, line)


_SP: dict[tuple, spm.SentencePieceProcessor] = {}


def _processor(model_file: str) -> spm.SentencePieceProcessor:
    """One loaded model per process (forked workers inherit it); a rewritten file is reloaded."""
    st = os.stat(model_file)
    key = (model_file, st.st_size, st.st_mtime_ns)
    if key not in _SP:
        _SP[key] = spm.SentencePieceProcessor(model_file=model_file)
    return _SP[key]


def _shard_files(shard_dir: Path, index: int) -> tuple[Path, Path]:
    return shard_dir / f"{index:06d}.bin", shard_dir / f"{index:06d}.len"


def tokenize_shard(shard: Shard, model_file: str, shard_dir: Path) -> int:
    """Tokenize one shard into its .bin/.len pair; returns its document count."""
    sp = _processor(model_file)
    eos = (sp.eos_id(),)
    dtype = token_dtype(sp.vocab_size())
    bin_path, len_path = _shard_files(shard_dir, shard.index)
    # Per-process names: a worker of a killed run that is still dying never shares a file with us.
    bin_tmp, len_tmp = (Path(f"{p}.tmp{os.getpid()}") for p in (bin_path, len_path))
    lengths: list[int] = []
    lines = _compressed_lines(shard) if shard.compressed else _range_lines(shard)
    try:
        with open(bin_tmp, "wb") as out:
            while batch := list(itertools.islice(lines, BATCH_DOCS)):
                encoded = sp.encode([_text(shard, where, line) for where, line in batch], num_threads=1)  # one core per worker
                sizes = [len(ids) + 1 for ids in encoded]
                flat = itertools.chain.from_iterable(itertools.chain.from_iterable(zip(encoded, itertools.repeat(eos))))
                out.write(np.fromiter(flat, dtype=dtype, count=sum(sizes)).tobytes())
                lengths.extend(sizes)
            out.flush()
            os.fsync(out.fileno())
        np.asarray(lengths, dtype=np.int32).tofile(len_tmp)
        os.replace(bin_tmp, bin_path)
        os.replace(len_tmp, len_path)
    finally:
        for tmp in (bin_tmp, len_tmp):
            tmp.unlink(missing_ok=True)
    return len(lengths)


def _complete_lengths(shard_dir: Path, index: int, itemsize: int) -> np.ndarray | None:
    """A finished shard's document lengths, or None when it is missing or inconsistent."""
    bin_path, len_path = _shard_files(shard_dir, index)
    if not (len_path.is_file() and bin_path.is_file()):
        return None
    lengths = np.fromfile(len_path, dtype=np.int32)
    return lengths if int(lengths.sum(dtype=np.int64)) * itemsize == bin_path.stat().st_size else None


def _plan_record(files: list[Path], model_file: Path, shard_bytes: int) -> dict:
    return {
        "format": 1,
        "inputs": [{"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files],
        "tokenizer_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
        "shard_bytes": shard_bytes,
    }


def _die_with_parent() -> None:
    """Pool workers get SIGKILL when the parent dies (Linux), so a killed run leaves no writers."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_shard(args) -> int:
    return tokenize_shard(*args)


def write_index(idx_path: Path, length_chunks, count: int, dtype: np.dtype) -> None:
    """megatron-core's .idx for one sequence per document (what IndexedDatasetBuilder writes), from
    `length_chunks()`: a fresh iterator over the documents' lengths in pieces (one per shard), read
    twice. Memory holds one piece, not the whole index (1B documents are 20 GB of index)."""
    with open(idx_path, "wb") as f:
        f.write(INDEX_HEADER + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", count) + struct.pack("<Q", count + 1))
        for lengths in length_chunks():
            f.write(np.asarray(lengths, dtype=np.int32).tobytes())
        offset = 0  # in tokens
        for lengths in length_chunks():
            lengths = np.asarray(lengths, dtype=np.int64)
            ends = np.cumsum(lengths) + offset
            f.write(((ends - lengths) * dtype.itemsize).tobytes())
            offset = int(ends[-1]) if len(ends) else offset
        for start in range(0, count + 1, 1 << 20):
            f.write(np.arange(start, min(start + (1 << 20), count + 1), dtype=np.int64).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _checked_inputs(inputs, tokenizer_model) -> tuple[list[Path], Path]:
    files = [Path(p) for p in inputs]
    if not files:
        raise InputError("no input files")
    for p in files:
        if not p.is_file():
            raise InputError(f"{p}: no such input file")
    tokenizer_model = Path(tokenizer_model)
    if not tokenizer_model.is_file():
        raise InputError(f"{tokenizer_model}: no such tokenizer model")
    return files, tokenizer_model


def tokenize_parallel(inputs: list[Path], tokenizer_model: Path, out_prefix: Path, workers: int = 1,
                      shard_bytes: int = SHARD_BYTES, log=print) -> dict:
    """Write <out_prefix>.bin/.idx from the JSONL `inputs`; returns counts (documents, tokens,
    shards, shards reused from an interrupted run)."""
    files, tokenizer_model = _checked_inputs(inputs, tokenizer_model)
    if workers < 1 or shard_bytes < 1:
        raise ValueError(f"workers ({workers}) and shard_bytes ({shard_bytes}) must be >= 1")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(str(out_prefix) + ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out_prefix}: another tokenize run is writing this prefix") from None
        try:
            shards, reused = prepare_shards(files, tokenizer_model, out_prefix, shard_bytes, log)
            todo = [s for s in shards if not shard_complete(out_prefix, s, tokenizer_model)]
            jobs = [(s, str(tokenizer_model), shard_dir_of(out_prefix)) for s in todo]
            if workers == 1 or len(todo) <= 1:
                for job in jobs:
                    _run_shard(job)
            else:
                ctx = multiprocessing.get_context("fork")
                with ctx.Pool(min(workers, len(todo)), initializer=_die_with_parent) as pool:
                    for _ in pool.imap_unordered(_run_shard, jobs):
                        pass
            return {**merge_shards(shards, tokenizer_model, out_prefix), "reused_shards": reused}
        finally:
            os.unlink(lock.name)


def shard_dir_of(out_prefix: Path) -> Path:
    return Path(str(out_prefix) + ".shards")


def shard_complete(out_prefix: Path, shard: Shard, tokenizer_model: Path) -> bool:
    dtype = token_dtype(_processor(str(tokenizer_model)).vocab_size())
    return _complete_lengths(shard_dir_of(out_prefix), shard.index, dtype.itemsize) is not None


def prepare_shards(files: list[Path], tokenizer_model: Path, out_prefix: Path, shard_bytes: int,
                   log=print) -> tuple[list[Shard], int]:
    """The shard plan, and <prefix>.shards/ ready for it: the complete shards of the same plan are
    kept (counted), those of another plan (inputs, tokenizer or shard size changed) removed."""
    shard_dir = shard_dir_of(out_prefix)
    plan = _plan_record(files, tokenizer_model, shard_bytes)
    plan_file = shard_dir / "plan.json"
    if shard_dir.exists() and (not plan_file.is_file() or json.loads(plan_file.read_text()) != plan):
        log(f"{shard_dir}: shards of a different plan (inputs, tokenizer or shard size changed); starting over")
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    if not plan_file.is_file():
        plan_file.with_suffix(".tmp").write_text(json.dumps(plan, indent=1) + "\n")
        os.replace(plan_file.with_suffix(".tmp"), plan_file)
    shards = plan_shards(files, shard_bytes)
    reused = sum(shard_complete(out_prefix, s, tokenizer_model) for s in shards)
    if reused:
        log(f"{shard_dir}: reusing {reused} of {len(shards)} complete shards")
    return shards, reused


def merge_shards(shards: list[Shard], tokenizer_model: Path, out_prefix: Path) -> dict:
    """<prefix>.bin/.idx from the complete shards, in order (written as .tmp, renamed, .idx last);
    the shard folder is removed after."""
    shard_dir = shard_dir_of(out_prefix)
    dtype = token_dtype(_processor(str(tokenizer_model)).vocab_size())
    documents, tokens = 0, 0
    for s in shards:  # one shard's lengths in memory at a time
        lengths = _complete_lengths(shard_dir, s.index, dtype.itemsize)
        if lengths is None:
            raise RuntimeError(f"{shard_dir}: shard {s.index} is missing after tokenization")
        documents, tokens = documents + len(lengths), tokens + int(lengths.sum(dtype=np.int64))
    bin_path, idx_path = Path(str(out_prefix) + ".bin"), Path(str(out_prefix) + ".idx")
    bin_tmp, idx_tmp = Path(str(bin_path) + ".tmp"), Path(str(idx_path) + ".tmp")
    with open(bin_tmp, "wb") as out:
        for s in shards:
            with open(_shard_files(shard_dir, s.index)[0], "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
        out.flush()
        os.fsync(out.fileno())
    write_index(idx_tmp, lambda: (np.fromfile(_shard_files(shard_dir, s.index)[1], dtype=np.int32) for s in shards),
                documents, dtype)
    idx_path.unlink(missing_ok=True)  # never a new .bin beside an old .idx
    os.replace(bin_tmp, bin_path)
    os.replace(idx_tmp, idx_path)
    shutil.rmtree(shard_dir)
    return {"documents": documents, "tokens": tokens, "shards": len(shards), "prefix": str(out_prefix)}
