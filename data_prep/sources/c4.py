"""C4 (Raffel et al. 2020), as LLaMA re-processed it: exact dedup, language id, and C4's
heuristics, line level and page level (thresholds in recipes/schema.py, C4's values):

- lines: kept only if they end in terminal punctuation and have at least `min_words_per_line`
  words; lines mentioning javascript or a cookie/privacy/terms-of-use policy are dropped;
  citation markers like [1], [edit], [citation needed] are removed;
- pages: dropped if they contain "lorem ipsum", a curly bracket (code), or a word from the
  bad-words list (a file, one word per line), or have fewer than `min_sentences` sentences left;
- dedup, C4's rule: "we discarded all but one of any three-sentence span occurring more than once
  in the data set". This runs on datatrove's three sentence-dedup stages (span hashes per task,
  one sorted merge that finds repeats, per-task removal), so it scales past one task; sentences
  come from `SentenceSplitter` below. A page left with fewer than `min_sentences` sentences is
  dropped. Exact duplicate pages need no step of their own: every span of a copy repeats.
"""

from __future__ import annotations

import re
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.utils.word_tokenizers import WordTokenizer

from data_prep.sources import InputError

TERMINAL_PUNCTUATION = (".", "!", "?", '"', "”", "'")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.I)
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


def c4_clean(text: str, min_words_per_line: int, min_sentences: int, bad_words: frozenset[str]):
    """(cleaned page, None) or (None, the rule that dropped it)."""
    lowered = text.lower()
    if "lorem ipsum" in lowered:
        return None, "lorem_ipsum"
    if "{" in text:
        return None, "curly_bracket"
    if bad_words and bad_words & set(re.findall(r"[\w'-]+", lowered)):
        return None, "bad_words"
    kept = []
    for line in text.split("\n"):
        line = _CITATION.sub("", line).strip()
        low = line.lower()
        if not line.endswith(TERMINAL_PUNCTUATION) or len(line.split()) < min_words_per_line:
            continue
        if "javascript" in low or any(p in low for p in POLICY_PHRASES):
            continue
        kept.append(line)
    page = "\n".join(kept)
    if count_sentences(page) < min_sentences:
        return None, "too_few_sentences"
    return page, None


class C4QualityFilter(PipelineStep):
    name = "c4 heuristics"
    type = "🔻 - FILTER"

    def __init__(self, min_words_per_line: int, min_sentences: int, bad_words_file: str | None):
        super().__init__()
        self.min_words_per_line, self.min_sentences = min_words_per_line, min_sentences
        self.bad_words = load_bad_words(bad_words_file)

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("total")
            page, reason = c4_clean(doc.text, self.min_words_per_line, self.min_sentences, self.bad_words)
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
