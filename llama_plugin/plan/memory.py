"""Memory per GPU for a resolved recipe: model states (model_states.py) plus activations
(activations.py) for every pipeline stage; the fullest stage decides whether the layout fits.

Activations at the peak of a 1F1B step: stage i holds min(PP - i, micro-batches) micro-batches'
worth, each its layers plus the embedding's (first stage); the last stage holds one, plus the final
norm and the loss.
Not modeled, and covered by `reserve_gb` (default 4): the CUDA context, NCCL's buffers, the
allocator's fragmentation, transient tensors of one op (e.g. the logits' gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_plugin.model import ffn_hidden_size, num_query_groups, stage_layers
from llama_plugin.plan import activations as act
from llama_plugin.plan.model_states import ddp_bucket_size, model_state_bytes, rank_parameters

GB = 2**30  # an "80 GB" A100 has 80 GiB (81,920 MiB)
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
DEFAULT_RESERVE_GB = 4.0


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int
    micro_batch_size: int
    recompute: str
    sequence_parallel: bool
    distributed_optimizer: bool
    overlap_grad_reduce: bool = False
    bucket_size: int | None = None
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    @classmethod
    def of(cls, cfg) -> "Layout":
        p = cfg.parallel
        return cls(p.tensor, p.pipeline, p.data, cfg.train.micro_batch_size, p.recompute,
                   bool(p.sequence_parallel and p.tensor > 1), p.distributed_optimizer, p.overlap_grad_reduce,
                   p.bucket_size, p.first_stage_layers, p.last_stage_layers)

    def stage_layers(self, num_layers: int) -> list[int]:
        return stage_layers(num_layers, self.pipeline, self.first_stage_layers, self.last_stage_layers)

    def num_microbatches(self, global_batch_size: int) -> int:
        return global_batch_size // (self.micro_batch_size * self.data)


def shape(model, layout: Layout, precision: str) -> act.Shape:
    return act.Shape(s=model.seq_length, b=layout.micro_batch_size, h=model.hidden_size,
                     a=model.num_attention_heads, g=num_query_groups(model), f=ffn_hidden_size(model),
                     v=model.vocab_size, e=DTYPE_BYTES[precision], t=layout.tensor, sp=layout.sequence_parallel)


def stage_activation_terms(model, layout: Layout, precision: str, global_batch_size: int, stage: int,
                           fused_swiglu: bool = True) -> dict[str, int]:
    x = shape(model, layout, precision)
    per_stage = layout.stage_layers(model.num_layers)[stage]
    flight = act.in_flight(stage, layout.pipeline, layout.num_microbatches(global_batch_size))
    once = per_stage * act.layer_bytes(x, layout.recompute, fused_swiglu)
    if stage == 0:
        once += act.first_stage_bytes(x)
    if layout.recompute == "full":
        once += act.rope_table_bytes(x)
    last = act.last_stage_bytes(x) if stage == layout.pipeline - 1 else 0  # one micro-batch in flight there
    # Full recompute rebuilds a layer only after the loss's tensors are freed: the larger of the two.
    working = act.working_bytes(x, layout.recompute, fused_swiglu)
    return {"activations": flight * once + last, "recompute_working": max(0, working - last),
            "micro_batches_in_flight": flight}


def stage_memory(model, layout: Layout, precision: str, global_batch_size: int, stage: int, *,
                 fused_swiglu: bool = True, reserve_gb: float = DEFAULT_RESERVE_GB, dp_rank: int = 0) -> dict:
    params = rank_parameters(model, layout.tensor, layout.pipeline, stage,
                             stages=layout.stage_layers(model.num_layers))
    terms = model_state_bytes(
        params, param_bytes=DTYPE_BYTES[precision], data_parallel=layout.data, dp_rank=dp_rank,
        distributed_optimizer=layout.distributed_optimizer,
        bucket_size=ddp_bucket_size(layout.bucket_size, layout.data, layout.overlap_grad_reduce, stage))
    a = stage_activation_terms(model, layout, precision, global_batch_size, stage, fused_swiglu)
    flight = a.pop("micro_batches_in_flight")
    terms.update(a)
    terms["reserve"] = int(reserve_gb * GB)
    return {"stage": stage, "parameters": sum(p.numel for p in params), "micro_batches_in_flight": flight,
            "terms": terms, "total": sum(terms.values())}


def plan_memory(model, layout: Layout, precision: str, global_batch_size: int, gpu_memory_gb: float | None, *,
                fused_swiglu: bool = True, reserve_gb: float = DEFAULT_RESERVE_GB) -> dict:
    stages = [stage_memory(model, layout, precision, global_batch_size, i, fused_swiglu=fused_swiglu,
                           reserve_gb=reserve_gb) for i in range(layout.pipeline)]
    peak = max(stages, key=lambda st: st["total"])
    largest = max((k for k in peak["terms"] if k != "reserve"), key=lambda k: peak["terms"][k])
    out = {"stages": stages, "peak_stage": peak["stage"], "peak_bytes": peak["total"],
           "largest_term": largest, "largest_term_bytes": peak["terms"][largest], "gpu_memory_gb": gpu_memory_gb,
           "fits": None if gpu_memory_gb is None else peak["total"] <= gpu_memory_gb * GB}
    return out
