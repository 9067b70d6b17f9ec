"""Time, GPU-hours, energy and carbon of a training run, as the LLaMA paper counts them.

Throughput: tokens/s/GPU = MFU x dense peak / training FLOPs per token (flops.py, PaLM's 6N + 12LHQT).
The default MFU is calibrated on the paper's one measured figure: 65B at about 380 tokens/s/GPU on
2048 A100-80GB (paper section 2.4), in its recipe's layout. Energy (paper section 6.1, Table 15):
MWh = GPU-hours x GPU power x PUE / 1e6, with an A100 at 400 W and a PUE of 1.1; tCO2eq = MWh x
0.385 (the US national average the paper uses).
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_plugin import flops
from llama_plugin.model import ffn_hidden_size, num_query_groups
from llama_plugin.plan.model_states import rank_parameters

PUE = 1.1
TCO2_PER_MWH = 0.385
PAPER_65B_TOKENS_PER_SEC_PER_GPU = 380.0


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float  # dense bf16, as llama_plugin/throughput.py
    power_w: float  # board power the carbon formula charges
    memory_gib: float


GPUS = {
    "a100": Gpu("A100-SXM4-80GB", 312e12, 400.0, 80.0),
    "h100": Gpu("H100-SXM5-80GB", 989.4e12, 700.0, 80.0),
}


def num_parameters(model) -> int:
    """Exact parameter count (the same as `describe`'s meta-device count; tests check it)."""
    return sum(p.numel for p in rank_parameters(model, 1, 1, 0, num_query_groups(model), ffn_hidden_size(model)))


def flops_per_token(model) -> int:
    return flops.flops_per_token(num_parameters(model), model)


def calibrated_mfu(model_65b, peak_flops: float = GPUS["a100"].peak_flops,
                   tokens_per_sec_per_gpu: float = PAPER_65B_TOKENS_PER_SEC_PER_GPU) -> float:
    """The MFU that the paper's 65B figure implies on an A100."""
    return tokens_per_sec_per_gpu * flops_per_token(model_65b) / peak_flops


def energy(gpu_hours: float, power_w: float = GPUS["a100"].power_w, pue: float = PUE) -> dict:
    mwh = gpu_hours * power_w * pue / 1e6
    return {"mwh": mwh, "tco2eq": mwh * TCO2_PER_MWH}


def run_cost(model, tokens: float, gpus: int, mfu: float, peak_flops: float, power_w: float, pue: float = PUE) -> dict:
    fpt = flops_per_token(model)
    per_gpu = mfu * peak_flops / fpt
    gpu_hours = tokens / per_gpu / 3600
    return {"tokens": tokens, "flops_per_token": fpt, "mfu": mfu, "tokens_per_sec_per_gpu": per_gpu,
            "days": tokens / (per_gpu * gpus) / 86400, "gpu_hours": gpu_hours, **energy(gpu_hours, power_w, pue)}
