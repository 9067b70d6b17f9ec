"""Weights, gradients and optimizer states of one rank, as megatron-core allocates them.

The rank's parameters are listed in module order from the shape alone (no model is built); the
gradient buffer is laid out as megatron-core's `_ParamAndGradBuffer` lays it out (parameters in
reverse order; with the distributed optimizer each parameter starts at a multiple of 64 elements and
each bucket ends at a multiple of lcm(DP, 128)), so padding is counted exactly. Gradients are
reduced in fp32 (train_step.wrap_ddp: grad_reduce_in_fp32), one fp32 element per buffer element.
Optimizer (Adam): two fp32 moments per element it updates, plus an fp32 master copy when the weights
are bf16; the distributed optimizer updates only this rank's 1/DP slice of every bucket.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

FP32 = 4


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    shared_embedding: bool = False  # a tied output layer on a later stage: its own bucket


def _layer_and_top_parameters(model) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """Names and full (TP=1) sizes, in megatron-core's registration order, of one decoder layer and
    of the model-level tensors, from a one-layer model built on the meta device: every layer type
    the model recipe can choose (layers/) is counted as megatron allocates it. Cached per shape (a
    layout search asks for thousands of layouts of one model)."""
    import json

    from omegaconf import OmegaConf

    shape = OmegaConf.to_container(model, resolve=True) if OmegaConf.is_config(model) else dict(model)
    return _meta_parameters(json.dumps({k: v for k, v in shape.items() if k != "num_layers"}, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _meta_parameters(shape_json: str):
    import json

    import torch
    from omegaconf import OmegaConf

    from llama_plugin.distributed import init_distributed
    from llama_plugin.model import build_gpt_model, transformer_config
    from recipes import validate
    from recipes.schema import ModelConfig

    shape = dict(json.loads(shape_json), num_layers=1, share_embeddings_and_output_weights=False)
    one = validate(OmegaConf.create(shape), ModelConfig)
    init_distributed(1, 1)
    config = transformer_config(one, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        net = build_gpt_model(one, config)
    layer, top = [], {}
    for name, p in net.named_parameters():
        if name.startswith("decoder.layers.0."):
            layer.append((name.removeprefix("decoder.layers.0."), p.numel()))
        else:
            top[name] = p.numel()
    return layer, top


def rank_parameters(model, tensor: int, pipeline: int, stage: int, num_query_groups: int | None = None,
                    ffn: int | None = None, stages: list[int] | None = None) -> list[Param]:
    """This stage's parameters (tensor-parallel rank 0 holds the same sizes as every other), in the
    order megatron-core's GPTModel registers them. Split tensors (model.tp_split_dim) hold 1/TP.
    `stages`: layers per stage (model.stage_layers; default even). (`num_query_groups` and `ffn`
    are read from the model; kept for callers that pass them.)"""
    from llama_plugin.model import tp_split_dim

    layer, top = _layer_and_top_parameters(model)
    local = lambda name, n: n // tensor if tp_split_dim(name) is not None else n
    stages = stages or [model.num_layers // pipeline] * pipeline
    first, last = stage == 0, stage == pipeline - 1
    params = []
    if first:
        params += [Param(n, local(n, k)) for n, k in top.items() if n.startswith("embedding.")]
    for i in range(sum(stages[:stage]), sum(stages[:stage + 1])):
        params += [Param(f"decoder.layers.{i}.{n}", local(n, k)) for n, k in layer]
    if last:
        params += [Param(n, k) for n, k in top.items() if n.startswith("decoder.final_layernorm.")]
        tied = model.share_embeddings_and_output_weights
        if not tied or not first:  # tied on one stage: the embedding is the output layer
            name = "output_layer.weight"
            params.append(Param(name, local(name, top[name]), shared_embedding=tied))
    return params


@dataclass
class Buffer:
    numel: int  # elements of the gradient (and, distributed, parameter) buffer, padding included
    buckets: list[tuple[int, int]]  # [start, end) of each bucket
    index: dict[str, tuple[int, int, int]]  # parameter -> (start, end, bucket)


def grad_buffer(params: list[Param], data_parallel: int, distributed_optimizer: bool,
                bucket_size: int | None) -> Buffer:
    """megatron-core 0.16 `_ParamAndGradBuffer.__init__`'s layout, rewritten over sizes."""
    def pad(n: int, k: int) -> int:
        return math.ceil(n / k) * k

    def pad_bucket_end(i: int) -> int:
        return pad(i, math.lcm(data_parallel, 128)) if distributed_optimizer else i

    buckets, index = [], {}
    start = bucket_start = end = 0
    members = 0

    def close(param_end: int) -> int:
        nonlocal bucket_start, members
        bucket_end = pad_bucket_end(param_end)
        buckets.append((bucket_start, bucket_end))
        bucket_start, members = bucket_end, 0
        return bucket_end

    for p in reversed(params):
        if distributed_optimizer:
            start = pad(start, 64)
        own_bucket = p.shared_embedding and distributed_optimizer
        if own_bucket and members:
            start = close(start)
        end = start + p.numel
        index[p.name] = (start, end, len(buckets))
        members += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own_bucket:
            start = close(end)
        else:
            start = end
    if members:
        close(end)
    return Buffer(buckets[-1][1] if buckets else 0, buckets, index)


def ddp_bucket_size(configured: int | None, data_parallel: int, overlap_grad_reduce: bool, stage: int) -> int | None:
    """megatron-core DistributedDataParallel's choice: one bucket without overlap, and on every
    pipeline stage but the first; else the configured size or max(40M, 1M x DP)."""
    if not overlap_grad_reduce or stage > 0:
        return None
    return configured if configured is not None else max(40_000_000, 1_000_000 * data_parallel)


def optimizer_elements(buffer: Buffer, params: list[Param], data_parallel: int, dp_rank: int,
                       distributed_optimizer: bool) -> int:
    """Parameter elements this rank's optimizer updates."""
    if not distributed_optimizer:
        return sum(p.numel for p in params)
    total = 0
    for start, end, bucket in buffer.index.values():
        b0, b1 = buffer.buckets[bucket]
        size = (b1 - b0) // data_parallel
        lo, hi = b0 + dp_rank * size, b0 + (dp_rank + 1) * size
        total += max(0, min(end, hi) - max(start, lo))
    return total


def model_state_bytes(params: list[Param], *, param_bytes: int, data_parallel: int, dp_rank: int,
                      distributed_optimizer: bool, bucket_size: int | None) -> dict[str, int]:
    """{weights, gradients, optimizer, buffer_padding} bytes on one rank."""
    buf = grad_buffer(params, data_parallel, distributed_optimizer, bucket_size)
    n = sum(p.numel for p in params)
    updated = optimizer_elements(buf, params, data_parallel, dp_rank, distributed_optimizer)
    master = FP32 if param_bytes != FP32 else 0  # bf16 weights: an fp32 copy to update
    return {
        "weights": n * param_bytes,
        "gradients": n * FP32,
        "optimizer": updated * (2 * FP32 + master),
        # The distributed optimizer's buffers hold the weights too; both carry the alignment padding.
        "buffer_padding": (buf.numel - n) * (FP32 + (param_bytes if distributed_optimizer else 0)),
    }
