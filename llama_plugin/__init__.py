"""LLaMA on megatron-core: the layer spec, model building, CPU compatibility, HF interop, generation.

Modules (one concept each):
  layers/        the LLaMA layer/block ModuleSpec (model.transformer_impl: local | te), the SDPA
                 attention core (sliding window, T5 relative bias), RMSNorm / LayerNorm under sequence
                 parallelism, and the seed systems' pieces (PaLM parallel layers, multi-query under
                 TP, z-loss)
  model.py       TransformerConfig from a model recipe, GPTModel, shape checks
  optim/         PaLM's Adafactor and staged batch sizes
  cpu_compat.py  megatron-core's CUDA assumptions answered on CPU (inactive with CUDA)
  distributed.py process groups, parallel_state, seeds; local multi-process worlds
  train_step.py  megatron DDP + optimizer + forward/backward schedules for one step
  checkpoint.py  atomic distributed checkpoints with the model recipe beside them
  stability/     what keeps long runs alive: verified checkpoints (manifest.py)
  throughput.py  tokens/s, TFLOP/s, MFU (dense bf16 peaks by exact GPU name)
  hf.py          Hugging Face folders and the name/layout map
  convert.py     python -m llama_plugin.convert (hf-to-mcore, mcore-to-hf)
  generate.py    python -m llama_plugin.generate
  describe.py    python -m llama_plugin.describe (exact parameter count, FLOPs per token)
  flops.py       FLOPs per token (PaLM's formula), for MFU
  finetune/      DeepSpeed fine-tuning of HF-format LLaMA: Alpaca, chat, LoRA, ZeRO 1/2/3 (its README.md)
"""

import warnings

# Notices megatron-core and torch print on every CPU start: expected here, noise for users.
for _message in (
    ".*Apex is not installed.*",
    ".*Transformer Engine and Apex are not installed.*",
    ".*full scope is deprecated.*",
    ".*deprecating ShardedTensor.*",
    ".*`load_state_dict` is deprecated.*",
    ".*`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor|_all_gather_base|_reduce_scatter_base)` is deprecated.*",
):
    warnings.filterwarnings("ignore", message=_message)
