"""Clean one source: its raw files -> cleaned JSONL shards, as a datatrove pipeline.

    python -m data_prep clean source=<name> input=DIR output=DIR [tasks=N workers=N] [<source>.<threshold>=...]

The pipeline is the source's reader, its cleaning steps (data_prep/sources/<source>.py) and a
JSONL writer; datatrove's local executor runs it (its Slurm executor with executor=slurm, one
array job per stage, each stage depending on the one before). Most sources are one stage; C4's
corpus-wide span dedup adds two (see STAGED_WORK). Each task writes <output>/<task>.jsonl, under
that name only once the task has finished; a killed run started again skips finished tasks and
redoes the others from their start, so no document is lost or written twice.
<output>/clean_report.json has the per-step statistics: documents and characters in, dropped by
which rule, out; and `filters_not_applied`, the source's optional filters this config leaves out
(also printed as warnings).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers.jsonl import JsonlWriter
from omegaconf import OmegaConf

from data_prep.sources import InputError
from recipes import RecipeError, compose
from recipes.schema import CleanConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("stackexchange", "github", "wikipedia", "books", "arxiv", "c4", "commoncrawl")
# Intermediate files of multi-stage sources (documents between stages, dedup signatures), under <output>.
STAGED_WORK = ".stages"


@dataclass
class Stage:
    """One datatrove pipeline run with its own task count; stages run in order. Stages that read
    documents get a progress bar after their reader."""

    name: str
    pipeline: list
    tasks: int

    def __post_init__(self):
        if len(self.pipeline) > 1:
            self.pipeline.insert(1, ProgressBar(self.name))


class ProgressBar(PipelineStep):
    """Documents done and their rate, per task, on stderr (every second on a terminal, every 30 s
    into a log file such as a Slurm job's)."""

    name = "progress"
    type = "📊 - PROGRESS"

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def run(self, data, rank: int = 0, world_size: int = 1):
        from tqdm import tqdm

        interval = 1 if sys.stderr.isatty() else 30
        with tqdm(desc=f"{self.stage} task {rank + 1}/{world_size}", unit=" docs", mininterval=interval,
                  file=sys.stderr) as bar:
            for doc in data:
                bar.update()
                yield doc


class AtomicJsonlWriter(JsonlWriter):
    """A task's shard is written as <task>.jsonl.partial and renamed when the task ends without
    an error, so a shard under its final name is always complete."""

    name = "jsonl (atomic)"

    def __init__(self, output_folder: str):
        super().__init__(output_folder, output_filename="${rank}.jsonl.partial", compression=None,
                         adapter=lambda self, doc: {"text": doc.text, "id": doc.id, **doc.metadata})
        self._written: set[str] = set()

    def _write(self, document, file_handler, filename):
        self._written.add(filename)
        return super()._write(document, file_handler, filename)

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.close()
        if exc_type is None:
            for name in self._written:
                path = Path(self.output_folder.path) / name
                os.replace(path, path.with_name(path.name.removesuffix(".partial")))


def build_stages(cfg) -> list[Stage]:
    """The source's stages; the first starts with its reader, the last ends with the writer."""
    s = cfg.source
    if s == "c4":
        return c4_stages(cfg)
    if s == "books":
        return books_stages(cfg)
    if s == "github":
        return github_stages(cfg)
    if s == "stackexchange":
        return stackexchange_stages(cfg)
    if s == "wikipedia":
        from data_prep.sources.wikipedia import WikipediaReader

        steps = [WikipediaReader(cfg.input, list(cfg.wikipedia.languages))]
    elif s == "arxiv":
        from data_prep.sources.arxiv import ArxivReader, CleanLatex

        steps = [ArxivReader(cfg.input), CleanLatex()]
    elif s == "commoncrawl":
        return commoncrawl_stages(cfg)
    else:
        raise RecipeError(f"source: {s!r} is not one of {', '.join(SOURCES)}")
    return [Stage("clean", [*steps, AtomicJsonlWriter(cfg.output)], cfg.tasks)]


def stackexchange_stages(cfg) -> list[Stage]:
    """StackExchange in bounded memory (data_prep/sources/stackexchange.py): split (byte ranges of
    the sites' Posts.xml -> posts bucketed by question under <work>/posts), assemble (a bucket at a
    time -> one document per question)."""
    from data_prep.sources.stackexchange import StackExchangeAssemble, StackExchangeSplit

    x, work = cfg.stackexchange, Path(cfg.output) / STAGED_WORK / "posts"
    return [
        Stage("split", [StackExchangeSplit(cfg.input, str(work), x.sites, x.piece_bytes, x.bucket_bytes)], cfg.tasks),
        Stage("assemble", [StackExchangeAssemble(str(work)), AtomicJsonlWriter(cfg.output)], cfg.tasks),
    ]


def commoncrawl_stages(cfg) -> list[Stage]:
    """CommonCrawl, CCNet's order: line dedup over the whole run (all tasks), then language id, the
    KenLM filter and the reference classifier.

    1. pages: reader; the pages go to <work>/pages/<task>.jsonl, their line hashes and counts to
       <work>/line_hashes/<task>.npz;
    2. find_duplicates: one task sums the counts; hashes seen more than once -> <work>/duplicates.npy;
    3. filter: each task reads its pages back, removes those lines (every copy), drops short pages,
       then language id, perplexity buckets, the classifier.
    """
    from data_prep.sources.common import LanguageFilter, TaskShardReader
    from data_prep.sources.commoncrawl import (FindDuplicateLines, LineHashes, ReferenceClassifierFilter,
                                               RemoveDuplicateLines, WebPageReader)

    c, work = cfg.commoncrawl, Path(cfg.output) / STAGED_WORK
    if c.min_doc_chars < 0:
        raise RecipeError(f"commoncrawl.min_doc_chars: must be >= 0, got {c.min_doc_chars}")
    steps = [TaskShardReader(str(work / "pages")),
             RemoveDuplicateLines(str(work / "duplicates.npy"), c.min_doc_chars),
             LanguageFilter(cfg.language_id_model, list(c.languages), c.min_language_score)]
    if c.kenlm_model:
        from data_prep.sources.perplexity import PerplexityFilter

        steps.append(PerplexityFilter(c.kenlm_model, c.kenlm_tokenizer, list(c.perplexity_cutoffs),
                                      list(c.keep_buckets)))
    model = reference_classifier(cfg)
    if model is not None:
        steps.append(ReferenceClassifierFilter(str(model), c.min_reference_score))
    return [
        Stage("pages", [WebPageReader(cfg.input), AtomicJsonlWriter(str(work / "pages")),
                        LineHashes(str(work / "line_hashes"))], cfg.tasks),
        Stage("find_duplicates", [FindDuplicateLines(str(work / "line_hashes"), str(work / "duplicates.npy"))], 1),
        Stage("filter", [*steps, AtomicJsonlWriter(cfg.output)], cfg.tasks),
    ]


def github_stages(cfg) -> list[Stage]:
    """GitHub: license, header and quality filters, then exact file dedup over the whole corpus
    on datatrove's exact-dedup stages: filter (files and their hashes to <work>),
    find_duplicates (one task), dedup."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups

    from data_prep.sources.common import TaskShardReader
    from data_prep.sources.github import CodeQualityFilter, GithubReader, StripLicenseHeaders, exact_dedup_config

    g, work, dedup = cfg.github, Path(cfg.output) / STAGED_WORK, exact_dedup_config()
    return [
        Stage("filter", [GithubReader(cfg.input, list(g.licenses), list(g.extensions), g.max_file_bytes),
                         StripLicenseHeaders(),
                         CodeQualityFilter(g.max_line_length, g.max_mean_line_length, g.min_alphanumeric_share),
                         AtomicJsonlWriter(str(work / "files")),
                         ExactDedupSignature(str(work / "signatures"), config=dedup)], cfg.tasks),
        Stage("find_duplicates", [ExactFindDedups(str(work / "signatures"), str(work / "duplicates"),
                                                  config=dedup)], 1),
        Stage("dedup", [TaskShardReader(str(work / "files")), ExactDedupFilter(str(work / "duplicates"), config=dedup),
                        AtomicJsonlWriter(cfg.output)], cfg.tasks),
    ]


def books_stages(cfg) -> list[Stage]:
    """Books: headers stripped, then near-duplicate books dropped over the whole corpus
    (data_prep/sources/books.py): strip (books and MinHash signatures to <work>),
    find_duplicates (one task, LSH + exact overlap), drop_duplicates."""
    from data_prep.sources.books import (BookSignatures, BooksReader, DropNearDuplicateBooks,
                                         FindNearDuplicateBooks, StripGutenbergHeader)
    from data_prep.sources.common import TaskShardReader

    b, work = cfg.books, Path(cfg.output) / STAGED_WORK
    return [
        Stage("strip", [BooksReader(cfg.input), StripGutenbergHeader(), AtomicJsonlWriter(str(work / "books")),
                        BookSignatures(str(work / "signatures"), b.shingle_words, b.num_perm)], cfg.tasks),
        Stage("find_duplicates", [FindNearDuplicateBooks(str(work / "books"), str(work / "signatures"),
                                                         str(work / "duplicates"), b.max_overlap, b.shingle_words,
                                                         b.num_perm)], 1),
        Stage("drop_duplicates", [TaskShardReader(str(work / "books")), DropNearDuplicateBooks(str(work / "duplicates")),
                                  AtomicJsonlWriter(cfg.output)], cfg.tasks),
    ]


def c4_stages(cfg) -> list[Stage]:
    """C4: filters, then the three-sentence-span dedup over the whole output of the filters.

    1. filter: reader, language id, C4 heuristics; the kept pages go to <work>/pages/<task>.jsonl
       and the hashes of their 3-sentence spans to <work>/signatures;
    2. find_duplicates: one task merges all sorted hashes; every occurrence of a span after
       its first is listed (document and sentence index) in <work>/duplicates;
    3. span_dedup: each task reads back its pages and drops the listed spans' sentences.
    """
    from datatrove.pipeline.dedup.sentence_dedup import (SentenceDedupFilter, SentenceDedupSignature,
                                                         SentenceFindDedups)

    from data_prep.sources.c4 import C4QualityFilter, SentenceSplitter, span_dedup_config
    from data_prep.sources.common import JsonlDocumentsReader, LanguageFilter, TaskShardReader

    c, work = cfg.c4, Path(cfg.output) / STAGED_WORK
    dedup, splitter = span_dedup_config(c.min_sentences), SentenceSplitter()
    return [
        Stage("filter", [JsonlDocumentsReader(cfg.input, "c4"),
                         LanguageFilter(cfg.language_id_model, list(c.languages), c.min_language_score),
                         C4QualityFilter(c.min_words_per_line, c.min_sentences, c.bad_words_file, c.max_word_length),
                         AtomicJsonlWriter(str(work / "pages")),
                         SentenceDedupSignature(str(work / "signatures"), config=dedup, language=splitter)],
              cfg.tasks),
        Stage("find_duplicates", [SentenceFindDedups(str(work / "signatures"), str(work / "duplicates"),
                                                     config=dedup)], 1),
        Stage("span_dedup", [TaskShardReader(str(work / "pages")),
                             SentenceDedupFilter(str(work / "duplicates"), config=dedup, language=splitter),
                             AtomicJsonlWriter(cfg.output)],
              cfg.tasks),
    ]


def reference_classifier(cfg) -> Path | None:
    """The commoncrawl reference classifier: given, trained from the given samples (once, into
    <output>/reference_classifier.bin), or None when neither is configured."""
    c = cfg.commoncrawl
    if c.reference_classifier:
        return Path(c.reference_classifier)
    if not (c.reference_positives and c.reference_negatives):
        return None
    out = Path(cfg.output) / "reference_classifier.bin"
    # Trained once per set of samples: the samples' hash sits beside the model; other samples retrain.
    stamp = out.with_suffix(".samples.sha1")
    digest = hashlib.sha1()
    for sample in (c.reference_positives, c.reference_negatives):
        digest.update(Path(sample).read_bytes() + b"\0")
    if not out.is_file() or not stamp.is_file() or stamp.read_text().strip() != digest.hexdigest():
        from data_prep.sources.commoncrawl import train_reference_classifier

        def texts(path):
            with open(path, encoding="utf-8") as f:
                return [json.loads(line)["text"] for line in f if line.strip()]

        train_reference_classifier(texts(c.reference_positives), texts(c.reference_negatives), out)
        stamp.write_text(digest.hexdigest() + "\n")
    return out


def check_input(folder: Path) -> None:
    """An input that holds nothing is an error, not an empty run that exits 0."""
    if not folder.exists():
        raise RecipeError(f"input: {folder} does not exist")
    if not folder.is_dir():
        raise RecipeError(f"input: {folder} is not a directory")
    if not any(p.is_file() and p.stat().st_size > 0 for p in folder.rglob("*")):
        raise RecipeError(f"input: {folder} holds no non-empty file")


def load_config(overrides: list[str]):
    cfg = compose("clean", overrides, CleanConfig)
    if cfg.source not in SOURCES:
        raise RecipeError(f"source: {cfg.source!r} is not one of {', '.join(SOURCES)}")
    for key in ("tasks", "workers"):
        if cfg[key] < 1:
            raise RecipeError(f"{key}: must be >= 1, got {cfg[key]}")
    if cfg.executor not in ("local", "slurm"):
        raise RecipeError(f"executor: {cfg.executor!r} is not one of local, slurm")
    check_input(Path(cfg.input))
    if cfg.source == "stackexchange":
        for key in ("piece_bytes", "bucket_bytes"):
            if cfg.stackexchange[key] < 1:
                raise RecipeError(f"stackexchange.{key}: must be >= 1, got {cfg.stackexchange[key]}")
    if cfg.source == "wikipedia":
        from data_prep.sources.wikipedia import check_languages

        try:
            check_languages(cfg.wikipedia.languages)
        except InputError as e:
            raise RecipeError(str(e)) from None
    if cfg.source in ("c4", "commoncrawl"):
        if not cfg.language_id_model:
            raise RecipeError(f"language_id_model: source={cfg.source} needs a fastText language-id model "
                              "(lid.176.bin, or data_prep.samples.language_id_model())")
        if not Path(cfg.language_id_model).is_file():
            raise RecipeError(f"language_id_model: {cfg.language_id_model} does not exist")
    if cfg.source == "commoncrawl":
        check_perplexity_filter(cfg.commoncrawl)
        for key in ("reference_classifier", "reference_positives", "reference_negatives"):
            value = cfg.commoncrawl[key]
            if value and not Path(value).is_file():
                raise RecipeError(f"commoncrawl.{key}: {value} does not exist")
    if not Path(cfg.input).exists():
        raise RecipeError(f"input: {cfg.input} does not exist")
    return cfg


def check_perplexity_filter(c) -> None:
    """The KenLM filter's fields, named in the error, before any work."""
    from data_prep.sources.perplexity import BUCKETS

    if not c.kenlm_model:
        for key in ("kenlm_tokenizer", "perplexity_cutoffs"):
            if c[key]:
                raise RecipeError(f"commoncrawl.{key}: given without commoncrawl.kenlm_model (the LM filter's model)")
        return
    for key in ("kenlm_model", "kenlm_tokenizer"):
        if c[key] and not Path(c[key]).is_file():
            raise RecipeError(f"commoncrawl.{key}: {c[key]} does not exist")
    cutoffs = list(c.perplexity_cutoffs)
    if len(cutoffs) != 2 or not 0 < cutoffs[0] < cutoffs[1]:
        raise RecipeError(f"commoncrawl.perplexity_cutoffs: two increasing positive perplexities (head/middle, "
                          f"middle/tail) are needed with a KenLM model, got {cutoffs}")
    unknown = [b for b in c.keep_buckets if b not in BUCKETS]
    if unknown or not c.keep_buckets:
        raise RecipeError(f"commoncrawl.keep_buckets: {list(c.keep_buckets)} must be a non-empty subset of "
                          f"{', '.join(BUCKETS)}")


RUN_RECORD = "clean_config.json"


def _flat(prefix: str, value) -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(f"{prefix}.{key}" if prefix else key, sub).items()}
    return {prefix: value}


def output_defining(cfg) -> dict:
    """The fields that decide a run's output (dotted names): the source, its input, the task
    count (documents are sharded by task) and the source's own rules."""
    c = OmegaConf.to_container(cfg, resolve=True)
    keep = {"source": c["source"], "input": str(Path(c["input"]).resolve()), "tasks": c["tasks"],
            cfg.source: c.get(cfg.source, {})}
    if cfg.source in ("c4", "commoncrawl"):
        keep["language_id_model"] = c["language_id_model"]
    return _flat("", keep)


def check_rerun(cfg) -> None:
    """A rerun into an existing output must be the same run (it skips the tasks that finished):
    another config or task count is refused, naming the first field that differs. overwrite=true
    deletes the output (and the logs with their completion markers) and starts again.
    The defining fields go to <output>/clean_config.json."""
    output = Path(cfg.output)
    logging_dir = Path(cfg.logging_dir) if cfg.logging_dir else None
    record, current = output / RUN_RECORD, output_defining(cfg)
    if cfg.overwrite:
        for folder in (output, logging_dir):
            if folder is not None and folder.is_dir():
                shutil.rmtree(folder)
    elif record.is_file():
        previous = json.loads(record.read_text())
        changed = [k for k in sorted(set(previous) | set(current)) if previous.get(k) != current.get(k)]
        if not changed:
            return
        k = changed[0]
        raise RecipeError(f"{k}: {output} was cleaned with {k}={previous.get(k)!r}, this run has "
                          f"{current.get(k)!r}; use another output, or overwrite=true to clean it again")
    elif output.is_dir() and any(output.iterdir()):
        raise RecipeError(f"output: {output} is not empty and has no {RUN_RECORD} (not made by `clean`); "
                          "use another output, or overwrite=true")
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f"{RUN_RECORD}.tmp"
    tmp.write_text(json.dumps(current, indent=2) + "\n")
    os.replace(tmp, record)


def unapplied_filters(cfg) -> list[str]:
    """The source's optional filters this config leaves out: named in the report and on stderr."""
    out = []
    if cfg.source == "c4" and not cfg.c4.bad_words_file:
        out.append("c4 bad-words filter: c4.bad_words_file is not set (C4 used the LDNOOBW English list)")
    if cfg.source == "commoncrawl":
        c = cfg.commoncrawl
        if not c.kenlm_model:
            out.append("commoncrawl perplexity filter (CCNet's KenLM): commoncrawl.kenlm_model is not set")
        if not (c.reference_classifier or (c.reference_positives and c.reference_negatives)):
            out.append("commoncrawl 'referenced by Wikipedia' classifier: commoncrawl.reference_classifier "
                       "(or reference_positives and reference_negatives) is not set")
    return out


def plan(cfg) -> tuple[list[Stage], list[Path], list[str]]:
    """(stages, their logging folders, the filters not applied) of a clean run, after the rerun check."""
    check_rerun(cfg)
    not_applied = unapplied_filters(cfg)
    for what in not_applied:
        print(f"warning: not applied: {what}", file=sys.stderr)
    logging_dir = Path(cfg.logging_dir or Path(cfg.output) / ".logs")
    stages = build_stages(cfg)
    # A one-stage source logs straight into logging_dir; stages get a sub-folder each.
    stage_logs = [logging_dir] if len(stages) == 1 else [logging_dir / st.name for st in stages]
    return stages, stage_logs, not_applied


def slurm_executors(stages: list[Stage], stage_logs: list[Path], slurm, job_prefix: str, depends=None) -> list:
    """One datatrove Slurm executor per stage, each depending on the one before (the first on
    `depends`); `.run()` on the last submits them all. `slurm` has the slurm_* fields of CleanConfig."""
    from datatrove.executor.slurm import SlurmPipelineExecutor

    # The jobs unpickle our steps: they need this venv and the project on their path.
    venv = slurm.slurm_venv or (sys.prefix if sys.prefix != sys.base_prefix else None)
    env = [f"source {shlex.quote(str(Path(venv) / 'bin' / 'activate'))}"] if venv else []
    env.append(f"export PYTHONPATH={shlex.quote(str(PROJECT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}")
    executors = []
    for stage, logs in zip(stages, stage_logs):
        executors.append(SlurmPipelineExecutor(
            pipeline=stage.pipeline, tasks=stage.tasks, time=slurm.slurm_time, partition=slurm.slurm_partition,
            cpus_per_task=slurm.slurm_cpus_per_task, mem_per_cpu_gb=slurm.slurm_mem_per_cpu_gb,
            env_command="\n".join(env), logging_dir=str(logs), job_name=f"{job_prefix}_{stage.name}",
            sbatch_args={"chdir": str(Path.cwd())}, mail_type="NONE",
            depends=executors[-1] if executors else depends))
    return executors


def run_local(stages: list[Stage], stage_logs: list[Path], workers: int) -> None:
    from datatrove.executor.local import LocalPipelineExecutor

    for stage, logs in zip(stages, stage_logs):
        LocalPipelineExecutor(pipeline=stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
                              logging_dir=str(logs), start_method="fork").run()


def finish(cfg, stages: list[Stage], stage_logs: list[Path], not_applied: list[str]) -> dict:
    """The report of a finished clean run, also written to <output>/clean_report.json."""
    report = report_from_logs(list(zip(stages, stage_logs)), cfg)
    report["filters_not_applied"] = not_applied
    tmp = Path(cfg.output) / "clean_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, Path(cfg.output) / "clean_report.json")
    return report


def run(cfg) -> dict:
    """Run (or finish) the pipeline; returns the report (also written to clean_report.json)."""
    stages, stage_logs, not_applied = plan(cfg)
    if cfg.executor == "slurm":
        executors = slurm_executors(stages, stage_logs, cfg, f"clean_{cfg.source}")
        executors[-1].run()  # submits the earlier stages first, each one depending on the one before
        if not cfg.slurm_wait:
            return {"submitted": [e.job_id for e in executors],
                    "logging_dir": str(cfg.logging_dir or Path(cfg.output) / ".logs")}
        for stage, logs, executor in zip(stages, stage_logs, executors):
            wait_for_tasks(logs, stage.tasks, executor.job_id)
    else:
        run_local(stages, stage_logs, cfg.workers)
    return finish(cfg, stages, stage_logs, not_applied)


def _parses_as_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return True


def wait_for_tasks(logging_dir: Path, tasks: int, job_id: str, timeout_s: float = 24 * 3600) -> None:
    """Until every task has its completion marker; fails when the Slurm job ended without them."""
    deadline = time.time() + timeout_s
    while True:
        done = len(list((logging_dir / "completions").glob("*"))) if (logging_dir / "completions").is_dir() else 0
        if done >= tasks:
            # datatrove merges the tasks' stats into stats.json in a job of its own, after the tasks;
            # the file appears before it is written (seen empty once), so wait until it parses.
            while not _parses_as_json(logging_dir / "stats.json"):
                if time.time() > deadline:
                    raise TimeoutError(f"no {logging_dir / 'stats.json'} after {timeout_s} s")
                time.sleep(0.5)
            return
        state = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True).stdout
        if state and not re.search(r"JobState=(PENDING|RUNNING|CONFIGURING|COMPLETING|REQUEUED)", state) and done < tasks:
            ended = re.findall(r"JobState=(\w+)", state)
            if ended and all(s in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") for s in ended):
                raise RuntimeError(f"Slurm job {job_id} ended ({', '.join(sorted(set(ended)))}) with {done}/{tasks} "
                                   f"tasks done; logs in {logging_dir}")
        if time.time() > deadline:
            raise TimeoutError(f"{done}/{tasks} tasks done after {timeout_s} s; logs in {logging_dir}")
        time.sleep(1)


def all_tasks_stats(logging_dir: Path) -> list[dict]:
    """The per-step stats of every task of a stage, summed from the task files datatrove writes as
    each task completes (stats/<rank>.json): its stats.json covers only the tasks the last
    invocation ran, so a resumed run's report would leave out the tasks finished before the kill."""
    from datatrove.utils.stats import PipelineStats

    files = sorted((logging_dir / "stats").glob("*.json"))
    if not files:
        return json.loads((logging_dir / "stats.json").read_text())
    total = sum((PipelineStats.from_json(json.loads(f.read_text())) for f in files), start=PipelineStats())
    return json.loads(total.to_json())


def report_from_logs(stage_logs: list[tuple[Stage, Path]], cfg) -> dict:
    """Per step: its counters (documents in/forwarded/dropped, dropped_<rule>, ...) summed over tasks."""
    steps = []
    for stage, logging_dir in stage_logs:
        for step in all_tasks_stats(logging_dir):
            if step["name"].endswith(ProgressBar.name):
                continue
            counters = {k: (v["total"] if isinstance(v, dict) and "total" in v else v)
                        for k, v in step["stats"].items()
                        if k not in ("doc_len", "doc_len_tokens") and not k.startswith("XXXXX")}
            if "doc_len" in step["stats"]:
                counters["characters_out"] = step["stats"]["doc_len"]["total"]
            steps.append({"stage": stage.name, "step": step["name"], **counters})
    shards = sorted(Path(cfg.output).glob("*.jsonl"))
    documents = sum(1 for p in shards for _ in open(p, encoding="utf-8"))
    return {"source": cfg.source, "config": OmegaConf.to_container(cfg), "steps": steps,
            "documents_out": documents, "shards": [str(p) for p in shards]}
