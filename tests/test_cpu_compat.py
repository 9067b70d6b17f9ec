"""The CPU compatibility layer is active without CUDA and does nothing when CUDA is present."""

import subprocess
import sys

import torch

from llama_plugin import cpu_compat


def run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_inactive_when_cuda_is_available():
    out = run(
        "import torch; torch.cuda.is_available = lambda: True\n"
        "orig = torch.cuda.current_device\n"
        "from llama_plugin import cpu_compat\n"
        "print(cpu_compat.activate(), cpu_compat.is_active(), torch.cuda.current_device is orig)"
    )
    assert out == "False False True"


def test_cuda_placement_becomes_cpu():
    out = run(
        "import torch\n"
        "from llama_plugin import cpu_compat\n"
        "assert cpu_compat.activate()\n"
        "x = torch.zeros(2, device='cuda')\n"
        "y = torch.ones(2).cuda().pin_memory().to('cuda')\n"
        "print(x.device, y.device, torch.ones(1).type(), torch.ones(1, dtype=torch.bfloat16).type(), torch.cuda.current_device())"
    )
    assert out == "cpu cpu torch.cuda.FloatTensor torch.cuda.BFloat16Tensor cpu"


def test_rng_tracker_forks_the_cpu_generator():
    tracker = cpu_compat.CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(3))
    with tracker.fork("model-parallel-rng"):
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced
