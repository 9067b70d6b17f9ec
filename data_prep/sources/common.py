"""Steps several sources share: JSONL input, fastText language id, reading back an earlier stage's shards."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from data_prep.sources import InputError


class JsonlDocumentsReader(PipelineStep):
    """{"text": ..., optional "id", "url"} per line of *.jsonl / *.jsonl.gz files under a folder;
    task `rank` of `world_size` reads every world_size-th file."""

    name = "jsonl reader"
    type = "📖 - READER"

    def __init__(self, input_dir: str, source: str):
        super().__init__()
        self.input_dir, self.source = Path(input_dir), source

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        files = sorted(p for p in self.input_dir.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise InputError(f"{self.input_dir}: no .jsonl or .jsonl.gz files")
        for path in files[rank::world_size]:
            opener = gzip.open if path.suffix == ".gz" else open
            try:
                with opener(path, "rt", encoding="utf-8") as f:
                    for line_no, line in enumerate(f, 1):
                        try:
                            record = json.loads(line)
                            text = record["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise InputError(f"{path}:{line_no}: not a JSON object with a 'text' field") from None
                        self.stat_update("documents")
                        yield Document(text=text, id=str(record.get("id", f"{path.name}/{line_no}")),
                                       metadata={"source": self.source, **({"url": record["url"]} if "url" in record else {})})
            except (OSError, EOFError, UnicodeDecodeError) as e:
                raise InputError(f"{path}: unreadable ({e})") from None


class LanguageFilter(BaseFilter):
    """Keeps documents whose fastText language id (lid.176) is one of `languages` with a score of
    at least `min_score` (CCNet keeps English at 0.5)."""

    name = "language id"

    def __init__(self, model_path: str, languages: list[str], min_score: float):
        super().__init__()
        self.model_path, self.languages, self.min_score = model_path, set(languages), min_score
        self._model = None

    def filter(self, doc: Document):
        if self._model is None:
            import fasttext

            if not Path(self.model_path).is_file():
                raise InputError(f"{self.model_path}: fastText language-id model does not exist")
            self._model = fasttext.load_model(self.model_path)
        labels, scores = self._model.predict(doc.text.replace("\n", " "), k=1)
        language, score = labels[0].removeprefix("__label__"), float(scores[0])
        doc.metadata["language"], doc.metadata["language_score"] = language, round(score, 4)
        if language not in self.languages:
            return False, "language"
        if score < self.min_score:
            return False, "language_score"
        return True


class TaskShardReader(PipelineStep):
    """Task `rank`'s shard <folder>/<rank:05d>.jsonl written by an earlier stage's writer (text, id
    and metadata fields), in the order it was written: later stages address documents by their
    index in it. A task that kept no documents left no shard and reads nothing."""

    name = "stage shard reader"
    type = "📖 - READER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = Path(folder)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        path = self.folder / f"{rank:05d}.jsonl"
        if not path.is_file():
            return
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    text, doc_id = record.pop("text"), record.pop("id")
                except (json.JSONDecodeError, KeyError, AttributeError):
                    raise InputError(f"{path}:{line_no}: not a document written by the earlier stage") from None
                self.stat_update("documents")
                yield Document(text=text, id=doc_id, metadata=record)
