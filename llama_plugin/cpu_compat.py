"""Run megatron-core on a machine without CUDA (tests, CI, the CPU demo).

megatron-core is written for NVIDIA GPUs and assumes CUDA in a handful of places. This module
answers each assumption for the CPU, and nothing else. `activate()` is a no-op when CUDA is
available, so none of it can touch a GPU run. Every patch is listed in `activate()` with what
megatron-core assumes; each was confirmed necessary by turning it off (../shared/FEASIBILITY.md).

The patches are process-wide; call `activate()` in every worker process (the torch function mode
is per thread and is entered on the calling thread).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_active_mode: "CudaToCpuMode | None" = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement to the CPU inside torch calls.

    megatron-core hard-codes `device="cuda"` (causal masks, pipeline schedules' token counts, the
    optimizer's found-inf and loss-scale tensors, grad clipping, tensor_parallel/data.py),
    calls `.cuda()` / `.pin_memory()`, and tests dtypes with `x.type() == 'torch.cuda.FloatTensor'`
    (clip_grads, DistributedOptimizer, Float16Optimizer). This mode sends those tensors to the CPU,
    makes `.cuda()` and `.pin_memory()` identities and reports CPU tensor types under their CUDA
    names. Cost: one Python call per torch call (~1-3 ms per step on a tiny model).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            name = func(*args, **kwargs)
            return _CUDA_TYPE_NAMES.get(name, name)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """megatron-core's named RNG states (`get_cuda_rng_tracker`) kept as CPU generator states.

    megatron-core seeds and forks CUDA generators (`model_parallel_cuda_manual_seed` calls
    `torch.cuda.get_rng_state`; attention forks the tracker even at dropout 0). Same interface,
    backed by the CPU default generator.
    """

    def __init__(self):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _current_device():
    return _CPU


def _synchronize(device=None):
    return None


def _in_cpu_mode(backward):
    def wrapped(ctx, *grads):
        with CudaToCpuMode():
            return backward(ctx, *grads)

    return wrapped


def _get_cpu_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def activate() -> bool:
    """Install the CPU answers to megatron-core's CUDA assumptions; returns whether it did.

    1. `torch.cuda.current_device()` asserts without CUDA; RoPE, the tensor-parallel mappings and
       DDP's grad buffers call it to place tensors. It returns the CPU device.
    2. The CUDA RNG tracker (tensor_parallel/random.py) is replaced by `CpuRNGStatesTracker`.
    3. `CudaToCpuMode` is entered on this thread (hard-coded "cuda" devices, `.cuda()`,
       `.pin_memory()`, `x.type()` checks).
    4. `torch.cuda.synchronize()` (distributed checkpoint save, timers) asserts without CUDA; CPU
       ops are already synchronous, so it does nothing.
    5. Activation recomputation (tensor_parallel/random.py CheckpointFunction) saves and restores
       the CUDA generator state around the recomputed forward; it saves the CPU generator's. The
       recomputed forward runs inside autograd's backward, where torch function modes are not
       active, so the checkpoint functions' backward enters `CudaToCpuMode` itself.
    """
    global _active_mode
    if torch.cuda.is_available():
        return False
    if _active_mode is not None:
        return True
    import warnings

    # Advice for GPUs (one CUDA hardware queue for TP/SP overlap): noise on a CPU.
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")

    torch.cuda.current_device = _current_device
    torch.cuda.synchronize = _synchronize

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random._get_cuda_rng_state = _get_cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    for fn in (mcore_random.CheckpointFunction, mcore_random.CheckpointWithoutOutputFunction):
        fn.backward = staticmethod(_in_cpu_mode(fn.backward))

    _active_mode = CudaToCpuMode()
    _active_mode.__enter__()
    return True


def is_active() -> bool:
    return _active_mode is not None
