"""Steps several sources share: JSONL input, fastText language id, reading back an earlier stage's shards."""

from __future__ import annotations

import json
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from data_prep.sources import InputError


# allenai/c4 names its shards c4-train.00000-of-01024.json.gz
JSONL_NAMES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")


def jsonl_lines(path: Path):
    """(line number, raw bytes) of a plain, .gz or .zst JSONL file; an unreadable file or archive
    raises InputError naming the file and the line where reading stopped."""
    from data_prep.tokenize_parallel import COMPRESSED, Shard, _compressed_lines

    line_no = 0
    try:
        if str(path).endswith(COMPRESSED):
            for line_no, line in _compressed_lines(Shard(0, str(path), 0, -1)):
                yield line_no, line
        else:
            with open(path, "rb") as f:
                for line_no, line in enumerate(f, 1):
                    yield line_no, line
    except InputError as e:
        raise InputError(f"{path}:{line_no + 1}: {str(e).removeprefix(f'{path}: ')}") from None
    except OSError as e:
        raise InputError(f"{path}:{line_no + 1}: unreadable ({e.strerror or e})") from None


class JsonlDocumentsReader(PipelineStep):
    """{"text": ..., optional "id", "url"} per line of JSONL files (plain, .gz, .zst; also *.json.gz
    as allenai/c4 ships them) under a folder; task `rank` of `world_size` reads every world_size-th
    file. A line that is not UTF-8 is one unreadable document: skipped and counted
    (`skipped_not_utf8`); a line that is not a JSON object with a string "text" stops the run,
    naming file and line."""

    name = "jsonl reader"
    type = "📖 - READER"

    def __init__(self, input_dir: str, source: str):
        super().__init__()
        self.input_dir, self.source = Path(input_dir), source

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        files = sorted(p for p in self.input_dir.rglob("*") if p.name.endswith(JSONL_NAMES))
        if not files:
            raise InputError(f"{self.input_dir}: no {', '.join(JSONL_NAMES)} files")
        for path in files[rank::world_size]:
            for line_no, raw in jsonl_lines(path):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.stat_update("skipped_not_utf8")
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError(f"{path}:{line_no}: not a JSON object with a 'text' field") from None
                if not isinstance(text, str):
                    raise InputError(f"{path}:{line_no}: 'text' is a {type(text).__name__}, not a string")
                self.stat_update("documents")
                yield Document(text=text, id=str(record.get("id", f"{path.name}/{line_no}")),
                               metadata={"source": self.source, **({"url": record["url"]} if "url" in record else {})})


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
