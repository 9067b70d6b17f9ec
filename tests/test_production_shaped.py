"""The shipped pretraining recipes as users launch them, shrunk by one rule (recipes/shrink.py):
their own layout kind, distributed optimizer with overlapped reduce and gather, bf16, batch ramp,
uneven stages, stability intervals in their shipped order (SDC probe, save and evaluation every
4 of 12 steps), on 2 gloo processes. Each run is killed (SIGKILL, at the start of step 7) and
resumed from its step-4 checkpoint, meets a loss spike at step 11 twice (the replay meets it
again) and rolls back each time; the replayed steps must equal the killed run's bit for bit.

One run per recipe family (the family's largest layout: pipeline parallel where it has one), and
LaMDA's and the sliding-window model on the LLaMA recipes they would be trained with (tensor
parallel + SP, data parallel). Every shipped pretraining recipe's shrunk form is checked to resolve.
"""

import json
import re
from pathlib import Path

import pytest

from tests.conftest import torchrun

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
WORLD = 2


def pretrain_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*_pretrain.yaml"))


def family_runs() -> list[tuple[str, tuple[str, ...]]]:
    """(recipe, extra overrides): per family (the name before its size), the recipe with the most
    model-parallel ranks; then the seed models with no recipe of their own."""
    from recipes import compose
    from recipes.schema import RecipeConfig

    best = {}
    for name in pretrain_recipes():
        family = re.sub(r"_\d+b_pretrain$", "", name)
        p = compose(name, [], RecipeConfig).parallel
        key = (p.tensor * p.pipeline, name)
        best[family] = max(best.get(family, key), key)
    runs = [(name, ()) for _, name in sorted(best.values(), key=lambda k: k[1])]
    return runs + [("llama_13b_pretrain", ("model=lamda_137b",)), ("llama_7b_pretrain", ("model=mistral_7b",))]


def shrunk(name, extra=()):
    from recipes import compose
    from recipes.schema import RecipeConfig
    from recipes.shrink import shrink_overrides

    return [name, *extra, *shrink_overrides(compose(name, list(extra), RecipeConfig), WORLD)]


@pytest.mark.parametrize("name", pretrain_recipes())
def test_every_pretraining_recipe_shrinks_to_a_valid_run(name):
    from llama_plugin.layout import resolve
    from recipes import compose
    from recipes.schema import RecipeConfig

    args = shrunk(name)
    cfg, _ = resolve(compose(args[0], args[1:], RecipeConfig), WORLD)
    shipped = compose(name, [], RecipeConfig)
    # what users launch stays: precision, optimizer, overlap, distributed optimizer, recompute
    for key in ("train.precision", "optimizer.name", "parallel.distributed_optimizer", "parallel.overlap_grad_reduce",
                "parallel.overlap_param_gather", "parallel.recompute", "model.position_embedding",
                "model.normalization", "model.activation"):
        assert cfg[key.split(".")[0]][key.split(".")[1]] == shipped[key.split(".")[0]][key.split(".")[1]], key
    assert cfg.train.save_interval == cfg.train.eval_interval == cfg.stability.sdc_check_interval == 4
    assert cfg.train.steps == 12 and bool(cfg.train.batch_ramp) == bool(shipped.train.batch_ramp)


FAMILIES = family_runs()


@pytest.mark.parametrize("name,extra", FAMILIES, ids=[n + "".join(f"+{e}" for e in x) for n, x in FAMILIES])
def test_production_shaped_run_survives_a_kill_a_spike_and_every_periodic_mechanism(demo_data, tmp_path, name, extra):
    run = tmp_path / "run"
    args = [*shrunk(name, extra), f"train.run_dir={run}", "faults.kill_at_step=7", "faults.loss_spike_at_step=11",
            "faults.loss_spike_steps=2"]
    env = {"DEMO_DATA": str(demo_data)}
    killed = torchrun(args, env, nproc=WORLD)
    assert killed.returncode != 0, killed.stdout[-3000:]
    assert "[faults] rank 0: killed (SIGKILL) at the start of step 7" in killed.stdout, killed.stderr[-4000:]
    before = rows(run)
    assert [r["step"] for r in before] == [1, 2, 3, 4, 5, 6]
    assert before[-1]["goodput/sdc_checks_s"] > 0  # the probe at step 4 ran, before the first save

    resumed = torchrun(args, env, nproc=WORLD)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert re.findall(r"resumed from \S+/(step_\d+) ", resumed.stdout) == ["step_00000004"]
    after = rows(run)
    # exact resume: the steps the kill lost are replayed bit for bit
    assert [r["train/loss"] for r in after[4:6]] == [r["train/loss"] for r in before[4:6]]
    assert [r["train/grad_norm"] for r in after[4:6]] == [r["train/grad_norm"] for r in before[4:6]]
    assert [r["step"] for r in after] == list(range(1, 13))
    assert [r["step"] for r in after if "val/loss" in r] == [4, 8, 12]  # evaluation every 4 steps

    state = json.loads((run / "run_state.json").read_text())
    assert state["finished"] and (run / "FINISHED").exists()
    assert state["stability"]["spikes"] == 2 and state["stability"]["rollbacks"] == 2, resumed.stdout[-3000:]
    assert state["stability"]["sdc_probes"] == 3  # steps 4, 8 and 12 (the rollbacks resume after step 8)
    assert "silent data corruption" not in resumed.stdout + resumed.stderr
    ledger = json.loads((run / "skipped_batches.json").read_text())["entries"]
    # each spike at step 11: back to the step-8 checkpoint, the data from step 9 (rollback_steps=2
    # before it) skipped through the spike's batch plus skip_batches=2
    assert [(e["at_step"], e["skip"], e["checkpoint"]) for e in ledger] == [(9, 4, "step_00000008")] * 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_00000008", "step_00000012"]
    for r in after:
        assert all(v == v for v in r.values() if isinstance(v, float)), r  # no NaN anywhere
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    assert cfg["train"]["precision"] == "bf16"
    if cfg["train"]["batch_ramp"]:  # PaLM: the staged batch sizes, in the order the ledger reads them
        sizes = [r["train/global_batch_size"] for r in after]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(cfg["train"]["batch_ramp"]) + 1, sizes


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
