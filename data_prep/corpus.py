"""A small real English corpus that is available offline: Project Gutenberg's "Botchan".

The book ships inside sentencepiece's source distribution on PyPI (test/botchan.txt), which pip
can fetch from the package registry on any machine that can install the requirements. The
Gutenberg header and license footer are cut; paragraphs become JSONL documents ({"text": ...}).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "sentencepiece==0.2.3"
SDIST_SHA256 = "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"
MEMBER = "sentencepiece-0.2.3/test/botchan.txt"

_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg", re.M)


def fetch_botchan(cache_dir: Path) -> str:
    """The raw book text, downloaded once (pip download of the sdist, checksum verified)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    raw = cache_dir / "botchan.txt"
    if raw.is_file():
        return raw.read_text(encoding="utf-8-sig")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", SDIST, "-d", tmp],
            check=True,
        )
        sdist = next(Path(tmp).glob("sentencepiece-*.tar.gz"))
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise RuntimeError(f"{sdist.name}: sha256 {digest} != expected {SDIST_SHA256}")
        with tarfile.open(sdist) as tar:
            text = tar.extractfile(MEMBER).read().decode("utf-8-sig")
    tmp_raw = raw.with_suffix(".tmp")
    tmp_raw.write_text(text, encoding="utf-8")
    tmp_raw.replace(raw)
    return text


def strip_gutenberg(text: str) -> str:
    """The book between Gutenberg's START and END markers (the whole text if they are absent)."""
    start = _START.search(text)
    end = _END.search(text, start.end() if start else 0)
    return text[start.end() if start else 0:end.start() if end else len(text)]


def paragraphs(text: str, width: int = 60) -> list[str]:
    """Paragraphs of a hard-wrapped text whose blank lines were removed (as in this copy): a line
    that is shorter than the wrap width and ends a sentence closes its paragraph."""
    paras, current = [], []
    for line in text.replace("\r\n", "\n").split("\n"):
        line = line.strip()
        if line:
            current.append(line)
        if current and (not line or (len(line) < width and line[-1] in ".!?\"'")):
            paras.append(" ".join(current))
            current = []
    if current:
        paras.append(" ".join(current))
    return [p for p in paras if len(p) >= 20]


def write_demo_corpus(out_dir: Path, cache_dir: Path) -> Path:
    """Write botchan paragraphs as JSONL documents; returns the file."""
    docs = paragraphs(strip_gutenberg(fetch_botchan(cache_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "books.jsonl"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    tmp.replace(path)
    return path
