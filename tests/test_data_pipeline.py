"""`python -m data_prep pipeline`: raw folders of all seven sources -> cleaned JSONL -> tokenizer ->
one indexed dataset per source -> report and data recipe; stages skipped when complete; then
tiny_cpu trains 20 steps on the result with the recipe's source shares.

The raw inputs are the real samples data_prep/samples.py fetches (Wikipedia dumps, GitHub source
trees, LaTeX's sample2e, saved web pages, Botchan) and, where no real sample exists, C4 pages made
of Botchan's paragraphs and a generated StackExchange site."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_prep import samples
from data_prep.corpus import fetch_botchan, paragraphs, strip_gutenberg
from recipes import compose
from recipes.schema import RecipeConfig

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "llama_mcore"
SHARES = {"commoncrawl": 0.670, "c4": 0.150, "github": 0.045, "wikipedia": 0.045, "books": 0.045, "arxiv": 0.025,
          "stackexchange": 0.020}  # the LLaMA paper's table 1


def raw_sources(root: Path) -> dict[str, Path]:
    from tests.test_data_sources import _posts, truncated_dump

    book = fetch_botchan(CACHE)
    raw = {s: root / s for s in SHARES}
    for folder in raw.values():
        folder.mkdir(parents=True)
    for page in samples.web_pages().glob("*.html"):
        shutil.copyfile(page, raw["commoncrawl"] / page.name)
    paras = [p for p in paragraphs(strip_gutenberg(book)) if p.count(". ") >= 3]
    (raw["c4"] / "c4-train.00000-of-01024.jsonl").write_text(
        "".join(json.dumps({"text": "\n".join(s.strip() + "." for s in p.split(". ") if s.strip())}) + "\n"
                for p in paras[:300]))
    for repo in ("six", "psutil"):
        src = next(p for p in samples.github_repositories().iterdir() if p.name.startswith(repo))
        shutil.copytree(src, raw["github"] / src.name)
    truncated_dump(next(samples.wikipedia_dumps().glob("enwiki-latest-pages-articles1*")),
                   raw["wikipedia"] / "enwiki-20220601-pages-articles1.xml.bz2", 40)
    (raw["books"] / "botchan.txt").write_text(book)
    shutil.copyfile(samples.latex_sample(), raw["arxiv"] / "sample2e.tex")
    rows = []
    for q in range(60):
        rows.append({"Id": 2 * q + 1, "PostTypeId": 1, "Score": 1, "Title": f"How do I use option {q}?",
                     "Body": f"<p>{paras[q]}</p>"})
        rows.append({"Id": 2 * q + 2, "PostTypeId": 2, "ParentId": 2 * q + 1, "Score": 3, "Body": f"<p>{paras[q + 60]}</p>"})
    (raw["stackexchange"] / "cooking").mkdir()
    (raw["stackexchange"] / "cooking" / "Posts.xml").write_text(_posts(rows))
    return raw


def pipeline(*overrides):
    return subprocess.run([sys.executable, "-m", "data_prep", "pipeline", "data_pipeline", *map(str, overrides)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_pipeline_from_raw_folders_to_a_trained_mixture(tmp_path):
    raw = raw_sources(tmp_path / "raw")
    out = tmp_path / "data"
    args = [f"output={out}", f"language_id_model={samples.language_id_model()}", "tokenizer.vocab_size=1024",
            "tokenizer.character_coverage=1.0", "workers=2", "sources.c4.tasks=2", "tokens=100000",
            *(f"sources.{s}.input={p}" for s, p in raw.items())]
    r = pipeline(*args)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((out / "pipeline_report.json").read_text())
    assert set(report["sources"]) == set(SHARES) and report["left_out"] == []
    for name, row in report["sources"].items():
        assert row["documents"] > 0 and row["tokens"] > row["documents"], name
        assert row["share"] == pytest.approx(SHARES[name] / sum(SHARES.values()))
        assert row["documents"] == row["clean_documents"]  # every cleaned document made it into the dataset
        # the dataset on disk: megatron-core reads it
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        assert len(IndexedDataset(str(out / f"{name}_text_document"))) == row["documents"]
    assert report["sources"]["c4"]["drops"] and (out / "pipeline_report.png").stat().st_size > 10_000
    assert "| commoncrawl | 0.6700 |" in (out / "pipeline_report.md").read_text()
    recipe = OmegaConf.load(out / "data_recipe.yaml")
    assert {n: s.weight for n, s in recipe.sources.items()} == SHARES and recipe.split == "998,2,0"

    # the same command again: every stage is complete, nothing is redone
    again = pipeline(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped") == 2 * len(SHARES) + 1 and "[tokenize/books] running" not in again.stderr
    # a changed input redoes that source's stages and keeps the others
    (raw["books"] / "botchan.txt").write_text(fetch_botchan(CACHE)[: 200_000])
    third = pipeline(*args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "[clean/books] running" in third.stderr and "[clean/c4] complete" in third.stderr
    redone = json.loads((out / "pipeline_report.json").read_text())["sources"]
    assert redone["books"]["tokens"] < report["sources"]["books"]["tokens"]  # the shorter book, not the old output
    assert redone["c4"]["documents"] == report["sources"]["c4"]["documents"]

    # tiny_cpu, 20 steps on 2 processes, from the data recipe the pipeline wrote
    from tests.conftest import torchrun

    run_dir = tmp_path / "run"
    cfg = OmegaConf.to_container(compose("tiny_cpu", [
        "train.steps=20", "train.global_batch_size=16", "train.micro_batch_size=4", "train.eval_interval=20",
        "train.eval_batches=1", "train.save_interval=20", "optimizer.warmup_steps=2", "logging.progress_bar=false",
        "logging.wandb_mode=disabled", "logging.log_interval=20", f"train.run_dir={run_dir}"], RecipeConfig))
    cfg["data"] = OmegaConf.to_container(recipe)
    cfg["data"]["split"] = "100,0,0"  # arXiv's sample is one paper: nothing to hold out
    (tmp_path / "recipe.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    r = torchrun(["--config", str(tmp_path / "recipe.yaml")])
    assert r.returncode == 0, r.stderr[-4000:]
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line][-1]
    assert last["step"] == 20
    samples_drawn = 20 * 16
    for name, share in SHARES.items():  # megatron's blend keeps each source within one sample of its share
        assert abs(last[f"data/{name}_share"] * samples_drawn - share / sum(SHARES.values()) * samples_drawn) <= 1, name


@pytest.mark.slow
def test_pipeline_on_slurm_is_a_chain_of_dependent_jobs_with_the_local_output(tmp_path):
    """executor=slurm on the local Slurm, two sources: every stage (clean's split/assemble and
    arXiv's clean, the tokenizer, each source's prepare/tokenize/merge) is a job depending on the
    one before; the datasets are byte-identical to a local run's; a second run submits nothing."""
    from tests.test_slurm import LocalSlurm

    raw = raw_sources(tmp_path / "raw")
    common = ["tokenizer.vocab_size=600", "tokenizer.character_coverage=1.0", "sources.stackexchange.tasks=2",
              f"sources.arxiv.input={raw['arxiv']}", f"sources.stackexchange.input={raw['stackexchange']}"]
    local = pipeline(f"output={tmp_path / 'local'}", *common)
    assert local.returncode == 0, local.stderr[-3000:]
    cluster = LocalSlurm()
    cluster.ensure(nodes=2, cpus=2)
    try:
        on_slurm = pipeline(f"output={tmp_path / 'slurm'}", "executor=slurm", "slurm_partition=local", *common)
        again = pipeline(f"output={tmp_path / 'slurm'}", "executor=slurm", "slurm_partition=local", *common)
    finally:
        cluster.stop()
    assert on_slurm.returncode == 0, on_slurm.stderr[-4000:]
    submitted = next(line for line in on_slurm.stderr.splitlines() if line.startswith("submitted"))
    assert submitted.startswith("submitted 10 dependent Slurm jobs"), submitted
    for name in ("arxiv", "stackexchange"):
        for suffix in (".bin", ".idx"):
            a = (tmp_path / "local" / f"{name}_text_document{suffix}").read_bytes()
            assert a == (tmp_path / "slurm" / f"{name}_text_document{suffix}").read_bytes(), (name, suffix)
    assert again.returncode == 0 and "submitted" not in again.stderr and again.stderr.count("skipped") == 5
