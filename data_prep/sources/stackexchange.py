"""StackExchange: the largest sites of the dump, one document per question with its answers.

LLaMA kept the 28 largest websites, removed HTML tags and sorted answers by score, highest first.
Input: the dump's site folders, each with a Posts.xml (rows with PostTypeId 1 = question, 2 =
answer, ParentId, Score, Title, Body). Scores are compared as integers (as text, "9" > "10").
"""

from __future__ import annotations

import html
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


def site_documents(posts_xml: Path) -> list[dict]:
    """One {"id", "text"} per question: title, body, then its answers by score (highest first;
    ties by post id)."""
    questions: dict[str, dict] = {}
    answers: dict[str, list[tuple[int, int, str]]] = {}
    try:
        for _, row in ET.iterparse(posts_xml):
            if row.tag != "row":
                continue
            kind, post_id = row.get("PostTypeId"), row.get("Id")
            if kind == "1":
                questions[post_id] = {"title": row.get("Title", ""), "body": row.get("Body", "")}
            elif kind == "2":
                answers.setdefault(row.get("ParentId"), []).append(
                    (int(row.get("Score", "0")), int(post_id), row.get("Body", "")))
            row.clear()
    except ET.ParseError as e:
        raise InputError(f"{posts_xml}: not a readable Posts.xml ({e})") from None
    except FileNotFoundError:
        raise InputError(f"{posts_xml}: does not exist") from None
    docs = []
    for qid, q in questions.items():
        parts = [strip_html(q["title"]), strip_html(q["body"])]
        for _, _, body in sorted(answers.get(qid, []), key=lambda a: (-a[0], a[1])):
            parts.append(strip_html(body))
        docs.append({"id": f"{posts_xml.parent.name}/{qid}", "text": "\n\n".join(p for p in parts if p)})
    return docs


class StackExchangeReader(PipelineStep):
    """Documents of the `sites` largest sites; task `rank` of `world_size` reads every
    world_size-th site."""

    name = "stackexchange reader"
    type = "📖 - READER"

    def __init__(self, dump_dir: str, sites: int = 28):
        super().__init__()
        self.dump_dir, self.sites = Path(dump_dir), sites

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for site in largest_sites(self.dump_dir, self.sites)[rank::world_size]:
            for d in site_documents(site / "Posts.xml"):
                self.stat_update("documents")
                yield Document(text=d["text"], id=d["id"], metadata={"source": "stackexchange", "site": site.name})
