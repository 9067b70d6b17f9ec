"""StackExchange: the largest sites of the dump, one document per question with its answers.

LLaMA kept the 28 largest websites, removed HTML tags and sorted answers by score, highest first.
Input: the dump's site folders, each with a Posts.xml (one <row/> per line: PostTypeId 1 =
question, 2 = answer, ParentId, Score, Title, Body). Scores are compared as integers (as text,
"9" > "10").

Stack Overflow's Posts.xml is about 100 GB, so nothing holds a site: stage `split` streams byte
ranges of every site (`piece_bytes`; several tasks per site) and writes each post to a bucket of its
question (`bucket_bytes` of posts per bucket); stage `assemble` groups one bucket at a time into
documents. Memory: a line while splitting, a bucket while assembling.
"""

from __future__ import annotations

import html
import json
import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from data_prep.sources import InputError

_BLOCK_TAGS = {"p", "div", "pre", "li", "ul", "ol", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6",
               "table", "tr", "br", "hr"}


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        self.parts.append(data)


def strip_html(body: str) -> str:
    """Text of an HTML fragment: tags removed, entities decoded, block elements on their own lines."""
    parser = _TextExtractor()
    parser.feed(body)
    parser.close()
    text = html.unescape("".join(parser.parts))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def largest_sites(dump_dir: Path, count: int) -> list[Path]:
    """The `count` site folders of a dump with the largest Posts.xml, largest first."""
    sites = [p.parent for p in Path(dump_dir).glob("*/Posts.xml")]
    if not sites:
        raise InputError(f"{dump_dir}: no <site>/Posts.xml found")
    return sorted(sites, key=lambda s: (-(s / "Posts.xml").stat().st_size, s.name))[:count]


_WRAPPER = (b"<?xml", b"<posts", b"</posts", b"\xef\xbb\xbf<?xml")


def _attrs(path: Path, offset: int, row: bytes) -> dict:
    try:
        return ET.fromstring(row.decode("utf-8")).attrib
    except (ET.ParseError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: byte {offset}: not a readable Posts.xml row ({e})") from None


def iter_rows(path: Path, start: int = 0, end: int | None = None):
    """Attributes of the rows that start in bytes [start, end) of a Posts.xml, a line at a time:
    the dumps write one <row .../> per line (newlines in text as &#xA;); a row whose text holds a
    raw line break continues until its "/>". Memory: one row, for any range of any size."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: does not exist") from None
    with f:
        end = path.stat().st_size if end is None else end
        pos = start
        if pos > 0:
            f.seek(pos - 1)
            pos += len(f.readline()) - 1  # the line holding byte start-1 belongs to the range before
        row, row_at = None, 0
        aligned = pos == 0  # after a cut: lines that end a row begun in the range before are skipped
        while (line := f.readline()):
            text = line.strip()
            if row is not None:  # inside a row that spans lines
                row += line
                if text.endswith(b"/>"):
                    yield _attrs(path, row_at, row.strip())
                    row = None
            elif pos >= end:
                break
            elif text.startswith(b"<row"):
                aligned = True
                if text.endswith(b"/>"):
                    yield _attrs(path, pos, text)
                else:
                    row, row_at = line, pos
            elif text and not text.startswith(_WRAPPER) and aligned:
                raise InputError(f"{path}: byte {pos}: not a <row .../> line")
            pos += len(line)
        if row is not None:
            raise InputError(f"{path}: byte {row_at}: a row that never ends (the file is cut short)")


def question_of(row: dict) -> str | None:
    """The question a post belongs to: its own id (a question), its parent (an answer), else None."""
    kind = row.get("PostTypeId")
    return row.get("Id") if kind == "1" else row.get("ParentId") if kind == "2" else None


def assemble(site: str, rows) -> list[dict]:
    """One {"id", "text"} per question of `rows` (questions and answers of any order), in question
    id order: title, body, then its answers by integer score (highest first; ties by post id)."""
    questions: dict[int, tuple[str, str]] = {}
    answers: dict[int, list[tuple[int, int, str]]] = {}
    for row in rows:
        if row.get("PostTypeId") == "1":
            questions[int(row["Id"])] = (row.get("Title", ""), row.get("Body", ""))
        elif row.get("PostTypeId") == "2":
            answers.setdefault(int(row["ParentId"]), []).append((int(row.get("Score", "0")), int(row["Id"]),
                                                                 row.get("Body", "")))
    docs = []
    for qid in sorted(questions):
        parts = [strip_html(questions[qid][0]), strip_html(questions[qid][1])]
        parts += [strip_html(body) for _, _, body in sorted(answers.get(qid, []), key=lambda a: (-a[0], a[1]))]
        docs.append({"id": f"{site}/{qid}", "text": "\n\n".join(p for p in parts if p)})
    return docs


def site_documents(posts_xml: Path) -> list[dict]:
    """All documents of one (small) site in memory; the pipeline streams instead (below)."""
    return assemble(Path(posts_xml).parent.name, (r for r in iter_rows(Path(posts_xml)) if question_of(r)))


def buckets_of(posts_xml: Path, bucket_bytes: int) -> int:
    """Buckets of a site: about bucket_bytes of posts each (what one assemble unit holds in memory),
    at most 512 (one open file each while a piece is split)."""
    return max(1, min(512, -(-posts_xml.stat().st_size // bucket_bytes)))


def pieces_of(sites: list[Path], piece_bytes: int) -> list[tuple[Path, int, int]]:
    """(site, start, end) byte ranges of the sites' Posts.xml: the split stage's units of work."""
    out = []
    for site in sites:
        size = (site / "Posts.xml").stat().st_size
        out += [(site, a, min(a + piece_bytes, size)) for a in range(0, max(size, 1), piece_bytes)]
    return out


class StackExchangeSplit(PipelineStep):
    """Stage 1 (any number of tasks, several per large site): stream byte ranges of the largest
    sites' Posts.xml and write each question and answer to its question's bucket,
    <work>/<site>/<bucket>/<piece>.jsonl (written as .tmp, renamed when the piece is done)."""

    name = "stackexchange split"
    type = "📖 - READER"

    def __init__(self, dump_dir: str, work_dir: str, sites: int, piece_bytes: int, bucket_bytes: int):
        super().__init__()
        self.dump_dir, self.work_dir, self.sites = Path(dump_dir), Path(work_dir), sites
        self.piece_bytes, self.bucket_bytes = piece_bytes, bucket_bytes

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        pieces = pieces_of(largest_sites(self.dump_dir, self.sites), self.piece_bytes)
        for number, (site, start, end) in enumerate(pieces):
            if number % world_size != rank:
                continue
            buckets = buckets_of(site / "Posts.xml", self.bucket_bytes)
            files: dict[int, object] = {}
            try:
                for row in iter_rows(site / "Posts.xml", start, end):
                    qid = question_of(row)
                    if qid is None:
                        continue
                    self.stat_update("posts")
                    b = int(qid) % buckets
                    if b not in files:
                        folder = self.work_dir / site.name / f"{b:05d}"
                        folder.mkdir(parents=True, exist_ok=True)
                        files[b] = open(folder / f"{number:06d}.jsonl.tmp", "w", encoding="utf-8")
                    keep = ("Id", "PostTypeId", "ParentId", "Score", "Title", "Body")
                    files[b].write(json.dumps({k: row[k] for k in keep if k in row}) + "\n")
            finally:
                for f in files.values():
                    f.close()
            for b in files:
                tmp = self.work_dir / site.name / f"{b:05d}" / f"{number:06d}.jsonl.tmp"
                os.replace(tmp, tmp.with_suffix(""))
        yield from ()  # a step that only writes files


class StackExchangeAssemble(PipelineStep):
    """Stage 2 (any number of tasks): each (site, bucket) in turn, its posts grouped into one
    document per question; memory holds one bucket."""

    name = "stackexchange assemble"
    type = "📖 - READER"

    def __init__(self, work_dir: str):
        super().__init__()
        self.work_dir = Path(work_dir)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        units = sorted(p for p in self.work_dir.glob("*/*") if p.is_dir())
        for bucket in units[rank::world_size]:
            rows = (json.loads(line) for part in sorted(bucket.glob("*.jsonl")) for line in open(part, encoding="utf-8"))
            for d in assemble(bucket.parent.name, rows):
                self.stat_update("documents")
                yield Document(text=d["text"], id=d["id"], metadata={"source": "stackexchange",
                                                                      "site": bucket.parent.name})
