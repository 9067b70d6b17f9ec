"""ArXiv: LaTeX sources cleaned as LLaMA did (following Lewkowycz et al. 2022): everything before
the first section and the bibliography removed, comments removed, user-defined macros
(`\\newcommand`, `\\renewcommand`, `\\def`, with and without arguments) expanded inline.

A paper is its main file (the one with `\\documentclass`) with every `\\input`, `\\include` and
`\\subfile` of a file in the input folder inlined, recursively, as LaTeX would read them (RedPajama
concatenated a paper's files; the sections of multi-file papers live in the included ones).
"""

from __future__ import annotations

import re
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from data_prep.sources import InputError

_SECTION = re.compile(r"\\(?:part|chapter|section|subsection)\*?\s*[\[{]")
_BIBLIOGRAPHY = re.compile(r"\\begin\{thebibliography\}|\\bibliography\{|\\printbibliography|"
                           r"\\section\*?\{\s*(?:References|Bibliography)\s*\}", re.I)
_NAME = r"\\([A-Za-z@]+)"
_COMMENT = re.compile(r"(?<!\\)(?:\\\\)*%")  # % after an even number of backslashes


def remove_comments(tex: str) -> str:
    """Drop `%` comments (not `\\%`); a line that was only a comment disappears entirely."""
    out = []
    for line in tex.split("\n"):
        m = _COMMENT.search(line)
        if m is None:
            out.append(line)
        elif line[:m.end() - 1].strip():
            out.append(line[:m.end() - 1].rstrip())
    return "\n".join(out)


def _balanced(text: str, start: int) -> tuple[str, int]:
    """(contents, index after) of the {...} group opening at text[start]; `\\{`, `\\}` do not count."""
    if not text.startswith("{", start):
        raise ValueError("no group")
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    raise ValueError("unbalanced braces")


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n":
        i += 1
    return i


def collect_macros(tex: str) -> tuple[dict[str, tuple[int, str]], str]:
    """({name: (argument count, body)}, text without the definitions)."""
    macros: dict[str, tuple[int, str]] = {}
    out, i = [], 0
    pattern = re.compile(r"\\(?:re)?newcommand\*?\s*\{?\s*" + _NAME + r"\s*\}?|\\def\s*" + _NAME)
    while True:
        m = pattern.search(tex, i)
        if m is None:
            out.append(tex[i:])
            break
        out.append(tex[i:m.start()])
        name = m.group(1) or m.group(2)
        j = m.end()
        try:
            if m.group(1):  # \newcommand{\name}[n][default]{body}
                nargs = 0
                j = _skip_space(tex, j)
                if tex.startswith("[", j):
                    close = tex.index("]", j)
                    nargs = int(tex[j + 1:close])
                    j = _skip_space(tex, close + 1)
                if tex.startswith("[", j):  # an optional first argument's default: treated as required
                    j = _skip_space(tex, tex.index("]", j) + 1)
                body, j = _balanced(tex, j)
            else:  # \def\name#1#2{body}
                params = re.match(r"(?:#\d)*", tex[j:]).group()
                nargs = len(params) // 2
                body, j = _balanced(tex, _skip_space(tex, j + len(params)))
        except (ValueError, IndexError):
            out.append(tex[m.start():m.end()])  # not a definition we understand: leave it
            i = m.end()
            continue
        macros[name] = (nargs, body)
        i = j
    return macros, "".join(out)


def expand_macros(tex: str, macros: dict[str, tuple[int, str]], max_passes: int = 10) -> str:
    """Replace uses of the macros by their bodies with #1..#n substituted (nested uses too)."""
    if not macros:
        return tex
    use = re.compile(r"\\(" + "|".join(sorted(map(re.escape, macros), key=len, reverse=True)) + r")(?![A-Za-z@])")
    for _ in range(max_passes):
        out, i, changed = [], 0, False
        for m in use.finditer(tex):
            if m.start() < i:
                continue
            nargs, body = macros[m.group(1)]
            j, args = m.end(), []
            try:
                for _ in range(nargs):
                    j = _skip_space(tex, j)
                    if tex.startswith("{", j):
                        arg, j = _balanced(tex, j)
                    else:  # a single token argument, as TeX reads it
                        arg, j = tex[j], j + 1
                    args.append(arg)
            except (ValueError, IndexError):
                continue
            expanded = body
            for k, arg in enumerate(args, 1):
                expanded = expanded.replace(f"#{k}", arg)
            out.append(tex[i:m.start()])
            out.append(expanded)
            i, changed = j, True
        out.append(tex[i:])
        tex = "".join(out)
        if not changed:
            break
    return tex


def clean_latex(tex: str) -> str | None:
    """The cleaned paper, or None when it has no section (nothing to keep)."""
    tex = remove_comments(tex)
    macros, tex = collect_macros(tex)
    first = _SECTION.search(tex)
    if first is None:
        return None
    tex = tex[first.start():]
    bib = _BIBLIOGRAPHY.search(tex)
    if bib:
        tex = tex[:bib.start()]
    tex = re.sub(r"\\end\{document\}.*", "", tex, flags=re.S)
    tex = expand_macros(tex, macros)
    return re.sub(r"\n{3,}", "\n\n", tex).strip() + "\n"


def read_paper(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


_INPUT = re.compile(r"\\(?:input|include|subfile)(?![A-Za-z@])\s*(?:\{([^{}]*)\}|([^\s{}\\%]+))")
MAX_INPUT_DEPTH = 10


def inline_inputs(text: str, base: Path, root: Path, missing: list[str], depth: int = 0) -> str:
    """`text` (a file in folder `base`) with comments removed and each \\input{name} /
    \\include{name} / \\subfile{name} replaced by that file (name or name.tex, relative to `base`,
    inside `root` only), recursively; names that resolve to nothing stay and go to `missing`."""
    text = remove_comments(text)  # a commented-out \\input is not read

    def replace(m: re.Match) -> str:
        name = (m.group(1) or m.group(2)).strip()
        for candidate in (base / name, base / f"{name}.tex"):
            try:
                path = candidate.resolve()
            except OSError:
                continue
            if path.is_file() and path.is_relative_to(root) and depth < MAX_INPUT_DEPTH:
                return inline_inputs(read_paper(path), base, root, missing, depth + 1)
        missing.append(name)
        return m.group(0)

    return _INPUT.sub(replace, text)


class ArxivReader(PipelineStep):
    """One document per .tex file that has a \\documentclass (the main file of a paper), with the
    files it includes inlined."""

    name = "arxiv reader"
    type = "📖 - READER"

    def __init__(self, input_dir: str):
        super().__init__()
        self.input_dir = Path(input_dir)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        files = sorted(self.input_dir.rglob("*.tex"))
        if not files:
            raise InputError(f"{self.input_dir}: no .tex files")
        for path in files[rank::world_size]:
            text = read_paper(path)
            if "\\documentclass" in remove_comments(text):
                missing: list[str] = []
                text = inline_inputs(text, path.parent, self.input_dir.resolve(), missing)
                self.stat_update("inputs_missing", value=len(missing))
                yield Document(text=text, id=str(path.relative_to(self.input_dir)), metadata={"source": "arxiv"})


class CleanLatex(PipelineStep):
    name = "clean latex"
    type = "✂️ - FORMAT"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("total")
            cleaned = clean_latex(doc.text)
            if cleaned is None:
                self.stat_update("dropped_no_section")
                continue
            self.stat_update("chars_removed", value=len(doc.text) - len(cleaned))
            doc.text = cleaned
            self.stat_update("forwarded")
            yield doc
