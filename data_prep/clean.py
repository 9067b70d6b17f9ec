"""Clean one source: its raw files -> cleaned JSONL shards, as a datatrove pipeline.

    python -m data_prep clean source=<name> input=DIR output=DIR [tasks=N workers=N] [<source>.<threshold>=...]

The pipeline is the source's reader, its cleaning steps (data_prep/sources/<source>.py) and a
JSONL writer; datatrove's local executor runs it (its Slurm executor with executor=slurm). Each
task writes <output>/<task>.jsonl, under that name only once the task has finished; a killed run
started again skips finished tasks and redoes the others from their start, so no document is
lost or written twice. <output>/clean_report.json has the per-step statistics: documents and
characters in, dropped by which rule, out.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from datatrove.pipeline.writers.jsonl import JsonlWriter
from omegaconf import OmegaConf

from data_prep.sources import InputError
from recipes import RecipeError, compose
from recipes.schema import CleanConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("stackexchange", "github", "wikipedia", "books", "arxiv", "c4", "commoncrawl")


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


def build_pipeline(cfg) -> list:
    """The source's steps, reader first, writer last."""
    s = cfg.source
    if s == "stackexchange":
        from data_prep.sources.stackexchange import StackExchangeReader

        steps = [StackExchangeReader(cfg.input, cfg.stackexchange.sites)]
    elif s == "github":
        from data_prep.sources.github import CodeQualityFilter, ExactDedup, GithubReader, StripLicenseHeaders

        g = cfg.github
        steps = [GithubReader(cfg.input, list(g.licenses), list(g.extensions), g.max_file_bytes),
                 StripLicenseHeaders(),
                 CodeQualityFilter(g.max_line_length, g.max_mean_line_length, g.min_alphanumeric_share),
                 ExactDedup()]
    elif s == "wikipedia":
        from data_prep.sources.wikipedia import WikipediaReader

        steps = [WikipediaReader(cfg.input, list(cfg.wikipedia.languages))]
    elif s == "books":
        from data_prep.sources.books import BooksReader, DropNearDuplicateBooks, StripGutenbergHeader

        b = cfg.books
        steps = [BooksReader(cfg.input), StripGutenbergHeader(),
                 DropNearDuplicateBooks(b.max_overlap, b.shingle_words, b.num_perm)]
    elif s == "arxiv":
        from data_prep.sources.arxiv import ArxivReader, CleanLatex

        steps = [ArxivReader(cfg.input), CleanLatex()]
    elif s == "c4":
        from data_prep.sources.c4 import C4QualityFilter
        from data_prep.sources.common import ExactDedup, JsonlDocumentsReader, LanguageFilter

        c = cfg.c4
        steps = [JsonlDocumentsReader(cfg.input, "c4"), ExactDedup(),
                 LanguageFilter(cfg.language_id_model, list(c.languages), c.min_language_score),
                 C4QualityFilter(c.min_words_per_line, c.min_sentences, c.bad_words_file)]
    elif s == "commoncrawl":
        from data_prep.sources.commoncrawl import LineDedup, ReferenceClassifierFilter, WebPageReader
        from data_prep.sources.common import LanguageFilter

        c = cfg.commoncrawl
        steps = [WebPageReader(cfg.input), LineDedup(),
                 LanguageFilter(cfg.language_id_model, list(c.languages), c.min_language_score)]
        model = reference_classifier(cfg)
        if model is not None:
            steps.append(ReferenceClassifierFilter(str(model), c.min_reference_score))
    else:
        raise RecipeError(f"source: {s!r} is not one of {', '.join(SOURCES)}")
    single = [type(step).__name__ for step in steps if getattr(step, "single_task", False)]
    if single and cfg.tasks != 1:
        raise RecipeError(f"tasks: {cfg.tasks}, but {', '.join(single)} must see the whole corpus (tasks=1)")
    return [*steps, AtomicJsonlWriter(cfg.output)]


def reference_classifier(cfg) -> Path | None:
    """The commoncrawl reference classifier: given, trained from the given samples (once, into
    <output>/reference_classifier.bin), or None when neither is configured."""
    c = cfg.commoncrawl
    if c.reference_classifier:
        return Path(c.reference_classifier)
    if not (c.reference_positives and c.reference_negatives):
        return None
    out = Path(cfg.output) / "reference_classifier.bin"
    if not out.is_file():
        from data_prep.sources.commoncrawl import train_reference_classifier

        def texts(path):
            with open(path, encoding="utf-8") as f:
                return [json.loads(line)["text"] for line in f if line.strip()]

        train_reference_classifier(texts(c.reference_positives), texts(c.reference_negatives), out)
    return out


def load_config(overrides: list[str]):
    cfg = compose("clean", overrides, CleanConfig)
    if cfg.source not in SOURCES:
        raise RecipeError(f"source: {cfg.source!r} is not one of {', '.join(SOURCES)}")
    for key in ("tasks", "workers"):
        if cfg[key] < 1:
            raise RecipeError(f"{key}: must be >= 1, got {cfg[key]}")
    if cfg.executor not in ("local", "slurm"):
        raise RecipeError(f"executor: {cfg.executor!r} is not one of local, slurm")
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
    if not Path(cfg.input).exists():
        raise RecipeError(f"input: {cfg.input} does not exist")
    return cfg


def run(cfg) -> dict:
    """Run (or finish) the pipeline; returns the report (also written to clean_report.json)."""
    output = Path(cfg.output)
    logging_dir = cfg.logging_dir or str(output / ".logs")
    pipeline = build_pipeline(cfg)
    if cfg.executor == "slurm":
        from datatrove.executor.slurm import SlurmPipelineExecutor

        # The jobs unpickle our steps: they need this venv and the project on their path.
        venv = cfg.slurm_venv or (sys.prefix if sys.prefix != sys.base_prefix else None)
        env = [f"source {shlex.quote(str(Path(venv) / 'bin' / 'activate'))}"] if venv else []
        env.append(f"export PYTHONPATH={shlex.quote(str(PROJECT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}")
        executor = SlurmPipelineExecutor(
            pipeline=pipeline, tasks=cfg.tasks, time=cfg.slurm_time, partition=cfg.slurm_partition,
            cpus_per_task=cfg.slurm_cpus_per_task, mem_per_cpu_gb=cfg.slurm_mem_per_cpu_gb,
            env_command="\n".join(env), logging_dir=logging_dir, job_name=f"clean_{cfg.source}",
            sbatch_args={"chdir": str(Path.cwd())}, mail_type="NONE")
        executor.run()
        if not cfg.slurm_wait:
            return {"submitted": executor.job_id, "logging_dir": logging_dir}
        wait_for_tasks(Path(logging_dir), cfg.tasks, executor.job_id)
    else:
        from datatrove.executor.local import LocalPipelineExecutor

        LocalPipelineExecutor(pipeline=pipeline, tasks=cfg.tasks, workers=cfg.workers, logging_dir=logging_dir,
                              start_method="fork").run()
    report = report_from_logs(Path(logging_dir), cfg)
    tmp = output / "clean_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, output / "clean_report.json")
    return report


def wait_for_tasks(logging_dir: Path, tasks: int, job_id: str, timeout_s: float = 24 * 3600) -> None:
    """Until every task has its completion marker; fails when the Slurm job ended without them."""
    deadline = time.time() + timeout_s
    while True:
        done = len(list((logging_dir / "completions").glob("*"))) if (logging_dir / "completions").is_dir() else 0
        if done >= tasks:
            # datatrove merges the tasks' stats into stats.json in a job of its own, after the tasks.
            while not (logging_dir / "stats.json").is_file():
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


def report_from_logs(logging_dir: Path, cfg) -> dict:
    """Per step: its counters (documents in/forwarded/dropped, dropped_<rule>, ...) summed over tasks."""
    stats = json.loads((logging_dir / "stats.json").read_text())
    steps = []
    for step in stats:
        counters = {k: (v["total"] if isinstance(v, dict) and "total" in v else v) for k, v in step["stats"].items()
                    if k not in ("doc_len", "doc_len_tokens") and not k.startswith("XXXXX")}
        for k in ("doc_len",):
            if k in step["stats"]:
                counters["characters_out"] = step["stats"][k]["total"]
        steps.append({"step": step["name"], **counters})
    shards = sorted(Path(cfg.output).glob("*.jsonl"))
    documents = sum(1 for p in shards for _ in open(p, encoding="utf-8"))
    return {"source": cfg.source, "config": OmegaConf.to_container(cfg), "steps": steps,
            "documents_out": documents, "shards": [str(p) for p in shards]}
