"""Books (Project Gutenberg and Books3 in the paper): license header and footer removed, and
book-level near-duplicates removed: of two books whose contents overlap by more than a threshold
(LLaMA: 90%), only the first is kept.

Overlap is the Jaccard similarity of the books' sets of word n-gram shingles. Candidate pairs come
from MinHash LSH (datasketch); each candidate's overlap is then computed exactly, so the
threshold is applied to the true value, not to an estimate.

The dedup runs in three stages, so a corpus larger than one task is fine:
1. (any number of tasks) each task writes its stripped books and their MinHash signatures;
2. (one task) the signatures of the whole corpus go through LSH in corpus order (task, then
   position); a book is a duplicate when a candidate kept earlier overlaps it by more than the
   threshold (both books re-read from stage 1's shards to compute it); the duplicates' positions
   are written per task. Memory: the signatures (num_perm x 4 bytes per book), not the books;
3. (any number of tasks) each task drops its listed books.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from datatrove.data import Document
from datatrove.utils.logging import logger
from datatrove.pipeline.base import PipelineStep

from data_prep.corpus import strip_gutenberg
from data_prep.sources import InputError


# The producer credit Gutenberg puts right after its START marker.
_CREDIT = re.compile(r"\A\s*(?:Produced by|This e-?(?:book|text) was produced by|Transcribed from)[^\n]*\n", re.I)


def strip_book(text: str) -> str:
    """The book without Gutenberg's license header/footer and producer credit."""
    return _CREDIT.sub("", strip_gutenberg(text)).strip() + "\n"


def shingles(text: str, n: int) -> set[int]:
    """64-bit hashes of the word n-grams of a text (lowercased, punctuation ignored)."""
    words = re.findall(r"\w+", text.lower())
    grams = (" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1)))
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams}


def overlap(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class StripGutenbergHeader(PipelineStep):
    name = "strip gutenberg header/footer"
    type = "✂️ - FORMAT"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            stripped = strip_book(doc.text)
            self.stat_update("chars_removed", value=len(doc.text) - len(stripped))
            doc.text = stripped
            yield doc


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class BookSignatures(PipelineStep):
    """Stage 1's end: the MinHash signature of each of this task's books, in order, to
    <folder>/<task>.npy (written even when the task has no books: it marks the task done)."""

    name = "book minhash signatures"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str, shingle_words: int, num_perm: int):
        super().__init__()
        self.folder, self.shingle_words, self.num_perm = Path(folder), shingle_words, num_perm

    def run(self, data, rank: int = 0, world_size: int = 1):
        from datasketch import MinHash

        signatures = []
        for doc in data:
            self.stat_update("total")
            mh = MinHash(num_perm=self.num_perm, seed=1)
            mh.update_batch([s.to_bytes(8, "little") for s in shingles(doc.text, self.shingle_words)])
            signatures.append(mh.hashvalues)
        _save_atomic(self.folder / f"{rank:05d}.npy",
                     np.array(signatures, dtype=np.uint64).reshape(len(signatures), self.num_perm))
        return
        yield  # a generator, as datatrove's steps are


class FindNearDuplicateBooks(PipelineStep):
    """Stage 2 (one task): the books to drop, as positions per stage-1 task in <out>/<task>.npy.
    A book is dropped when its overlap with a book kept before it exceeds `max_overlap`."""

    name = "book near-duplicate search"
    type = "🫂 - DEDUP"

    def __init__(self, books_folder: str, signatures_folder: str, out_folder: str, max_overlap: float,
                 shingle_words: int, num_perm: int):
        super().__init__()
        self.books, self.signatures, self.out = Path(books_folder), Path(signatures_folder), Path(out_folder)
        self.max_overlap, self.shingle_words, self.num_perm = max_overlap, shingle_words, num_perm

    def _offsets(self, task: int) -> list[int]:
        """Byte offset of each book in stage 1's shard of `task`."""
        path, offsets, pos = self.books / f"{task:05d}.jsonl", [], 0
        if path.is_file():
            with open(path, "rb") as f:
                for line in f:
                    offsets.append(pos)
                    pos += len(line)
        return offsets

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from datasketch import MinHash, MinHashLSH

        files = sorted(self.signatures.glob("*.npy"))
        tasks = [int(p.stem) for p in files]
        if tasks != list(range(len(tasks))):
            raise RuntimeError(f"{self.signatures}: signatures of tasks {tasks}, expected 0..{len(tasks) - 1}")
        offsets = {t: self._offsets(t) for t in tasks}

        @lru_cache(maxsize=256)
        def book_shingles(task: int, index: int) -> frozenset[int]:
            with open(self.books / f"{task:05d}.jsonl", "rb") as f:
                f.seek(offsets[task][index])
                return frozenset(shingles(json.loads(f.readline())["text"], self.shingle_words))

        scheme = MinHash(num_perm=self.num_perm, seed=1).scheme
        # The LSH threshold sits below the exact one so that candidates are not missed.
        lsh = MinHashLSH(threshold=max(0.05, self.max_overlap - 0.2), num_perm=self.num_perm)
        for task, path in zip(tasks, files):
            signatures = np.load(path)
            if len(signatures) != len(offsets[task]):
                raise RuntimeError(f"{path}: {len(signatures)} signatures for {len(offsets[task])} books")
            dropped = []
            for index, hashvalues in enumerate(signatures):
                self.stat_update("total")
                mh = MinHash(num_perm=self.num_perm, seed=1, hashvalues=hashvalues, scheme=scheme)
                candidates = lsh.query(mh)
                if candidates:
                    own = book_shingles(task, index)
                    if any(overlap(own, book_shingles(*key)) > self.max_overlap for key in sorted(candidates)):
                        self.stat_update("near_duplicates")
                        dropped.append(index)
                        continue
                lsh.insert((task, index), mh)
            _save_atomic(self.out / f"{task:05d}.npy", np.array(dropped, dtype=np.int64))
        return
        yield


class DropNearDuplicateBooks(PipelineStep):
    """Stage 3: drops this task's books that stage 2 listed, by position in the task's shard."""

    name = "book near-duplicates"
    type = "🫂 - DEDUP"

    def __init__(self, duplicates_folder: str):
        super().__init__()
        self.duplicates = Path(duplicates_folder)

    def run(self, data, rank: int = 0, world_size: int = 1):
        path = self.duplicates / f"{rank:05d}.npy"
        dropped = set(np.load(path).tolist()) if path.is_file() else set()
        for index, doc in enumerate(data):
            self.stat_update("total")
            if index in dropped:
                self.stat_update("dropped_near_duplicate")
                continue
            self.stat_update("forwarded")
            yield doc


class BooksReader(PipelineStep):
    """One document per .txt file (a book) under the input folder, in path order."""

    name = "books reader"
    type = "📖 - READER"

    def __init__(self, input_dir: str):
        super().__init__()
        self.input_dir = Path(input_dir)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        files = sorted(self.input_dir.rglob("*.txt"))
        if not files:
            raise InputError(f"{self.input_dir}: no .txt books")
        for path in files[rank::world_size]:
            try:
                text = path.read_bytes().decode("utf-8-sig")
            except UnicodeDecodeError as e:  # one unreadable book is skipped, counted and named
                self.stat_update("skipped_not_utf8")
                logger.warning(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); skipped")
                continue
            yield Document(text=text.replace("\r\n", "\n"), id=str(path.relative_to(self.input_dir)),
                           metadata={"source": "books"})
