"""The planner: will a recipe fit, how long will it take, what will it cost, what size to train.

    python -m llama_plugin.plan <recipe> [overrides] [--json] [--png FILE]
    python -m llama_plugin.plan <recipe> [overrides] --gpus N [--gpu-memory 80] [--top K]
    python -m llama_plugin.plan --budget 5.76e23flops | 1e6gpu-hours [--gpu a100|h100]

Options: --gpu a100|h100 (peak, power, memory when the cluster does not say), --mfu X (default:
calibrated on the paper's 65B figure), --power-w W, --pue P, --reserve-gb G.
Memory is per GPU for the recipe's layout (every pipeline stage; the fullest decides), planned for
GPU runs of the local modules (fused SwiGLU, SDPA flash attention); see llama_plugin/plan/.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from llama_plugin.model import ModelConfigError
from llama_plugin.plan import cost, sizing
from llama_plugin.plan.activations import korthikanti_gpt_bytes, layer_terms
from llama_plugin.plan.layouts import fitting_layouts
from llama_plugin.plan.memory import DEFAULT_RESERVE_GB, GB, Layout, plan_memory, shape
from recipes import RecipeError, compose
from recipes.schema import DescribeConfig, RecipeConfig


class PlanError(ValueError):
    pass


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m llama_plugin.plan", add_help=False)
    ap.add_argument("-h", "--help", action="store_true")
    ap.add_argument("recipe", nargs="?")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--png")
    ap.add_argument("--gpus", type=int)
    ap.add_argument("--gpu-memory", type=float)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--gpu", choices=sorted(cost.GPUS))
    ap.add_argument("--mfu", type=float)
    ap.add_argument("--power-w", type=float)
    ap.add_argument("--pue", type=float, default=cost.PUE)
    ap.add_argument("--reserve-gb", type=float, default=DEFAULT_RESERVE_GB)
    ap.add_argument("--budget")
    return ap.parse_args(argv)


def default_mfu() -> float:
    model_65b = compose("describe", ["model=llama_65b"], DescribeConfig).model
    return cost.calibrated_mfu(model_65b)


def resolved_recipe(recipe: str, overrides: list[str]):
    from llama_plugin.layout import resolve

    cfg = compose(recipe, overrides, RecipeConfig)
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    # Planned for GPU nodes: CUDA and TransformerEngine assumed (slurm.launch does the same).
    resolved, _ = resolve(cfg, world, have_te=True, have_cuda=True)
    return resolved


def plan_recipe(cfg, *, gpu: str | None = None, mfu: float | None = None, power_w: float | None = None,
                pue: float = cost.PUE, gpu_memory_gb: float | None = None,
                reserve_gb: float = DEFAULT_RESERVE_GB) -> dict:
    """Everything the planner says about a resolved recipe."""
    c, t, model = cfg.cluster, cfg.train, cfg.model
    table = cost.GPUS[gpu or "a100"]
    layout = Layout.of(cfg)
    gpus = c.nodes * c.gpus_per_node
    memory_gb = gpu_memory_gb if gpu_memory_gb is not None else c.gpu_memory_gb
    if memory_gb is None and gpu is not None:
        memory_gb = table.memory_gib
    mem = plan_memory(model, layout, t.precision, t.global_batch_size, memory_gb, reserve_gb=reserve_gb)
    peak = c.peak_flops_per_gpu if (c.peak_flops_per_gpu and gpu is None) else table.peak_flops
    power = power_w if power_w is not None else (c.gpu_power_w if (c.gpu_power_w and gpu is None) else table.power_w)
    source = "given (--mfu)" if mfu is not None else (
        f"calibrated: {cost.PAPER_65B_TOKENS_PER_SEC_PER_GPU:g} tokens/s/GPU for LLaMA-65B on A100 (paper section 2.4)")
    mfu = mfu if mfu is not None else default_mfu()
    from llama_plugin.optim.batch_ramp import from_recipe

    tokens = from_recipe(t, layout.data).first_sample(t.steps) * model.seq_length  # a batch ramp counts less
    x = shape(model, layout, t.precision)
    return {
        "recipe": cfg.name, "model": model.name, "parameters": cost.num_parameters(model),
        "layout": {**layout.__dict__, "num_microbatches": layout.num_microbatches(t.global_batch_size),
                   "precision": t.precision, "gpus": gpus},
        "activations_per_layer": {"terms": layer_terms(x, layout.recompute),
                                  "bytes": sum(layer_terms(x, layout.recompute).values()),
                                  "korthikanti_gpt_bytes": korthikanti_gpt_bytes(x.s, x.b, x.h, x.a, x.t, x.sp,
                                                                                 layout.recompute)},
        "memory": mem,
        **cost.run_cost(model, tokens, gpus, mfu, peak, power, pue),
        "peak_flops_per_gpu": peak, "gpu_power_w": power, "pue": pue,
        "mfu_source": source,
    }


def parse_budget(text: str, flops_per_gpu_hour: float) -> float:
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*(flops|gpu-hours|gpuh)\s*", text, re.IGNORECASE)
    if not m:
        raise PlanError(f"--budget: {text!r} is not <number>flops or <number>gpu-hours (e.g. 5.76e23flops)")
    value = float(m.group(1))
    return value if m.group(2).lower() == "flops" else value * flops_per_gpu_hour


def gib(n: float) -> str:
    return f"{n / GB:8.2f}"


def format_plan(p: dict) -> str:
    lay, mem = p["layout"], p["memory"]
    lines = [f"{p['recipe']}: {p['model']}, {p['parameters']:,} parameters; {lay['gpus']} GPUs = TP {lay['tensor']} x "
             f"PP {lay['pipeline']} x DP {lay['data']}, micro-batch {lay['micro_batch_size']} "
             f"({lay['num_microbatches']} per step), recompute {lay['recompute']}, sequence parallel "
             f"{lay['sequence_parallel']}, distributed optimizer {lay['distributed_optimizer']}, {lay['precision']}",
             "", "memory per GPU (GiB) by pipeline stage:"]
    terms = list(mem["stages"][0]["terms"])
    lines.append(f"{'stage':>5} " + " ".join(f"{k[:10]:>10}" for k in terms) + f" {'total':>10}  in flight")
    for st in mem["stages"]:
        lines.append(f"{st['stage']:>5} " + " ".join(f"{gib(st['terms'][k]):>10}" for k in terms)
                     + f" {gib(st['total']):>10}  {st['micro_batches_in_flight']}")
    fits = {None: "no GPU memory given", True: "fits", False: "DOES NOT FIT"}[mem["fits"]]
    cap = f" in {mem['gpu_memory_gb']:g} GiB" if mem["gpu_memory_gb"] else ""
    lines.append(f"peak: stage {mem['peak_stage']}, {mem['peak_bytes'] / GB:.2f} GiB: {fits}{cap}; largest term "
                 f"{mem['largest_term']} ({mem['largest_term_bytes'] / GB:.2f} GiB)")
    a = p["activations_per_layer"]
    lines.append(f"activations per layer per micro-batch: {a['bytes'] / 2**20:.1f} MiB (Korthikanti's GPT layer "
                 f"sbh(34 + 5as/h) in this layout: {a['korthikanti_gpt_bytes'] / 2**20:.1f} MiB)")
    lines += ["", f"{p['tokens']:.4g} tokens at {p['tokens_per_sec_per_gpu']:.0f} tokens/s/GPU (MFU {p['mfu']:.3f}; "
              f"{p['mfu_source']}): {p['days']:.1f} days, {p['gpu_hours']:,.0f} GPU-hours, {p['mwh']:.0f} MWh, "
              f"{p['tco2eq']:.0f} tCO2eq ({p['gpu_power_w']:g} W per GPU, PUE {p['pue']:g})"]
    return "\n".join(lines)


def format_layouts(rows: list[dict], top: int) -> str:
    lines = [f"{len(rows)} layouts fit; fastest first:",
             f"{'TP':>3} {'PP':>3} {'DP':>5} {'mb':>3} {'recompute':>9} {'dist.opt':>8} {'GiB':>7} {'tokens/s/GPU':>12}  largest term"]
    for r in rows[:top]:
        lay = r["layout"]
        lines.append(f"{lay['tensor']:>3} {lay['pipeline']:>3} {lay['data']:>5} {lay['micro_batch_size']:>3} "
                     f"{lay['recompute']:>9} {str(lay['distributed_optimizer']):>8} {r['peak_gib']:7.1f} "
                     f"{r['tokens_per_sec_per_gpu']:12.0f}  {r['largest_term']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse printed the reason
        return 2 if e.code else 0
    if args.help or (not args.recipe and not args.budget):
        print(__doc__)
        return 0 if args.help else 2
    try:
        out = {}
        if args.mfu is not None and not 0 < args.mfu <= 1:
            raise PlanError(f"--mfu: must be in (0, 1], got {args.mfu}")
        if args.recipe:
            cfg = resolved_recipe(args.recipe, args.overrides)
            out["plan"] = plan_recipe(cfg, gpu=args.gpu, mfu=args.mfu, power_w=args.power_w, pue=args.pue,
                                      gpu_memory_gb=args.gpu_memory, reserve_gb=args.reserve_gb)
            if args.gpus:
                memory_gb = args.gpu_memory or cfg.cluster.gpu_memory_gb or cost.GPUS[args.gpu or "a100"].memory_gib
                rows = fitting_layouts(cfg.model, cfg.train.precision, cfg.train.global_batch_size, args.gpus,
                                       cfg.cluster.gpus_per_node, memory_gb, Layout.of(cfg),
                                       out["plan"]["tokens_per_sec_per_gpu"], args.reserve_gb)
                out["layouts"] = [{k: v for k, v in r.items() if k != "memory"} for r in rows]
            if args.png:
                from llama_plugin.plan.plot import memory_png

                rows_png = [(f"{cfg.name} (recipe)", out["plan"]["memory"])]
                rows_png += [(f"TP{r['layout']['tensor']} PP{r['layout']['pipeline']} mb{r['layout']['micro_batch_size']} "
                              f"{r['layout']['recompute']}", r["memory"]) for r in (rows[:args.top] if args.gpus else [])]
                memory_png(rows_png, Path(args.png), out["plan"]["memory"]["gpu_memory_gb"])
        if args.budget:
            mfu = args.mfu if args.mfu is not None else default_mfu()
            g = cost.GPUS[args.gpu or "a100"]
            per_gpu_hour = mfu * g.peak_flops * 3600
            flops = parse_budget(args.budget, per_gpu_hour)
            out["sizing"] = {"gpu": g.name, "mfu": mfu, **sizing.size(flops, lambda f: f / per_gpu_hour)}
    except (RecipeError, ModelConfigError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    if "plan" in out:
        print(format_plan(out["plan"]))
    if "layouts" in out:
        print("\n" + format_layouts(out["layouts"], args.top))
    if "sizing" in out:
        print("\n" + format_sizing(out["sizing"]))
    return 0


def format_sizing(s: dict) -> str:
    c, f = s["chinchilla_optimal"], s["fitted_law_optimum"]
    lines = [f"budget {s['budget_flops']:.3g} FLOPs = {s['budget_gpu_hours']:,.0f} {s['gpu']} GPU-hours at MFU {s['mfu']:.3f}",
             f"Chinchilla-optimal ({c['rule']}): {c['parameters'] / 1e9:.1f}B parameters, {c['tokens'] / 1e12:.2f}T tokens",
             f"fitted-law optimum ({f['rule']}): {f['parameters'] / 1e9:.1f}B, {f['tokens'] / 1e12:.2f}T, loss {f['predicted_loss']:.3f}",
             "same loss, smaller and longer (LLaMA's choice):",
             f"{'params':>9} {'tokens':>9} {'tok/param':>9} {'train GPU-h':>12} {'GPU-h per 1M inference tokens':>30} {'pays off after':>16}"]
    for o in s["same_loss_options"]:
        be = o["break_even_inference_tokens"]
        lines.append(f"{o['parameters'] / 1e9:8.1f}B {o['tokens'] / 1e12:8.2f}T {o['tokens_per_parameter']:9.0f} "
                     f"{o['train_gpu_hours']:12,.0f} {o['inference_gpu_hours_per_million_tokens']:30.4f} "
                     f"{'(reference)' if be is None else f'{be:.3g} tokens':>16}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
