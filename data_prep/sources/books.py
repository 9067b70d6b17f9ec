"""Books (Project Gutenberg and Books3 in the paper): license header and footer removed, and
book-level near-duplicates removed: of two books whose contents overlap by more than a threshold
(LLaMA: 90%), only the first is kept.

Overlap is the Jaccard similarity of the books' sets of word n-gram shingles. Candidate pairs come
from MinHash LSH (datasketch); each candidate's overlap is then computed exactly, so the
threshold is applied to the true value, not to an estimate.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from datatrove.data import Document
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


class DropNearDuplicateBooks(PipelineStep):
    """Keeps a book unless its overlap with an earlier kept book exceeds `max_overlap`. Needs all
    books of the corpus in one task (run this stage with tasks=1)."""

    name = "book near-duplicates"
    type = "🫂 - DEDUP"
    single_task = True

    def __init__(self, max_overlap: float = 0.9, shingle_words: int = 5, num_perm: int = 128):
        super().__init__()
        self.max_overlap, self.shingle_words, self.num_perm = max_overlap, shingle_words, num_perm

    def run(self, data, rank: int = 0, world_size: int = 1):
        from datasketch import MinHash, MinHashLSH

        # The LSH threshold sits below the exact one so that candidates are not missed.
        lsh = MinHashLSH(threshold=max(0.05, self.max_overlap - 0.2), num_perm=self.num_perm)
        kept: dict[str, set[int]] = {}
        for doc in data:
            self.stat_update("total")
            sh = shingles(doc.text, self.shingle_words)
            mh = MinHash(num_perm=self.num_perm, seed=1)
            mh.update_batch([s.to_bytes(8, "little") for s in sh])
            duplicate_of = next((key for key in lsh.query(mh) if overlap(sh, kept[key]) > self.max_overlap), None)
            if duplicate_of is not None:
                self.stat_update("dropped_near_duplicate")
                continue
            key = str(len(kept))
            lsh.insert(key, mh)
            kept[key] = sh
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
            except UnicodeDecodeError as e:
                raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            yield Document(text=text.replace("\r\n", "\n"), id=str(path.relative_to(self.input_dir)),
                           metadata={"source": "books"})
