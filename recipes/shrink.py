"""A shipped recipe at CPU size: the same parallel, optimizer, precision, stability and overlap
settings, with only the sizes shrunk (layers, width, vocabulary, world size, intervals).

    python -m recipes.shrink llama_65b_pretrain [--world 4]   # prints the overrides

One rule for every recipe, so a new recipe gets its production-shaped run (tests/test_production_shaped.py)
by existing:
- layout on `world` processes (4): pipeline 2 if the recipe pipelines, else tensor 2 if it splits
  tensors; data parallel takes the rest (so the distributed optimizer and its overlapped reduce
  and gather always have data-parallel peers); uneven stages stay uneven (1 + 2 layers);
- model: 2 layers per stage, hidden 64, 4 heads; grouped or multi-query attention stays so; a set
  head size stays different from hidden / heads; the FFN keeps its ratio to hidden; a window
  becomes 16 of a 64-token sequence; vocabulary the demo tokenizer's 1024;
- schedule: 12 steps; every periodic interval (save, evaluation, SDC probe) divided so that the
  smallest is 4 steps and their ratios are kept, so each fires 3 times; warm-up, decay and batch
  ramp stages scaled to the 12 steps, ramp batch sizes divided by the first stage's / 2 x DP;
- stability: spike detection from step 4 on a window of 3 (the ratio rule only), rollback 2 steps,
  skip 2 batches.
The data is the demo book (`data=demo`) and the cluster the local one.
"""

from __future__ import annotations

import argparse
import math
import sys

STEPS = 12
SMALLEST_INTERVAL = 4
HIDDEN, HEADS, VOCAB, SEQ = 64, 4, 1024, 64


def _scaled(step: int, total: int) -> int:
    return max(1, round(step * STEPS / total))


def shrink_overrides(cfg, world: int = 4) -> list[str]:
    """Hydra overrides that shrink the composed recipe `cfg` to CPU size (module docstring)."""
    p, m, t, o = cfg.parallel, cfg.model, cfg.train, cfg.optimizer
    pp = 2 if p.pipeline > 1 else 1
    tp = 2 if p.tensor > 1 and pp == 1 else 1
    if world % (tp * pp):
        raise ValueError(f"world {world} does not hold tensor {tp} x pipeline {pp}")
    dp = world // (tp * pp)
    uneven = p.get("first_stage_layers") is not None or p.get("last_stage_layers") is not None
    layers = 3 if uneven and pp > 1 else 2 * pp
    groups = m.num_attention_heads if m.num_query_groups in (None, m.num_attention_heads) else m.num_query_groups
    groups = HEADS if groups == m.num_attention_heads else (1 if groups == 1 else 2)
    ffn = (m.ffn_hidden_size or 4 * m.hidden_size) / m.hidden_size * HIDDEN
    out = [
        f"parallel.tensor={tp}", f"parallel.pipeline={pp}", "parallel.data=null", "parallel.bucket_size=4000",
        f"parallel.first_stage_layers={1 if uneven and pp > 1 else 'null'}",
        f"parallel.last_stage_layers={2 if uneven and pp > 1 else 'null'}",
        f"model.num_layers={layers}", f"model.hidden_size={HIDDEN}", f"model.num_attention_heads={HEADS}",
        f"model.num_query_groups={groups}", f"model.ffn_hidden_size={8 * math.ceil(ffn / 8)}",
        f"model.vocab_size={VOCAB}", f"model.seq_length={SEQ}",
        "data=demo", "cluster=local", "logging.progress_bar=false", "logging.log_interval=1",
        f"train.steps={STEPS}", "train.micro_batch_size=1", "train.eval_batches=1", "train.exit_interval=null",
        f"optimizer.warmup_steps={_scaled(o.warmup_steps, t.steps) if o.warmup_steps else 0}",
        # the std of a 3-loss window is no measure of noise (a 6 x std rule fires on noise): the ratio rule
        "stability.spike_window=3", "stability.spike_warmup_steps=3", "stability.spike_std_factor=null",
        "stability.rollback_steps=2",
        "stability.skip_batches=2", "stability.data_reserve_batches=16",
    ]
    if m.head_dim is not None:
        out.append("model.head_dim=32")
    if m.sliding_window is not None:
        out.append("model.sliding_window=16")
    if o.decay_steps is not None:
        out.append(f"optimizer.decay_steps={max(_scaled(o.warmup_steps, t.steps) + 1, _scaled(o.decay_steps, t.steps))}")
    intervals = {"train.save_interval": t.save_interval, "train.eval_interval": t.eval_interval}
    if cfg.stability.sdc_check_interval:
        intervals["stability.sdc_check_interval"] = cfg.stability.sdc_check_interval
    unit = min(intervals.values())
    out += [f"{k}={v * SMALLEST_INTERVAL // unit}" for k, v in intervals.items()]
    base = 2 * dp  # sequences of the smallest global batch: two micro-batches per data-parallel rank
    if t.batch_ramp:
        first = t.batch_ramp[0].global_batch_size
        stages, last = [], 0
        for s in t.batch_ramp:
            last = max(last + 1, _scaled(s.until_step, t.steps))
            stages.append(f"{{global_batch_size:{s.global_batch_size * base // first},until_step:{last}}}")
        out += [f"train.batch_ramp=[{','.join(stages)}]", f"train.global_batch_size={t.global_batch_size * base // first}"]
    else:
        out.append(f"train.global_batch_size={base}")
    return out


def main(argv=None) -> int:
    from recipes import RecipeError, compose
    from recipes.schema import RecipeConfig

    ap = argparse.ArgumentParser(prog="python -m recipes.shrink", description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--world", type=int, default=4)
    a = ap.parse_args(argv)
    try:
        print(" ".join(shrink_overrides(compose(a.recipe, a.overrides, RecipeConfig), a.world)))
    except (RecipeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
