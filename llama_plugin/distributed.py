"""Process groups and seeds: torch.distributed + megatron-core parallel_state for one layout.

Under torchrun the rank and world size come from the environment; a plain `python` process is a
world of one (an in-memory store, no port). The backend is NCCL with CUDA, gloo without; on the CPU
the compatibility layer is activated here, before megatron-core touches a device.
"""

from __future__ import annotations

import math
import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from llama_plugin import cpu_compat


def init_distributed(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> None:
    """Initialize torch.distributed (once) and megatron-core's model-parallel groups."""
    if torch.cuda.is_available() and tensor_parallel > 1:
        # megatron-core's TP/SP communication overlaps compute correctly only when kernels are issued
        # in order on one hardware queue (Megatron-LM asserts it). Set here, before CUDA starts.
        current = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
        if current not in (None, "1"):
            import warnings

            warnings.warn(f"CUDA_DEVICE_MAX_CONNECTIONS={current} replaced by 1: tensor parallelism needs one queue")
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if os.environ.get("LLAMA_REQUIRE_CUDA") == "1" and not torch.cuda.is_available():
        from llama_plugin.run_files import node_name

        raise DeviceError(f"{node_name()}: the job asked for GPUs (cluster.gres) but CUDA is not available here "
                          f"(driver, CUDA_VISIBLE_DEVICES or a CPU build of torch); refusing to train on the CPU")
    cpu_compat.activate()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"parallel layout: world size {world} is not divisible by "
            f"tensor_model_parallel_size * pipeline_model_parallel_size = "
            f"{tensor_parallel} * {pipeline_parallel}"
        )
    # Groups are built once per layout: megatron-core's destroy_model_parallel() forgets its groups
    # but does not free them, and every gloo group keeps polling threads alive (a test process that
    # re-initialized per test gathered ~2,000 threads and spent most of its CPU in them).
    layout = (tensor_parallel, pipeline_parallel)
    if parallel_state.model_parallel_is_initialized() and layout != (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size()):
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            distributed_timeout_minutes=timeout_minutes,
        )
    # As Megatron-LM: one seed per pipeline stage, the same on tensor-parallel peers (with CPU
    # initialization their shards are slices of one master weight drawn from this generator).
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


class DeviceError(RuntimeError):
    """This node cannot run the job as asked (no working CUDA where GPUs were requested)."""


def process_group_timeout_minutes(hang_timeout_s: float) -> int:
    """The collectives' timeout: longer than the hang watchdog's (stability.hang_timeout_s), so the
    watchdog, which dumps stacks and asks for a requeue, acts before NCCL's watchdog aborts."""
    return max(30, math.ceil(hang_timeout_s / 60) + 10)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """Where this rank's tensors live: its GPU, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        fn(*args)
    finally:
        shutdown()


def spawn_world(world_size: int, fn, *args) -> None:
    """Run `fn(*args)` in `world_size` new local processes, each with a torchrun-like environment."""
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def run_in_world(world_size: int, fn, *args) -> None:
    """`fn(*args)` on every rank: in this process under torchrun or for a world of one, else spawned."""
    if "RANK" in os.environ or world_size == 1:
        fn(*args)
    else:
        spawn_world(world_size, fn, *args)
