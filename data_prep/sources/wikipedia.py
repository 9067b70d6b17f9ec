"""Wikipedia: dumps in the paper's 20 languages (June-August 2022 in LLaMA), main-namespace
articles only, no redirects; hyperlinks, templates, references, comments, tables, files,
categories and formatting removed (mwparserfromhell), link text kept.

Input: `<lang>wiki-*-pages-articles*.xml.bz2` dumps (the language comes from the dump's dbname).
"""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from data_prep.sources import InputError

# bg, ca, cs, da, de, en, es, fr, hr, hu, it, nl, pl, pt, ro, ru, sl, sr, sv, uk (LLaMA, section 2.1)
LANGUAGES = ("bg", "ca", "cs", "da", "de", "en", "es", "fr", "hr", "hu", "it", "nl", "pl", "pt", "ro", "ru",
             "sl", "sr", "sv", "uk")
_REF = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_LEFTOVER_TAG = re.compile(r"</?(?:ref|references|br|small|big|span|div|sup|sub|center|blockquote|poem|onlyinclude|"
                           r"includeonly|noinclude)\b[^>]*>", re.I)
_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight",
              "source", "pre", "nowiki"}


def check_languages(languages) -> list[str]:
    unknown = [code for code in languages if code not in LANGUAGES]
    if unknown:
        raise InputError(f"wikipedia.languages: {', '.join(map(repr, unknown))} not among the paper's 20 "
                         f"({', '.join(LANGUAGES)})")
    return list(languages)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_pages(dump: Path):
    """(language, {namespace key: name}, page dict) for each page of a .xml.bz2 (or .xml) dump."""
    opener = bz2.open if dump.suffix == ".bz2" else open
    language, namespaces = None, {}
    try:
        with opener(dump, "rb") as f:
            for _, elem in ET.iterparse(f):
                tag = _local(elem.tag)
                if tag == "dbname":
                    language = re.sub(r"wiki$", "", elem.text or "")
                elif tag == "namespace":
                    namespaces[int(elem.get("key"))] = elem.text or ""
                elif tag == "page":
                    page = {"redirect": False}
                    for child in elem.iter():
                        name = _local(child.tag)
                        if name in ("title", "ns", "text") and name not in page:
                            page[name] = child.text or ""
                        elif name == "redirect":
                            page["redirect"] = True
                        elif name == "id" and "id" not in page:
                            page["id"] = child.text
                    if language is None:  # no <siteinfo>: the dump's file name says (enwiki-...)
                        m = re.match(r"([a-z_]+?)wiki-", dump.name)
                        language = m.group(1) if m else ""
                    yield language, namespaces, page
                    elem.clear()
    except FileNotFoundError:
        raise InputError(f"{dump}: does not exist") from None
    except (OSError, EOFError, ET.ParseError) as e:
        raise InputError(f"{dump}: not a readable Wikipedia XML dump ({e})") from None


def remove_tables(wikitext: str) -> str:
    """Drop {| ... |} tables line by line (nested ones too): malformed attributes can keep the
    parser from seeing a table."""
    out, depth = [], 0
    for line in wikitext.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
            continue
        if depth == 0:
            out.append(line)
    return "\n".join(out)


def clean_wikitext(wikitext: str, file_namespaces: set[str]) -> str:
    """Plain text of an article: link text kept; templates, references, comments, tables, files,
    categories and bold/italic/heading markup removed."""
    import mwparserfromhell
    from mwparserfromhell.nodes import Comment, Tag, Template, Wikilink

    # References and comments first by pattern: the parser leaves some inside malformed markup.
    wikitext = remove_tables(_REF.sub("", _COMMENT.sub("", wikitext)))
    code = mwparserfromhell.parse(wikitext)
    for node in code.filter(recursive=False, forcetype=(Template, Comment)):
        _remove(code, node)
    for node in code.filter(forcetype=Tag):
        if str(node.tag).lower() in _DROP_TAGS:
            _remove(code, node)
    for node in code.filter(forcetype=Wikilink):
        prefix = str(node.title).split(":", 1)[0].strip().lower() if ":" in str(node.title) else ""
        if prefix in file_namespaces:
            _remove(code, node)
    text = code.strip_code(normalize=True, collapse=True)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)  # headings left by strip_code
    text = _LEFTOVER_TAG.sub("", text)
    # Quote runs the parser left (''Iliad'''s): formatting marks go, an apostrophe stays.
    text = re.sub(r"'{2,}", lambda m: "'" if len(m.group()) in (3, 4) else "", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with an enclosing node
        pass


class WikipediaReader(PipelineStep):
    """Main-namespace, non-redirect articles of the dumps whose language is configured; task
    `rank` of `world_size` reads every world_size-th dump."""

    name = "wikipedia reader"
    type = "📖 - READER"

    def __init__(self, input_dir: str, languages: list[str]):
        super().__init__()
        self.input_dir, self.languages = Path(input_dir), check_languages(languages)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        dumps = sorted(p for p in self.input_dir.rglob("*") if p.is_file() and ".xml" in p.name)
        if not dumps:
            raise InputError(f"{self.input_dir}: no Wikipedia .xml(.bz2) dumps")
        for dump in dumps[rank::world_size]:
            for language, namespaces, page in iter_pages(dump):
                if language not in self.languages:
                    self.stat_update(f"pages_skipped_language_{language}")
                    continue
                if page.get("ns") != "0":
                    self.stat_update("pages_skipped_namespace")
                    continue
                if page["redirect"]:
                    self.stat_update("pages_skipped_redirect")
                    continue
                files = {"file", "image", "category", namespaces.get(6, "").lower(), namespaces.get(14, "").lower()}
                text = clean_wikitext(page.get("text", ""), files - {""})
                if not text:
                    self.stat_update("pages_skipped_empty")
                    continue
                yield Document(text=text, id=f"{language}/{page.get('id')}",
                               metadata={"source": "wikipedia", "language": language, "title": page.get("title", "")})
