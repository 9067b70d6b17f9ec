"""CommonCrawl, the CCNet way (Wenzek et al. 2020; LLaMA section 2.1):

1. text from WET files (CommonCrawl's extracted text) or saved HTML pages (scripts, styles,
   navigation and forms dropped);
2. line-level dedup over the shard group (every task of the run), in three stages (hashes per
   task, one merge, removal per task): each line normalized (lowercase, digits -> 0, accents and
   punctuation removed, spaces collapsed) and hashed; every copy of a line whose hash occurs more
   than once is removed, so boilerplate disappears from every page, and pages left with fewer than
   300 characters are dropped (CCNet's rules);
3. fastText language id, English kept above a score threshold (data_prep/sources/common.py);
4. the n-gram LM filter: KenLM perplexity buckets, when a model is given (perplexity.py);
5. the "referenced by Wikipedia" classifier: a linear fastText model trained on pages cited as
   references by Wikipedia (positives) against random pages (negatives), both given by the user;
   pages it scores below the threshold as references are dropped.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from data_prep.sources import InputError

_DIGIT = re.compile(r"\d")
_SKIP_TAGS = {"script", "style", "noscript", "nav", "header", "footer", "aside", "form", "svg", "template", "iframe"}
_BLOCK_TAGS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article", "pre",
               "blockquote", "title", "td", "dd", "dt"}


def normalize_line(line: str) -> str:
    """CCNet-style normalization for dedup: lowercase, digits -> 0, accents, punctuation and symbols removed."""
    line = _DIGIT.sub("0", line.strip().lower())
    line = unicodedata.normalize("NFD", line)
    line = "".join(c for c in line if not unicodedata.category(c).startswith(("M", "P", "S")))
    return " ".join(line.split())


def _hash_normalized(normalized: str) -> bytes:
    return hashlib.sha1(normalized.encode()).digest()[:8]


class _HtmlText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:
            self.skip_depth += 1
        elif tag in _BLOCK_TAGS:
            self.pre_depth += tag == "pre"
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in _BLOCK_TAGS:
            self.pre_depth = max(0, self.pre_depth - (tag == "pre"))
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip_depth:
            # Source line breaks are layout, not text, except inside <pre>.
            self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Visible text of a page, one line per block element."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).split("\n"))
    return "\n".join(line for line in lines if line)


def read_wet(path: Path):
    """(url, text) of each 'conversion' record of a WET file (plain or .gz)."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: unreadable WET file ({e})") from None
    pos = 0
    while True:
        start = data.find(b"WARC/1.0\r\n", pos)
        if start < 0:
            break
        header_end = data.find(b"\r\n\r\n", start)
        if header_end < 0:
            raise InputError(f"{path}: truncated WARC record header at byte {start}")
        headers = dict(line.split(b": ", 1) for line in data[start:header_end].split(b"\r\n")[1:] if b": " in line)
        try:
            length = int(headers[b"Content-Length"])
        except (KeyError, ValueError):
            raise InputError(f"{path}: WARC record at byte {start} has no Content-Length") from None
        body = data[header_end + 4:header_end + 4 + length]
        if len(body) < length:
            raise InputError(f"{path}: truncated WARC record at byte {start}")
        if headers.get(b"WARC-Type") == b"conversion":
            yield headers.get(b"WARC-Target-URI", b"").decode(), body.decode("utf-8", errors="replace")
        pos = header_end + 4 + length


class WebPageReader(PipelineStep):
    """Documents from *.warc.wet(.gz) files and saved *.html pages under a folder."""

    name = "web page reader"
    type = "📖 - READER"

    def __init__(self, input_dir: str):
        super().__init__()
        self.input_dir = Path(input_dir)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        files = sorted(p for p in self.input_dir.rglob("*")
                       if p.name.endswith((".wet", ".wet.gz", ".html", ".htm")))
        if not files:
            raise InputError(f"{self.input_dir}: no .wet(.gz) or .html files")
        for path in files[rank::world_size]:
            if path.name.endswith((".html", ".htm")):
                raw = path.read_bytes()
                text = html_to_text(raw.decode("utf-8", errors="replace"))
                records = [(path.name, text)]
            else:
                records = list(read_wet(path))
            for i, (url, text) in enumerate(records):
                self.stat_update("documents")
                yield Document(text=text, id=f"{path.name}/{i}", metadata={"source": "commoncrawl", "url": url})


def _hashed_lines(text: str) -> tuple[list[str], list[int]]:
    """The page's lines that normalize to something, and their 64-bit hashes (normalized once)."""
    lines, hashes = [], []
    for line in text.split("\n"):
        normalized = normalize_line(line)
        if normalized:
            lines.append(line)
            hashes.append(int.from_bytes(_hash_normalized(normalized), "little"))
    return lines, hashes


class LineHashes(PipelineStep):
    """Dedup stage 1 (every task): each normalized line's hash, with how often this task saw it, to
    <folder>/<rank>.npz. The documents pass on unchanged."""

    name = "line hashes"
    type = "🫂 - DEDUP"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = Path(folder)

    def run(self, data, rank: int = 0, world_size: int = 1):
        import numpy as np

        hashes = []
        for doc in data:
            hashes.extend(_hashed_lines(doc.text)[1])
            yield doc
        unique, counts = np.unique(np.array(hashes, dtype=np.uint64), return_counts=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{rank:05d}.tmp.npz"
        np.savez(tmp, hashes=unique, counts=counts)
        tmp.replace(self.folder / f"{rank:05d}.npz")
        self.stat_update("lines", value=len(hashes))


class FindDuplicateLines(PipelineStep):
    """Dedup stage 2 (one task): the hashes seen more than once over every task of the group."""

    name = "find duplicate lines"
    type = "🫂 - DEDUP"

    def __init__(self, hashes_folder: str, out_file: str):
        super().__init__()
        self.hashes_folder, self.out_file = Path(hashes_folder), Path(out_file)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import numpy as np

        parts = [np.load(p) for p in sorted(self.hashes_folder.glob("*.npz")) if not p.name.endswith(".tmp.npz")]
        hashes = np.concatenate([p["hashes"] for p in parts]) if parts else np.zeros(0, np.uint64)
        counts = np.concatenate([p["counts"] for p in parts]) if parts else np.zeros(0, np.int64)
        order = np.argsort(hashes, kind="stable")
        hashes, counts = hashes[order], counts[order]
        unique, start = np.unique(hashes, return_index=True)
        totals = np.add.reduceat(counts, start) if len(hashes) else counts
        duplicates = unique[totals > 1]
        tmp = self.out_file.with_name(self.out_file.name + ".tmp.npy")
        np.save(tmp, duplicates)
        tmp.replace(self.out_file)
        self.stat_update("distinct_lines", value=len(unique))
        self.stat_update("duplicated_lines", value=len(duplicates))
        return iter(())


class RemoveDuplicateLines(PipelineStep):
    """Dedup stage 3 (every task): every line whose hash stage 2 found more than once goes, in every
    page that has it (CCNet: boilerplate disappears); a page left under `min_chars` characters is
    dropped (CCNet's 300)."""

    name = "line dedup"
    type = "🫂 - DEDUP"

    def __init__(self, duplicates_file: str, min_chars: int):
        super().__init__()
        self.duplicates_file, self.min_chars = duplicates_file, min_chars

    def run(self, data, rank: int = 0, world_size: int = 1):
        import numpy as np

        duplicates = np.load(self.duplicates_file)
        for doc in data:
            self.stat_update("total")
            lines, hashes = _hashed_lines(doc.text)
            repeated = np.isin(np.array(hashes, dtype=np.uint64), duplicates)
            kept = [line for line, dup in zip(lines, repeated) if not dup]
            self.stat_update("lines_removed", value=int(repeated.sum()))
            text = "\n".join(kept)
            if len(text) < self.min_chars:
                self.stat_update("dropped_empty_after_dedup" if not kept else "dropped_too_short")
                continue
            self.stat_update("chars_removed", value=len(doc.text) - len(text))
            doc.text = text
            self.stat_update("forwarded")
            yield doc


def train_reference_classifier(positives: list[str], negatives: list[str], out: Path, epochs: int = 25,
                               seed: int = 0) -> Path:
    """A fastText linear classifier: __label__wiki (pages Wikipedia cites) vs __label__random."""
    import fasttext

    out.parent.mkdir(parents=True, exist_ok=True)
    train = out.with_suffix(".train.txt")
    with open(train, "w", encoding="utf-8") as f:
        for label, texts in (("wiki", positives), ("random", negatives)):
            for t in texts:
                f.write(f"__label__{label} {' '.join(t.split())}\n")
    model = fasttext.train_supervised(input=str(train), epoch=epochs, lr=0.5, wordNgrams=2, dim=32, thread=1,
                                      seed=seed, verbose=0)
    tmp = out.with_suffix(".tmp")
    model.save_model(str(tmp))
    tmp.rename(out)
    train.unlink()
    return out


class ReferenceClassifierFilter(BaseFilter):
    """Keeps pages the classifier scores as Wikipedia-reference-like with P >= min_score."""

    name = "wikipedia reference classifier"

    def __init__(self, model_path: str, min_score: float):
        super().__init__()
        self.model_path, self.min_score = model_path, min_score
        self._model = None

    def score(self, text: str) -> float:
        if self._model is None:
            import fasttext

            if not Path(self.model_path).is_file():
                raise InputError(f"{self.model_path}: reference classifier model does not exist")
            self._model = fasttext.load_model(self.model_path)
        labels, probs = self._model.predict(" ".join(text.split()), k=2)
        return float(dict(zip(labels, probs)).get("__label__wiki", 0.0))

    def filter(self, doc: Document):
        p = self.score(doc.text)
        doc.metadata["reference_score"] = round(p, 4)
        return (True if p >= self.min_score else (False, "not_reference_like"))
