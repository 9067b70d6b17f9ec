"""The planner (`python -m llama_plugin.plan`): memory per GPU, time, GPU-hours and carbon, compute-
optimal sizing and the layouts that fit, before a run is launched.

    activations.py   the bytes one layer keeps for backward, derived tensor by tensor
    model_states.py  weights, gradients (megatron's padded buffer) and optimizer states per rank
    memory.py        both per pipeline stage under 1F1B; does it fit
    cost.py          tokens/s/GPU at an MFU, days, GPU-hours, MWh, tCO2eq (the paper's formula)
    sizing.py        Chinchilla-optimal size and LLaMA-style smaller-longer options
    layouts.py       every layout of a recipe on N GPUs that fits, fastest first
    measure.py       what the real model saves for backward (the tests' check on activations.py)
    plot.py          the memory breakdown as a PNG

Weights, gradients and optimizer states are exact for every layer type a model recipe can choose
(model_states.py counts the modules megatron builds). Activations are derived for LLaMA's serial
layer; the seed systems' other layers (PaLM's parallel layers, LayerNorm, GELU MLPs, learned
positions, relative bias) are planned with LLaMA's count, an approximation.
"""
