"""Render a recipe's Slurm job and submit it.

    python -m slurm.launch <recipe> [hydra overrides] [--dry-run] [--skip-memory-check]

Composes the recipe (same tree and overrides as `python -m llama_plugin.train`, or as
`python -m llama_plugin.finetune` for a fine-tuning recipe, which then runs instead), checks the
parallel layout against the allocation (tensor * pipeline * data == cluster.nodes *
cluster.gpus_per_node, tensor parallelism within a node, batch sizes), writes
<run_dir>/slurm/recipe.yaml (the composed recipe the job trains from) and
<run_dir>/slurm/job.sbatch, prints the script and submits it with sbatch unless --dry-run.
On GPU clusters that state `cluster.gpu_memory_gb`, a layout the planner (llama_plugin/plan/)
predicts not to fit is refused, naming its largest memory term; --skip-memory-check launches anyway.
Errors name the field and exit 2 before anything is submitted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from llama_plugin.layout import resolve
from recipes import RECIPES_DIR, RecipeError, compose
from recipes.schema import RecipeConfig
from llama_plugin.run_files import PAUSED_MARKER, is_secret
from slurm.render import CHAIN_STOP, JOBS_FILE, render

USAGE = "usage: python -m slurm.launch <recipe> [overrides] [--dry-run] [--skip-memory-check]"


def check_memory(resolved) -> None:
    """RecipeError when the planner predicts the layout does not fit cluster.gpu_memory_gb."""
    from llama_plugin.plan.memory import GB, Layout, plan_memory

    c, t = resolved.cluster, resolved.train
    mem = plan_memory(resolved.model, Layout.of(resolved), t.precision, t.global_batch_size, c.gpu_memory_gb)
    if not mem["fits"]:
        raise RecipeError(
            f"parallel: predicted {mem['peak_bytes'] / GB:.1f} GiB per GPU (pipeline stage {mem['peak_stage']}) is more "
            f"than cluster.gpu_memory_gb={c.gpu_memory_gb:g}; largest term: {mem['largest_term']} "
            f"{mem['largest_term_bytes'] / GB:.1f} GiB. See `python -m llama_plugin.plan {resolved.name} ...`; "
            "--skip-memory-check launches anyway")


def check_allocation(cfg, memory_check: bool = True) -> dict:
    """The layout the allocation gives; RecipeError when the recipe does not fit it."""
    c, p = cfg.cluster, cfg.parallel
    world = c.nodes * c.gpus_per_node
    if p.tensor > c.gpus_per_node:
        raise RecipeError(f"parallel.tensor: {p.tensor} is more than cluster.gpus_per_node={c.gpus_per_node} "
                          "(tensor parallelism must stay within a node)")
    try:
        # On GPU nodes TransformerEngine and CUDA are assumed (training re-checks on the nodes).
        on_gpus = c.gres is not None
        resolved, notes = resolve(cfg, world, have_te=on_gpus, have_cuda=on_gpus)
    except RecipeError as e:
        if "world size" not in str(e) and "data-parallel" not in str(e):
            raise
        raise RecipeError(f"{e} (world size = cluster.nodes * cluster.gpus_per_node = {c.nodes} * "
                          f"{c.gpus_per_node})") from None
    if memory_check and c.gpu_memory_gb is not None:
        check_memory(resolved)
    rp = resolved.parallel
    return {"world_size": world, "tensor": rp.tensor, "pipeline": rp.pipeline, "data": rp.data, "notes": notes}


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def is_finetune_recipe(recipe: str) -> bool:
    """Fine-tuning recipes (llama_plugin.finetune) list `finetune_schema` in their defaults."""
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        return False  # compose reports the unknown recipe
    defaults = OmegaConf.load(path).get("defaults", [])
    return "finetune_schema" in [d for d in defaults if isinstance(d, str)]


def check_finetune_allocation(cfg) -> dict:
    """Fine-tuning is data parallel (DeepSpeed ZeRO): the global batch must split over the world."""
    from recipes.finetune_schema import check_finetune

    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    try:
        check_finetune(cfg, world)
    except RecipeError as e:
        raise RecipeError(f"{e} (world size = cluster.nodes * cluster.gpus_per_node = {cfg.cluster.nodes} * "
                          f"{cfg.cluster.gpus_per_node})") from None
    return {"world_size": world, "tensor": 1, "pipeline": 1, "data": world, "notes": []}


def secret_env(cfg) -> dict:
    """The cluster.env entries whose names mark them as secrets (run_files.is_secret)."""
    return {k: v for k, v in cfg.cluster.env.items() if is_secret(k)}


def prepare(recipe: str, overrides: list[str], cwd: Path | None = None, memory_check: bool = True):
    """(script path, script text, layout) with the files written; nothing submitted."""
    finetune = is_finetune_recipe(recipe)
    if finetune:
        from recipes.finetune_schema import FinetuneConfig

        cfg = compose(recipe, overrides, FinetuneConfig)
        layout = check_finetune_allocation(cfg)
    else:
        cfg = compose(recipe, overrides, RecipeConfig)
        layout = check_allocation(cfg, memory_check)
    cwd = Path.cwd() if cwd is None else cwd
    workdir = Path(cfg.cluster.workdir or cwd).absolute()
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    # Absolute, so that requeued and chained jobs find the run wherever they start.
    run_dir = workdir / cfg.train.run_dir
    cfg.train.run_dir = str(run_dir)
    slurm_dir = run_dir / "slurm"
    from slurm.stop import live_jobs

    live = live_jobs(run_dir)
    if live:
        raise RecipeError(f"train.run_dir: {run_dir} has live Slurm jobs ({', '.join(f'{j} {s}' for j, s in sorted(live.items()))}); "
                          f"stop them with `python -m slurm.stop {run_dir}` or use another train.run_dir")
    # Secrets (cluster.env names with KEY, TOKEN, SECRET, PASSWORD) reach the job through sbatch's
    # environment only: not in recipe.yaml, not in the script.
    secrets = secret_env(cfg)
    for k in secrets:
        cfg.cluster.env[k] = "<secret: from the job's environment>"
    recipe_file, script_file = slurm_dir / "recipe.yaml", slurm_dir / "job.sbatch"
    text = render(cfg, run_dir, recipe_file, script_file, workdir,
                  "llama_plugin.finetune" if finetune else "llama_plugin.train")
    slurm_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(recipe_file, OmegaConf.to_yaml(cfg))
    _write_atomic(script_file, text, 0o755)
    (slurm_dir / CHAIN_STOP).unlink(missing_ok=True)  # a launch starts a stopped run again
    return script_file, text, layout


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    dry_run, memory_check = "--dry-run" in argv, "--skip-memory-check" not in argv
    argv = [a for a in argv if a not in ("--dry-run", "--skip-memory-check")]
    if argv[0].startswith("-") or "=" in argv[0]:
        print(f"error: {USAGE}", file=sys.stderr)
        return 2
    try:
        script_file, text, layout = prepare(argv[0], argv[1:], memory_check=memory_check)
        # Composed again for the values prepare() keeps out of every file it writes.
        secrets = secret_env(compose(argv[0], argv[1:]))
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    for note in layout["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"layout: world size {layout['world_size']} = tensor {layout['tensor']} x pipeline {layout['pipeline']} "
          f"x data {layout['data']}", file=sys.stderr)
    print(f"wrote {script_file}", file=sys.stderr)
    if dry_run:
        return 0
    env = dict(os.environ, **secrets)
    (script_file.parents[1] / PAUSED_MARKER).unlink(missing_ok=True)  # a new launch goes on past train.exit_at_step
    result = subprocess.run(["sbatch", "--parsable", str(script_file)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"error: sbatch refused {script_file}: {result.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = result.stdout.strip().split(";")[0]
    with open(script_file.parent / JOBS_FILE, "a") as f:  # slurm.stop and the next launch read it
        f.write(job_id + "\n")
    print(f"submitted job {job_id}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
