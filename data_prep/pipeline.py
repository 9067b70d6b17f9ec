"""python -m data_prep pipeline: the whole data recipe in one command.

    python -m data_prep pipeline data_pipeline output=DIR sources.books.input=RAW/books ... [overrides]
        [executor=slurm slurm_partition=P]

Steps, in order, each skipped when it is complete for the same configuration and inputs (a hash
of both, kept in <output>/pipeline_state.json; a changed input or setting redoes that step and the
ones that read its output):

    clean/<source>     raw folder -> <output>/clean/<source>/*.jsonl (clean.py's datatrove stages)
    tokenizer          trained on all cleaned text (tokenize_tasks.TrainTokenizer), or the given model
    tokenize/<source>  prepare / tokenize (the source's tasks) / merge -> <output>/<source>_text_document
                       .bin/.idx (tokenize_tasks.py: byte-identical to tokenize_parallel for any task count)
    report             mixture (weights and reference epochs from recipes/data/<mixture>.yaml),
                       documents, tokens, drops per rule, epochs for the budget ->
                       <output>/pipeline_report.{json,md,png} and <output>/data_recipe.yaml

Every step is datatrove stages: run here with the local executor, or (executor=slurm) submitted at
once as one chain of Slurm jobs, each depending on the one before, then waited for and recorded
step by step. One progress display: a line per step here, datatrove's bars and logs per stage
(<output>/.logs, <output>/clean/<source>/.logs).

The prefixes follow recipes/data/llama_mixture.yaml's layout, so `LLAMA_DATA=<output>` points the
pretraining recipes at the result; data_recipe.yaml is the same data config with the sources
that were run and absolute paths. Sources without an input are left out (and named).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from data_prep.sources import InputError
from recipes import RecipeError, compose
from recipes.schema import DataPipelineConfig

STATE_FILE = "pipeline_state.json"


def load_pipeline_config(name: str, overrides: list[str]):
    cfg = compose(name, overrides, DataPipelineConfig)
    from data_prep.clean import SOURCES

    unknown = sorted(set(cfg.sources) - set(SOURCES))
    if unknown:
        raise RecipeError(f"sources.{unknown[0]}: not a source ({', '.join(SOURCES)})")
    if not any(s.input for s in cfg.sources.values()):
        raise RecipeError("sources: no source has an input (set sources.<source>.input=DIR)")
    if cfg.executor not in ("local", "slurm"):
        raise RecipeError(f"executor: {cfg.executor!r} is not one of local, slurm")
    if cfg.workers < 1:
        raise RecipeError(f"workers: must be >= 1, got {cfg.workers}")
    mixture = mixture_recipe(cfg.mixture).sources
    for name, src in cfg.sources.items():
        if src.input and name not in mixture:
            raise RecipeError(f"sources.{name}: not in the mixture recipes/data/{cfg.mixture}.yaml")
    return cfg


def mixture_recipe(name: str):
    if not (Path(__file__).resolve().parents[1] / "recipes" / "data" / f"{name}.yaml").is_file():
        raise RecipeError(f"mixture: recipes/data/{name}.yaml does not exist")
    return compose(f"data/{name}").data  # a config in the data/ group composes under "data"


def _fingerprint(paths) -> list:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(paths)]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class State:
    """Which steps are complete, and for which digest; written atomically at every change."""

    def __init__(self, output: Path):
        self.path = output / STATE_FILE
        self.stages = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, stage: str, digest: str) -> dict | None:
        entry = self.stages.get(stage)
        return entry["result"] if entry and entry["hash"] == digest and "result" in entry else None

    def attempted(self, stage: str) -> str | None:
        """The digest of the step's last start (finished or not)."""
        return (self.stages.get(stage) or {}).get("hash")

    def start(self, stage: str, digest: str | None) -> None:
        self.stages[stage] = {"hash": digest, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._write()

    def record(self, stage: str, digest: str, result: dict, seconds: float) -> dict:
        result = {**result, "seconds": round(seconds, 2)}
        self.stages[stage] = {"hash": digest, "result": result, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._write()
        return result

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stages, indent=1) + "\n")
        os.replace(tmp, self.path)


@dataclass
class Step:
    """One stage of the pipeline: datatrove stages (run locally, or submitted as Slurm jobs that
    depend on the step before), a digest of what it reads (None while its inputs do not exist yet),
    what to do before it runs, and its result once done."""

    name: str
    digest: object  # () -> str | None
    build: object  # (fresh: bool) -> (stages, logging folders): fresh when its earlier attempt had other inputs
    result: object  # () -> dict


def clean_step(cfg, name: str, out: Path) -> Step:
    from data_prep.clean import finish, load_config, plan

    src = cfg.sources[name]
    overrides = [f"source={name}", f"input={src.input}", f"output={out / 'clean' / name}", f"tasks={src.tasks}",
                 f"workers={min(cfg.workers, src.tasks)}", *src.clean_overrides]
    if cfg.language_id_model and name in ("c4", "commoncrawl"):
        overrides.append(f"language_id_model={cfg.language_id_model}")
    planned = {}

    def digest():
        return _hash({"source": name, "input": _fingerprint(p for p in Path(src.input).rglob("*") if p.is_file()),
                      "tasks": src.tasks, "overrides": list(src.clean_overrides),
                      "lid": cfg.language_id_model if name in ("c4", "commoncrawl") else None})

    def build(fresh: bool):
        # other inputs than the attempt before: clean's own resume would keep its finished tasks
        clean_cfg = load_config(overrides + (["overwrite=true"] if fresh else []))
        planned["cfg"], (stages, logs, planned["not_applied"]) = clean_cfg, plan(clean_cfg)
        planned["stages"], planned["logs"] = stages, logs
        return stages, logs

    def result():
        report = finish(planned["cfg"], planned["stages"], planned["logs"], planned["not_applied"])
        drops = {}
        for step in report["steps"]:
            for key, value in step.items():
                if key.startswith("dropped_"):
                    step_name = step["step"].split(": ", 1)[-1]  # datatrove prefixes the step type ("🔻 - FILTER: ")
                    drops[f"{step_name}: {key[len('dropped_'):]}"] = value
        if report["documents_out"] == 0:
            raise InputError(f"sources.{name}.input: cleaning left no document (see {out / 'clean' / name})")
        return {"documents": report["documents_out"], "shards": report["shards"], "drops": drops,
                "filters_not_applied": report.get("filters_not_applied", [])}

    return Step(f"clean/{name}", digest, build, result)


def _fresh_logs(folder: Path) -> Path:
    """A stage's datatrove logs start empty: its completion markers must not skip a rerun's tasks
    (the steps themselves keep finished work: complete shards, a trained model)."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def tokenizer_step(cfg, out: Path, ran: list[str]) -> Step:
    from data_prep.clean import Stage
    from data_prep.tokenize_tasks import TrainTokenizer, jsonl_files

    folders = [out / "clean" / n for n in ran]
    t = cfg.tokenizer

    def digest():
        if t.model:
            return _hash({"given": _fingerprint([Path(t.model)])})
        if not all(f.is_dir() for f in folders):
            return None
        return _hash({"inputs": _fingerprint(p for f in folders for p in jsonl_files(f)),
                      "settings": OmegaConf.to_container(t)})

    def build(fresh: bool):
        if t.model:  # a given model is copied in the driver; nothing to submit
            tmp = out / "tokenizer.model.tmp"
            shutil.copyfile(t.model, tmp)
            os.replace(tmp, out / "tokenizer.model")
            return [], []
        step = TrainTokenizer([str(f) for f in folders], str(out / "tokenizer"), t.vocab_size, t.character_coverage,
                              t.max_sentences)
        return [Stage("train", [step], 1)], [_fresh_logs(out / ".logs" / "tokenizer")]

    def result():
        return {"model": str(out / "tokenizer.model"), "trained": not t.model}

    return Step("tokenizer", digest, build, result)


def tokenize_step(cfg, out: Path, name: str) -> Step:
    from data_prep.tokenize_tasks import jsonl_files, tokenize_stages

    folder, prefix, tokenizer = out / "clean" / name, out / f"{name}_text_document", out / "tokenizer.model"

    def digest():
        if not (folder.is_dir() and tokenizer.is_file()):
            return None
        return _hash({"inputs": _fingerprint(jsonl_files(folder)),
                      "tokenizer": hashlib.sha256(tokenizer.read_bytes()).hexdigest()})

    def build(fresh: bool):
        stages = tokenize_stages(folder, tokenizer, prefix, cfg.sources[name].tasks)
        return stages, [_fresh_logs(out / ".logs" / "tokenize" / name / st.name) for st in stages]

    def result():
        return json.loads(Path(str(prefix) + ".tokenize.json").read_text())

    return Step(f"tokenize/{name}", digest, build, result)


def write_report(cfg, out: Path, ran: list[str], cleaned: dict, tokenized: dict, mixture) -> dict:
    from data_prep.mixture import mixture_report

    sources = {n: {"prefix": tokenized[n]["prefix"], "weight": float(mixture[n].weight),
                   "epochs": mixture[n].get("epochs")} for n in ran}
    rows = {r.name: r for r in mixture_report(sources, cfg.tokens)}
    left_out = [n for n in cfg.sources if n not in ran]
    report = {"output": str(out), "token_budget": cfg.tokens, "mixture": cfg.mixture, "left_out": left_out,
              "sources": {n: {"share": rows[n].share, "documents": rows[n].documents, "tokens": rows[n].tokens,
                              "epochs_for_budget": rows[n].epochs, "reference_epochs": rows[n].reference_epochs,
                              "clean_documents": cleaned[n]["documents"], "drops": cleaned[n]["drops"],
                              "filters_not_applied": cleaned[n]["filters_not_applied"]} for n in ran}}
    lines = [f"# Data pipeline: {out}", "",
             f"Token budget {cfg.tokens:,.0f}; shares from recipes/data/{cfg.mixture}.yaml (renormalized over the "
             f"sources run){'; left out: ' + ', '.join(left_out) if left_out else ''}.", "",
             "| source | share | documents | tokens | epochs for the budget | reference epochs |",
             "|---|---|---|---|---|---|"]
    for n, r in report["sources"].items():
        ref = f"{r['reference_epochs']:.2f}" if r["reference_epochs"] is not None else ""
        lines.append(f"| {n} | {r['share']:.4f} | {r['documents']:,} | {r['tokens']:,} | "
                     f"{r['epochs_for_budget']:.3g} | {ref} |")
    lines += ["", "| source | rule | documents dropped |", "|---|---|---|"]
    lines += [f"| {n} | {rule} | {count:,} |" for n, r in report["sources"].items() for rule, count in r["drops"].items()]
    from llama_plugin.run_files import write_text_atomic

    write_text_atomic(out / "pipeline_report.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "pipeline_report.md", "\n".join(lines) + "\n")
    _bar_chart(report, out / "pipeline_report.png")
    recipe_sources = {}
    for n in ran:
        recipe_sources[n] = {"prefix": str(Path(tokenized[n]["prefix"]).resolve()), "weight": float(mixture[n].weight)}
        if mixture[n].get("epochs") is not None:
            recipe_sources[n]["epochs"] = float(mixture[n].epochs)
    data_recipe = {"name": f"pipeline_{out.name}", "tokenizer_model": str((out / "tokenizer.model").resolve()),
                   "sources": recipe_sources, "split": str(mixture_recipe(cfg.mixture).get("split", "98,2,0"))}
    write_text_atomic(out / "data_recipe.yaml", OmegaConf.to_yaml(OmegaConf.create(data_recipe)))
    return report


def _bar_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["sources"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("documents", "tokens")):
        ax.bar(names, [report["sources"][n][key] for n in names])
        ax.set_title(key)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def run_pipeline(cfg, log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Every step not complete for its digest, in order: locally, or (executor=slurm) submitted as
    one chain of dependent Slurm jobs and then waited for; each step is recorded as it finishes."""
    from data_prep.clean import run_local, slurm_executors, wait_for_tasks

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    state = State(out)
    mixture = mixture_recipe(cfg.mixture).sources
    ran = [n for n, s in cfg.sources.items() if s.input]
    for n in cfg.sources:
        if n not in ran:
            log(f"[clean/{n}] no input (sources.{n}.input): left out")
    steps = ([clean_step(cfg, n, out) for n in ran] + [tokenizer_step(cfg, out, ran)]
             + [tokenize_step(cfg, out, n) for n in ran])
    results, pending, upstream_redone, last = {}, [], False, None
    for step in steps:
        # on Slurm a step after one that is submitted reads files that do not exist yet: it runs
        # (the clean steps read only raw input, and a given tokenizer is copied right away)
        unknown = upstream_redone and not step.name.startswith("clean/") and not (
            step.name == "tokenizer" and cfg.tokenizer.model)
        digest = None if unknown else step.digest()
        if digest is not None and (done := state.done(step.name, digest)) is not None:
            log(f"[{step.name}] complete (same configuration and inputs): skipped")
            results[step.name] = done
            continue
        fresh = state.attempted(step.name) not in (None, digest)
        state.start(step.name, digest)
        stages, logs = step.build(fresh)
        if cfg.executor == "local":
            log(f"[{step.name}] running")
            start = time.perf_counter()
            run_local(stages, logs, cfg.workers)
            results[step.name] = state.record(step.name, step.digest(), step.result(), time.perf_counter() - start)
            log(f"[{step.name}] done in {results[step.name]['seconds']:.1f} s")
        else:
            job_prefix = "pipeline_" + step.name.replace("/", "_")
            executors = slurm_executors(stages, logs, SlurmSettings(cfg.slurm_partition), job_prefix,
                                        depends=last) if stages else []
            last = executors[-1] if executors else last
            upstream_redone = upstream_redone or bool(executors)
            pending.append((step, stages, logs, executors))
    if pending:
        if last is not None:
            last.run()  # submits the whole chain, each job depending on the one before
            log(f"submitted {sum(len(p[3]) for p in pending)} dependent Slurm jobs: "
                + ", ".join(f"{p[0].name}={','.join(str(e.job_id) for e in p[3])}" for p in pending if p[3]))
        for step, stages, logs, executors in pending:
            start = time.perf_counter()
            for stage, folder, executor in zip(stages, logs, executors):
                wait_for_tasks(folder, stage.tasks, executor.job_id)
            results[step.name] = state.record(step.name, step.digest(), step.result(), time.perf_counter() - start)
            log(f"[{step.name}] done (Slurm)")
    cleaned = {n: results[f"clean/{n}"] for n in ran}
    tokenized = {n: results[f"tokenize/{n}"] for n in ran}
    log("[report] writing")
    report = write_report(cfg, out, ran, cleaned, tokenized, mixture)
    log(f"[report] {out / 'pipeline_report.md'}, {out / 'data_recipe.yaml'}; train with LLAMA_DATA={out}")
    return report


@dataclass
class SlurmSettings:
    """The slurm_* fields slurm_executors reads (CleanConfig's defaults)."""

    slurm_partition: str | None
    slurm_time: str = "24:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: int = 2
    slurm_venv: str | None = None
