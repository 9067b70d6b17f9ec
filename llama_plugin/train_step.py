"""One optimizer step with megatron-core: DDP wrapping, the optimizer, the forward/backward schedule.

These are the pieces the training loop composes and the parallel-equivalence tests drive directly:
  wrap_ddp(...)        megatron DDP (contiguous grad buffers, bucketed and optionally overlapped
                       reduce-scatter / all-reduce)
  build_optimizer(...) megatron's Adam(W) with clipping, optionally the distributed optimizer
  train_step(...)      zero grads, run the schedule (no pipelining, or 1F1B for PP > 1) over the
                       micro-batches, finalize grads (DP reduce, SP norm-grad and embedding sync),
                       then clip and step unless the loss or grad norm is non-finite on any rank
                       (then no rank changes a parameter or an optimizer state); returns the loss
                       averaged over tokens, the pre-clip grad norm and whether it stepped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from llama_plugin.distributed import device


@dataclass
class Batch:
    """One micro-batch: tokens [b, s], labels [b, s] (the next tokens), loss_mask [b, s]."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor


def wrap_ddp(model_chunks, config: TransformerConfig, *, overlap_grad_reduce: bool = False,
             use_distributed_optimizer: bool = False, overlap_param_gather: bool = False,
             bucket_size: int | None = None):
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        # The distributed optimizer's param all-gather runs in the next forward, bucket by bucket.
        overlap_param_gather=overlap_param_gather,
        bucket_size=bucket_size,
    )
    chunks = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
        for i, m in enumerate(model_chunks)
    ]
    for c in chunks:
        c.broadcast_params()  # every data-parallel replica starts from rank 0's weights
    # The schedules read these from the config: grad sync is deferred to the last micro-batch.
    if overlap_grad_reduce:
        config.no_sync_func = chunks[0].no_sync if len(chunks) == 1 else [c.no_sync for c in chunks]
    config.finalize_model_grads_func = finalize_grads
    return chunks


def finalize_grads(model, *args, **kwargs):
    """megatron's finalize_model_grads (DP reduce, SP norm grads, tied embeddings), then the sums
    over tensor-parallel ranks of replicated multi-query key/value projections (layers/multi_query.py)."""
    from llama_plugin.layers.multi_query import sum_tp_partial_grads

    finalize_model_grads(model, *args, **kwargs)
    sum_tp_partial_grads(model)


def build_optimizer(model_chunks, *, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
                    clip_grad: float = 1.0, params_dtype=torch.float32, use_distributed_optimizer=False,
                    overlap_param_gather: bool = False, min_lr: float | None = None, adafactor: dict | None = None):
    """megatron's optimizer: AdamW, or with `adafactor` (Adafactor's settings) PaLM's Adafactor.

    Adafactor takes a documented path around megatron's factory, which builds only Adam and SGD:
    the factory builds everything as for Adam (parameter groups with their weight-decay and lr
    multipliers, the bf16 main parameters, clipping, the scheduler's view of the groups), then each
    inner torch optimizer is replaced by Adafactor over the same groups, before any step. Under the
    distributed optimizer those are data-parallel shards, and Adafactor is told whose.
    """
    cfg = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr if min_lr is not None else lr,
        weight_decay=weight_decay,
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        adam_eps=eps,
        clip_grad=clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(cfg, model_chunks)
    if adafactor is not None:
        from llama_plugin.optim.adafactor import Adafactor, attach_to_distributed_optimizer

        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if getattr(opt, "optimizer", None) is not None:
                # megatron's keys (params, lr/wd multipliers...) stay; Adam's own settings go.
                groups = [{k: v for k, v in g.items() if k not in opt.optimizer.defaults or k in ("params", "lr", "weight_decay")}
                          for g in opt.optimizer.param_groups]
                # As megatron's DistributedOptimizer does with its shard parameters (views, which
                # torch's add_param_group refuses): the groups are set, not added.
                opt.optimizer = Adafactor([torch.nn.Parameter(torch.zeros(1))], lr=lr, weight_decay=weight_decay,
                                          **adafactor)
                opt.optimizer.param_groups = [{**opt.optimizer.defaults, **g} for g in groups]
                if use_distributed_optimizer:  # its parameters are shards: whole-matrix RMS over the DP group
                    attach_to_distributed_optimizer(opt, model_chunks)
    for c in model_chunks:
        c.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    tokens = mask.sum().to(torch.int)
    # The schedule divides `total` by `tokens` (and by the number of micro-batches).
    return total, tokens, {"lm_loss": torch.stack([total.detach(), tokens.float()])}


def _forward_step(data_iterator, model):
    b = next(data_iterator)
    dev = device()
    tokens, labels, loss_mask = b.tokens.to(dev), b.labels.to(dev), b.loss_mask.to(dev)
    positions = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    per_token_loss = model(tokens, positions, None, labels=labels)
    return per_token_loss, lambda output: _loss_func(loss_mask, output)


def _run_schedule(model_chunks, micro_batches: list[Batch], forward_only: bool) -> list[dict]:
    b, s = micro_batches[0].tokens.shape
    return get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(micro_batches),
        model=model_chunks,
        num_microbatches=len(micro_batches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=forward_only,
    )


def train_step(model_chunks, optimizer, micro_batches: list[Batch], after_backward=None, before_grad_sync=None,
               report: dict | None = None) -> tuple[float, float, bool]:
    """(loss, grad_norm, stepped) of one optimizer step over this rank's micro-batches.

    The loss is the token-weighted mean over the micro-batches of all data-parallel ranks; every
    rank returns the same value. megatron's bf16 and fp32 optimizers would apply a NaN gradient
    (only fp16's loss scaler looks for one), so the step is taken apart here: the grad norm is
    computed as megatron's step does, every rank says whether its loss and norm are finite, and
    only if all are is the update applied. `before_grad_sync` runs when this rank's forward and
    backward are done, before it waits for the data-parallel gradient reduction (the straggler
    monitor's clock); `after_backward` (fault injection) once the gradients are reduced. A skipped
    step puts the ranks whose own loss or gradients are non-finite into `report["nonfinite_ranks"]`.
    """
    for c in model_chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    config = model_chunks[0].config
    finalize = config.finalize_model_grads_func
    if before_grad_sync is not None:
        def finalize_after_hook(*args, **kwargs):
            before_grad_sync()
            return finalize(*args, **kwargs)

        config.finalize_model_grads_func = finalize_after_hook
    try:
        stats = _run_schedule(model_chunks, micro_batches, forward_only=False)
    finally:
        config.finalize_model_grads_func = finalize
    loss = reduce_loss(stats)
    if after_backward is not None:
        after_backward()
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if not all_ranks_finite(loss, grad_norm, found_inf):
        if report is not None:
            report["nonfinite_ranks"] = nonfinite_ranks(model_chunks, stats)
        return loss, grad_norm, False
    clip_grads(optimizer, grad_norm)
    return loss, grad_norm, bool(optimizer.step_with_ready_grads())


def all_ranks_finite(loss: float, grad_norm: float, found_inf: bool = False) -> bool:
    """Collective over every rank: True when no rank saw a non-finite loss or grad norm. (A NaN in
    one data-parallel replica's gradient after the reduction shows only in its own norm.)"""
    bad = torch.tensor([0.0 if (math.isfinite(loss) and math.isfinite(grad_norm) and not found_inf) else 1.0],
                       device=device())
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def nonfinite_ranks(model_chunks, stats: list[dict]) -> list[int]:
    """Collective, on a skipped step only: the ranks whose own micro-batch losses or gradient
    buffers hold a non-finite value. The reduced loss and (with the distributed optimizer) the grad
    norm are the same on every rank, so they cannot say where a NaN came from; a rank's own
    forward can. (A NaN made in one rank's backward reaches its data-parallel peers through the
    gradient reduction: then several ranks are named.)"""
    bad = any(not torch.isfinite(s["lm_loss"]).all() for s in stats)
    bad = bad or any(not torch.isfinite(b.grad_data).all() for c in model_chunks for b in c.buffers)
    flags = torch.zeros(dist.get_world_size(), device=device())
    flags[dist.get_rank()] = float(bad)
    dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


def clip_grads(optimizer, grad_norm: float) -> None:
    """Scale the main grads to the clip norm, as megatron's (Chained)Optimizer.step does."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if getattr(opt, "is_stub_optimizer", False) or not params or opt.config.clip_grad <= 0.0:
            continue
        clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                                     use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


def eval_loss(model_chunks, micro_batches: list[Batch]) -> float:
    """Token-weighted mean loss of the micro-batches (forward only), the same on every rank."""
    for c in model_chunks:
        c.eval()
    with torch.no_grad():
        stats = _run_schedule(model_chunks, micro_batches, forward_only=True)
    for c in model_chunks:
        c.train()
    return reduce_loss(stats)


def reduce_loss(stats: list[dict]) -> float:
    """Token-weighted mean of the micro-batch losses over the data-parallel group, on every rank."""
    total = torch.zeros(2, device=device())
    if parallel_state.is_pipeline_last_stage():
        for s in stats:
            total += s["lm_loss"]
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return float(total[0] / total[1])
