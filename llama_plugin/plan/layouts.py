"""Layouts that fit: every TP/PP/DP/micro-batch/recompute/optimizer layout of a recipe on N GPUs,
its memory (memory.py), and its throughput relative to the recipe's own layout.

The calibrated MFU (cost.py) is what the recipe's layout achieves; another layout is scaled by
  (1 - pipeline bubble) / (hardware FLOPs / model FLOPs)
relative to it. The 1F1B bubble is (PP - 1) / (micro-batches + PP - 1); recompute adds FLOPs:
selective the attention core's forward (4LHQT per token), full the whole forward (2N + 4LHQT).
Tensor-parallel communication is not modeled beyond keeping TP within a node.
"""

from __future__ import annotations

from dataclasses import replace

from llama_plugin.model import ModelConfigError, check_model_shape
from llama_plugin.plan import cost
from llama_plugin.plan.memory import Layout, plan_memory

MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTE = ("none", "selective", "full")


def efficiency(model, layout: Layout, global_batch_size: int) -> float:
    m, p = layout.num_microbatches(global_batch_size), layout.pipeline
    bubble = (p - 1) / (m + p - 1)
    fpt = cost.flops_per_token(model)
    attention_forward = 4 * model.num_layers * model.hidden_size * model.seq_length
    extra = {"none": 0, "selective": attention_forward,
             # the layers' forward again (the embedding and output layer are not recomputed)
             "full": 2 * (cost.num_parameters(model) - 2 * model.vocab_size * model.hidden_size) + attention_forward}
    return (1 - bubble) * fpt / (fpt + extra[layout.recompute])


def candidates(model, gpus: int, gpus_per_node: int, global_batch_size: int, base: Layout):
    for tp in (1, 2, 4, 8, 16):
        if tp > gpus_per_node or gpus % tp:
            continue
        for pp in range(1, model.num_layers + 1):
            if model.num_layers % pp or gpus % (tp * pp):
                continue
            try:
                check_model_shape(model, tp, pp)
            except ModelConfigError:
                continue
            dp = gpus // (tp * pp)
            for mb in MICRO_BATCHES:
                if global_batch_size % (mb * dp):
                    continue
                for rc in RECOMPUTE:
                    for dist_opt in (True, False):
                        yield replace(base, tensor=tp, pipeline=pp, data=dp, micro_batch_size=mb, recompute=rc,
                                      sequence_parallel=tp > 1, distributed_optimizer=dist_opt)


def fitting_layouts(model, precision: str, global_batch_size: int, gpus: int, gpus_per_node: int,
                    gpu_memory_gb: float, base: Layout, base_tokens_per_sec_per_gpu: float,
                    reserve_gb: float) -> list[dict]:
    """The layouts predicted to fit, fastest first."""
    base_eff = efficiency(model, base, global_batch_size)
    rows = []
    for lay in candidates(model, gpus, gpus_per_node, global_batch_size, base):
        mem = plan_memory(model, lay, precision, global_batch_size, gpu_memory_gb, reserve_gb=reserve_gb)
        if not mem["fits"]:
            continue
        rows.append({"layout": lay.__dict__, "peak_gib": mem["peak_bytes"] / 2**30, "largest_term": mem["largest_term"],
                     "tokens_per_sec_per_gpu": base_tokens_per_sec_per_gpu * efficiency(model, lay, global_batch_size) / base_eff,
                     "memory": mem})
    # Fastest first; among equals the one with the most memory left.
    rows.sort(key=lambda r: (-round(r["tokens_per_sec_per_gpu"], 6), r["peak_gib"]))
    return rows
