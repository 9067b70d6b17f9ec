"""python -m data_prep pipeline: the whole data recipe in one command.

    python -m data_prep pipeline data_pipeline output=DIR sources.books.input=RAW/books ... [overrides]

Stages, in order, each skipped when it is complete for the same configuration and inputs (a hash
of both, kept in <output>/pipeline_state.json; a changed input or setting redoes that stage and
the ones after it):

    clean/<source>     raw folder -> <output>/clean/<source>/*.jsonl (clean.py; resumable itself)
    tokenizer          trained on all cleaned text (or the given model) -> <output>/tokenizer.model
    tokenize/<source>  -> <output>/<source>_text_document.bin/.idx (tokenize_parallel.py)
    report             mixture (weights and reference epochs from recipes/data/<mixture>.yaml),
                       documents, tokens, drops per rule, epochs for the budget ->
                       <output>/pipeline_report.{json,md,png} and <output>/data_recipe.yaml

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
    """Which stages are complete, and for which hash; written atomically after every stage."""

    def __init__(self, output: Path):
        self.path = output / STATE_FILE
        self.stages = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, stage: str, digest: str) -> dict | None:
        entry = self.stages.get(stage)
        return entry["result"] if entry and entry["hash"] == digest else None

    def record(self, stage: str, digest: str, result: dict) -> None:
        self.stages[stage] = {"hash": digest, "result": result, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stages, indent=1) + "\n")
        os.replace(tmp, self.path)


def run_stage(state: State, stage: str, digest: str, fn, log) -> dict:
    if (result := state.done(stage, digest)) is not None:
        log(f"[{stage}] complete (same configuration and inputs): skipped")
        return result
    log(f"[{stage}] running")
    start = time.perf_counter()
    result = fn()
    result["seconds"] = round(time.perf_counter() - start, 2)
    state.record(stage, digest, result)
    log(f"[{stage}] done in {result['seconds']:.1f} s")
    return result


def clean_source(cfg, name: str, out: Path) -> dict:
    from data_prep.clean import load_config, run

    src = cfg.sources[name]
    overrides = [f"source={name}", f"input={src.input}", f"output={out}", f"tasks={src.tasks}",
                 f"workers={min(cfg.workers, src.tasks)}", f"executor={cfg.executor}", *src.clean_overrides]
    if cfg.language_id_model and name in ("c4", "commoncrawl"):
        overrides.append(f"language_id_model={cfg.language_id_model}")
    if cfg.executor == "slurm":
        overrides += ["slurm_wait=true"] + ([f"slurm_partition={cfg.slurm_partition}"] if cfg.slurm_partition else [])
    report = run(load_config(overrides))
    drops = {}
    for step in report["steps"]:
        for key, value in step.items():
            if key.startswith("dropped_"):
                step_name = step["step"].split(": ", 1)[-1]  # datatrove prefixes the step type ("🔻 - FILTER: ")
                drops[f"{step_name}: {key[len('dropped_'):]}"] = value
    return {"documents": report["documents_out"], "shards": report["shards"], "drops": drops,
            "filters_not_applied": report.get("filters_not_applied", [])}


def train_or_copy_tokenizer(cfg, cleaned: list[Path], out: Path) -> dict:
    dest = out / "tokenizer.model"
    if cfg.tokenizer.model:
        tmp = dest.with_suffix(".tmp")
        shutil.copyfile(cfg.tokenizer.model, tmp)
        os.replace(tmp, dest)
        return {"model": str(dest), "trained": False}
    from data_prep.tokenizer import train_tokenizer

    t = cfg.tokenizer
    model = train_tokenizer(cleaned, out / "tokenizer", t.vocab_size, t.character_coverage, t.max_sentences)
    return {"model": str(model), "trained": True, "vocab_size": t.vocab_size}


def tokenize_source(cfg, files: list[Path], tokenizer: Path, prefix: Path, log) -> dict:
    from data_prep.tokenize_parallel import tokenize_parallel

    return tokenize_parallel(files, tokenizer, prefix, cfg.workers, log=log)


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
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    state = State(out)
    mixture = mixture_recipe(cfg.mixture).sources
    ran = [n for n, s in cfg.sources.items() if s.input]
    for n in cfg.sources:
        if n not in ran:
            log(f"[clean/{n}] no input (sources.{n}.input): left out")
    cleaned = {}
    for n in ran:
        src = cfg.sources[n]
        digest = _hash({"source": n, "input": _fingerprint(p for p in Path(src.input).rglob("*") if p.is_file()),
                        "tasks": src.tasks, "overrides": list(src.clean_overrides),
                        "lid": cfg.language_id_model if n in ("c4", "commoncrawl") else None})
        cleaned[n] = run_stage(state, f"clean/{n}", digest, lambda n=n: clean_source(cfg, n, out / "clean" / n), log)
    files = {n: [Path(p) for p in cleaned[n]["shards"]] for n in ran}
    empty = [n for n in ran if cleaned[n]["documents"] == 0]
    if empty:
        raise InputError(f"sources.{empty[0]}.input: cleaning left no document (see {out / 'clean' / empty[0]})")
    all_files = [p for n in ran for p in files[n]]
    tok_digest = _hash({"inputs": _fingerprint(all_files) if not cfg.tokenizer.model else None,
                        "settings": OmegaConf.to_container(cfg.tokenizer)})
    tok = run_stage(state, "tokenizer", tok_digest, lambda: train_or_copy_tokenizer(cfg, all_files, out), log)
    tokenizer = Path(tok["model"])
    tokenized = {}
    for n in ran:
        digest = _hash({"inputs": _fingerprint(files[n]), "tokenizer": hashlib.sha256(tokenizer.read_bytes()).hexdigest()})
        prefix = out / f"{n}_text_document"
        tokenized[n] = run_stage(state, f"tokenize/{n}", digest,
                                 lambda n=n, prefix=prefix: tokenize_source(cfg, files[n], tokenizer, prefix, log), log)
    log("[report] writing")
    report = write_report(cfg, out, ran, cleaned, tokenized, mixture)
    log(f"[report] {out / 'pipeline_report.md'}, {out / 'data_recipe.yaml'}; train with LLAMA_DATA={out}")
    return report
