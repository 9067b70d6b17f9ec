"""CCNet's n-gram language-model filter (Wenzek et al. 2020), which LLaMA applied to CommonCrawl.

A page's perplexity under a KenLM model trained on Wikipedia measures how Wikipedia-like its text
is. CCNet scores each line after normalizing it (lowercase, accents removed, digits -> 0, unicode
punctuation mapped to ASCII) and splitting it into the SentencePiece pieces the model was trained
on; the page's perplexity is

    10 ** (-(sum of the lines' log10 probabilities) / (sum of (pieces + 1 for </s>) per line))

Pages fall into buckets at two cutoffs (CCNet uses each language's 33rd and 66th percentiles,
measured on a sample): head (perplexity below the first), middle, tail; only `keep_buckets` stay.
`perplexity_cutoffs` measures the percentiles on a sample of pages.

The model and tokenizer come from the user (CCNet publishes them per language as
<lang>.arpa.bin and <lang>.sp.model); KenLM reads both ARPA text and its binary format.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from data_prep.sources import InputError

BUCKETS = ("head", "middle", "tail")
_DIGIT = re.compile(r"\d")
# Unicode punctuation -> the ASCII CCNet's normalizer writes for it.
_PUNCT = str.maketrans({
    "，": ",", "。": ".", "、": ",", "„": '"', "”": '"', "“": '"', "«": '"', "»": '"', "「": '"', "」": '"',
    "《": '"', "》": '"', "‘": "'", "’": "'", "‚": "'", "´": "'", "`": "'", "：": ":", "；": ";", "！": "!",
    "？": "?", "（": "(", "）": ")", "–": "-", "—": "-", "−": "-", "…": "...", "•": "*", "·": "*", "／": "/",
})
_NON_PRINTING = {c for c in map(chr, range(0, 32)) if c not in "\t"} | {chr(c) for c in range(127, 160)}


def normalize_for_lm(line: str) -> str:
    """CCNet's LM normalization: lowercase, accents stripped, digits -> 0, punctuation to ASCII,
    non-printing characters removed, spaces collapsed."""
    line = unicodedata.normalize("NFD", line.strip().lower())
    line = "".join(c for c in line if unicodedata.category(c) != "Mn" and c not in _NON_PRINTING)
    return " ".join(_DIGIT.sub("0", line.translate(_PUNCT)).split())


class PerplexityScorer:
    """Perplexity of a text under a KenLM model, lines tokenized as the model was trained."""

    def __init__(self, model_path: str, tokenizer_path: str | None = None):
        try:
            import kenlm
        except ImportError:
            raise InputError("commoncrawl.kenlm_model: the kenlm package is not installed "
                             "(pip install -r requirements-kenlm.txt; it builds with g++)") from None

        if not Path(model_path).is_file():
            raise InputError(f"{model_path}: KenLM model does not exist")
        try:
            self.model = kenlm.Model(model_path)
        except (OSError, RuntimeError) as e:
            raise InputError(f"{model_path}: not a KenLM model (ARPA or binary): {e}") from None
        self.sp = None
        if tokenizer_path:
            import sentencepiece as spm

            if not Path(tokenizer_path).is_file():
                raise InputError(f"{tokenizer_path}: SentencePiece model does not exist")
            self.sp = spm.SentencePieceProcessor(model_file=tokenizer_path)

    def tokens(self, line: str) -> list[str]:
        line = normalize_for_lm(line)
        return self.sp.encode(line, out_type=str) if self.sp is not None else line.split()

    def log10_prob_and_length(self, text: str) -> tuple[float, int]:
        """Sum of log10 P over the text's lines (with <s> and </s>), and the number of scored tokens."""
        total, length = 0.0, 0
        for line in text.split("\n"):
            tokens = self.tokens(line)
            if not tokens:
                continue
            total += self.model.score(" ".join(tokens), bos=True, eos=True)
            length += len(tokens) + 1
        return total, length

    def perplexity(self, text: str) -> float:
        total, length = self.log10_prob_and_length(text)
        return 10.0 ** (-total / length) if length else float("inf")


def bucket(perplexity: float, cutoffs: list[float]) -> str:
    return BUCKETS[0] if perplexity < cutoffs[0] else BUCKETS[1] if perplexity < cutoffs[1] else BUCKETS[2]


def perplexity_cutoffs(scorer: PerplexityScorer, texts, percentiles=(100 / 3, 200 / 3)) -> list[float]:
    """The perplexities at `percentiles` of a sample of pages (CCNet: 33rd and 66th)."""
    import numpy as np

    values = [scorer.perplexity(t) for t in texts]
    if not values:
        raise InputError("no pages to measure perplexity cutoffs on")
    return [float(v) for v in np.percentile(values, percentiles)]


class PerplexityFilter(BaseFilter):
    """Keeps pages whose perplexity bucket is in `keep_buckets`; records both in the metadata."""

    name = "kenlm perplexity"

    def __init__(self, model_path: str, tokenizer_path: str | None, cutoffs: list[float], keep_buckets: list[str]):
        super().__init__()
        self.model_path, self.tokenizer_path = model_path, tokenizer_path
        self.cutoffs, self.keep_buckets = list(cutoffs), set(keep_buckets)
        self._scorer = None

    def filter(self, doc: Document):
        if self._scorer is None:  # loaded in the task's process, not pickled with the pipeline
            self._scorer = PerplexityScorer(self.model_path, self.tokenizer_path)
        ppl = self._scorer.perplexity(doc.text)
        doc.metadata["perplexity"], doc.metadata["perplexity_bucket"] = round(ppl, 1), bucket(ppl, self.cutoffs)
        return True if doc.metadata["perplexity_bucket"] in self.keep_buckets else (False, doc.metadata["perplexity_bucket"])
