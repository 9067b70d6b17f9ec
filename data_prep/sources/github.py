"""GitHub: code of Apache-, BSD- and MIT-licensed repositories, low-quality files dropped by line
length and alphanumeric share, leading license/copyright headers removed, exact duplicate files
removed (LLaMA paper, section 2.1; thresholds in recipes/clean.yaml, as in RedPajama's filters).
The exact dedup is corpus-wide with any number of tasks: datatrove's three exact-dedup stages
(a hash per file per task, one sorted merge, per-task removal; see data_prep/clean.py).

Input: a folder with one sub-folder per repository. A repository's license comes from its license
files (LICENSE*, LICENCE*, COPYING*); a repository with none, or with a copyleft one (GPL, LGPL,
AGPL) next to a permissive one, is skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from data_prep.sources import InputError

_LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING)([.-].*)?$", re.I)


def _phrase(text: str) -> str:
    """A regex for a sentence of a license, whatever its line breaks and comment markers."""
    return r"[\s#*/]+".join(map(re.escape, text.split()))


_SIGNATURES = {
    "apache-2.0": re.compile(_phrase("Apache License") + r".{0,40}" + _phrase("Version 2.0"), re.I | re.S),
    "mit": re.compile(_phrase("Permission is hereby granted, free of charge, to any person obtaining a copy"), re.I),
    "bsd": re.compile(_phrase("Redistribution and use in source and binary forms, with or without modification, "
                              "are permitted"), re.I),
    "copyleft": re.compile(r"GNU[\s#*/]+(LESSER[\s#*/]+|LIBRARY[\s#*/]+|AFFERO[\s#*/]+)?GENERAL[\s#*/]+PUBLIC"
                           r"[\s#*/]+LICENSE", re.I),
}
# A leading comment block that mentions a license or copyright: C-style, or a run of line comments.
_HEADER = re.compile(
    r"\A(?:#![^\n]*\n|[ \t]*#[ \t]*-\*-[^\n]*\n)?\s*(?:/\*.*?\*/|(?:[ \t]*(?://|#(?![!a-z])|--|;)[^\n]*\n)+)", re.S)
_HEADER_WORDS = re.compile(r"copyright|licen[cs]e|SPDX-License-Identifier|all rights reserved", re.I)


def detect_license(repo: Path) -> str | None:
    """'apache-2.0', 'mit' or 'bsd'; None without a license file or with a copyleft one."""
    found = set()
    for path in sorted(repo.iterdir()):
        if path.is_file() and _LICENSE_FILE.match(path.name):
            text = path.read_text(encoding="utf-8", errors="replace")
            found |= {name for name, sig in _SIGNATURES.items() if sig.search(text)}
    if "copyleft" in found or not found:
        return None
    return sorted(found)[0]


def strip_license_header(code: str) -> str:
    """The file without a leading comment block that is a license or copyright notice (a shebang
    line is kept)."""
    m = _HEADER.match(code)
    if m is None or not _HEADER_WORDS.search(m.group()):
        return code
    shebang = code[:code.index("\n") + 1] if code.startswith("#!") else ""
    return shebang + code[m.end():].lstrip("\n")


def file_quality(code: str) -> tuple[int, float, float]:
    """(longest line, mean line length, alphanumeric share of characters)."""
    lines = code.split("\n")
    lengths = [len(line) for line in lines]
    alnum = sum(c.isalnum() for c in code)
    return max(lengths), sum(lengths) / len(lengths), alnum / max(1, len(code))


class GithubReader(PipelineStep):
    """Files with allowed extensions of permissively licensed repositories."""

    name = "github reader"
    type = "📖 - READER"

    def __init__(self, input_dir: str, licenses: list[str], extensions: list[str], max_file_bytes: int):
        super().__init__()
        self.input_dir, self.licenses = Path(input_dir), set(licenses)
        self.extensions, self.max_file_bytes = {e.lower() for e in extensions}, max_file_bytes

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if not self.input_dir.is_dir():
            raise InputError(f"{self.input_dir}: not a folder of repositories")
        repos = sorted(p for p in self.input_dir.iterdir() if p.is_dir())
        for repo in repos[rank::world_size]:
            license_name = detect_license(repo)
            if license_name not in self.licenses:
                self.stat_update(f"repos_skipped_license_{license_name or 'none_or_copyleft'}")
                continue
            self.stat_update("repos_kept")
            for path in sorted(repo.rglob("*")):
                if not path.is_file() or path.suffix.lower() not in self.extensions:
                    continue
                if path.stat().st_size > self.max_file_bytes:
                    self.stat_update("files_skipped_too_big")
                    continue
                try:
                    text = path.read_bytes().decode("utf-8")
                except UnicodeDecodeError:
                    self.stat_update("files_skipped_not_utf8")
                    continue
                yield Document(text=text, id=f"{repo.name}/{path.relative_to(repo)}",
                               metadata={"source": "github", "repo": repo.name, "license": license_name})


class StripLicenseHeaders(PipelineStep):
    name = "strip license headers"
    type = "✂️ - FORMAT"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            stripped = strip_license_header(doc.text)
            if stripped != doc.text:
                self.stat_update("headers_removed")
            doc.text = stripped
            yield doc


class CodeQualityFilter(BaseFilter):
    name = "code quality"

    def __init__(self, max_line_length: int, max_mean_line_length: float, min_alphanumeric_share: float):
        super().__init__()
        self.max_line_length, self.max_mean_line_length = max_line_length, max_mean_line_length
        self.min_alphanumeric_share = min_alphanumeric_share

    def filter(self, doc: Document):
        longest, mean, alnum = file_quality(doc.text)
        if longest > self.max_line_length:
            return False, "max_line_length"
        if mean > self.max_mean_line_length:
            return False, "mean_line_length"
        if alnum < self.min_alphanumeric_share:
            return False, "alphanumeric_share"
        return True


def file_text(doc: Document) -> str:
    """What the exact dedup compares: the file's text after its license header was removed."""
    return doc.text


def exact_dedup_config():
    """Files hashed with SHA-1 to 64 bits (datatrove's xxhash path passes str, which xxhash 4
    refuses); of identical files the one read first in its task, lowest task index on ties, stays."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
    from datatrove.utils.hashing import HashConfig

    return ExactDedupConfig(content_getter=file_text, hash_config=HashConfig(precision=64, hash_fc="sha1"))
