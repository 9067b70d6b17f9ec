"""C4 (Raffel et al. 2020), as LLaMA re-processed it: exact dedup, language id, and C4's
heuristics as the code that made C4 has them (TFDS `c4_utils.clean_page`; the T5 paper's prose
swaps the two counts), thresholds in recipes/schema.py. Line by line, in this order:

- a line with a word over `max_word_length` (1,000) characters goes; citation markers ([1],
  [edit], [citation needed]) are removed; a line must end in . ? ! or " and not in an ellipsis,
  and have at least `min_words_per_line` (5) words;
- then, among such lines: "lorem ipsum" drops the page; "javascript" drops the line; a curly
  bracket drops the page (code); a cookie/privacy/terms-of-use line goes; a bad word (from the
  list file; none without one, and the report says so) drops the page. As C4's regex, a bad word
  counts only with a non-letter on both sides inside the line;
- a page left with fewer than `min_sentences` (3) sentences is dropped. Sentences are counted by
  end marks (C4 used nltk's punkt, a download).

Then dedup, C4's rule: "we discarded all but one of any three-sentence span occurring more than once
in the data set". This runs on datatrove's three sentence-dedup stages (span hashes per task, one
sorted merge that finds repeats, per-task removal), so it scales past one task; sentences come from
`SentenceSplitter` below. A page left with fewer than `min_sentences` sentences is dropped. Exact
duplicate pages need no step of their own: every span of a copy repeats.
"""

from __future__ import annotations

import re
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.utils.word_tokenizers import WordTokenizer

from data_prep.sources import InputError

END_MARKS = (".", "?", "!", '"')
ELLIPSIS = "..."
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”]?(?=\s|$)")


def count_sentences(text: str) -> int:
    return len(_SENTENCE_END.findall(text))


def load_bad_words(path: str | None) -> frozenset[str]:
    if not path:
        return frozenset()
    try:
        return frozenset(w.strip().lower() for w in Path(path).read_text(encoding="utf-8").splitlines() if w.strip())
    except OSError as e:
        raise InputError(f"{path}: cannot read the bad-words list ({e.strerror})") from None


def bad_words_pattern(words: frozenset[str]) -> re.Pattern | None:
    """C4's test: a listed word with a non-letter before and after it, inside the lower-cased line
    (so not at the very start or end of a line). The words match literally."""
    if not words:
        return None
    return re.compile("[^a-z](" + "|".join(re.escape(w) for w in sorted(words)) + ")[^a-z]")


def c4_clean(text: str, min_words_per_line: int = 5, min_sentences: int = 3, bad_words: re.Pattern | None = None,
             max_word_length: int = 1000, lines_dropped: dict | None = None):
    """(cleaned page, None) or (None, the rule that dropped the page). `lines_dropped` counts the
    lines each line rule removed."""
    def drop_line(rule):
        if lines_dropped is not None:
            lines_dropped[rule] = lines_dropped.get(rule, 0) + 1

    kept, sentences = [], 0
    for line in text.splitlines():
        line = line.strip()
        if any(len(word) > max_word_length for word in line.split()):
            drop_line("too_long_word")
            continue
        line = _CITATION.sub("", line)
        if not line.endswith(END_MARKS) or line.endswith(ELLIPSIS):
            drop_line("no_end_mark")
            continue
        if len(line.split()) < min_words_per_line:
            drop_line("too_few_words")
            continue
        low = line.lower()
        if "lorem ipsum" in low:
            return None, "lorem_ipsum"
        if "javascript" in low:
            drop_line("javascript")
            continue
        if "{" in line:
            return None, "curly_bracket"
        if any(p in low for p in POLICY_PHRASES):
            drop_line("policy")
            continue
        if bad_words is not None and bad_words.search(low):
            return None, "bad_words"
        sentences += count_sentences(line)
        kept.append(line)
    if sentences < min_sentences:
        return None, "too_few_sentences"
    return "\n".join(kept).strip(), None


class C4QualityFilter(PipelineStep):
    name = "c4 heuristics"
    type = "🔻 - FILTER"

    def __init__(self, min_words_per_line: int, min_sentences: int, bad_words_file: str | None,
                 max_word_length: int = 1000):
        super().__init__()
        self.min_words_per_line, self.min_sentences = min_words_per_line, min_sentences
        self.max_word_length = max_word_length
        self.bad_words = bad_words_pattern(load_bad_words(bad_words_file))

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("total")
            lines: dict[str, int] = {}
            page, reason = c4_clean(doc.text, self.min_words_per_line, self.min_sentences, self.bad_words,
                                    self.max_word_length, lines)
            for rule, n in lines.items():
                self.stat_update(f"lines_dropped_{rule}", value=n)
            if page is None:
                self.stat_update(f"dropped_{reason}")
                continue
            self.stat_update("chars_removed", value=len(doc.text) - len(page))
            self.stat_update("forwarded")
            doc.text = page
            yield doc


class SentenceSplitter(WordTokenizer):
    """Sentences for the span dedup: a line break always ends one, and so does . ! or ? (with
    closing quotes or brackets) before whitespace. Rule-based, so no model (nltk's punkt) has to
    be downloaded; it splits "Dr. Smith" in two, which costs recall on such spans only."""

    def __init__(self):
        super().__init__("en")

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans = []
        for line in re.finditer(r"[^\n]+", text):
            start = line.start()
            ends = [line.start() + m.end() for m in _SENTENCE_BOUNDARY.finditer(line.group())]
            for end in [*ends, line.end()]:
                while start < end and text[start].isspace():
                    start += 1
                stop = end
                while stop > start and text[stop - 1].isspace():
                    stop -= 1
                if stop > start:
                    spans.append((start, stop))
                start = end
        return spans

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b] for a, b in self.span_tokenize(text)]

    def word_tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)


_SENTENCE_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s)")


def span_dedup_config(min_sentences: int):
    """C4's rule in datatrove's terms: spans of 3 sentences, no minimum span or page length in
    words (C4 has none), pages left with fewer than `min_sentences` sentences dropped. Spans are
    hashed to 64 bits with SHA-1 (datatrove's xxhash path passes str, which xxhash 4 refuses)."""
    from datatrove.pipeline.dedup.sentence_dedup import SentDedupConfig
    from datatrove.utils.hashing import HashConfig

    return SentDedupConfig(n_sentences=3, split_sentences=True, min_doc_words=0, min_num_sentences=min_sentences,
                           min_words_to_remove_span=0, hash_config=HashConfig(precision=64, hash_fc="sha1"))
