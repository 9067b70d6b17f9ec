"""Fine-tuning an HF-format LLaMA with DeepSpeed: Alpaca SFT, Vicuna-style chat, mixtures, LoRA, ZeRO 1/2/3 + offload.

    torchrun --nproc_per_node N -m llama_plugin.finetune <recipe> [hydra overrides]
    deepspeed --num_gpus N --module llama_plugin.finetune <recipe> [overrides]
    python -m llama_plugin.finetune.memory <recipe>        (per-GPU memory estimate, with the formula)

Recipes: alpaca_7b, lora_7b, chat_7b, vicuna_7b, koala_7b, oasst_7b, llama_i_7b and the CPU variants
tiny_alpaca_cpu, tiny_lora_cpu, tiny_chat_cpu, tiny_mixture_cpu (recipes/finetune_schema.py holds
every field). The DeepSpeed config is generated
from the recipe. The run directory (train.run_dir) gets config.yaml (with the DeepSpeed config),
metrics.jsonl, checkpoints/step_*/ (DeepSpeed checkpoints; a rerun resumes from the newest
complete one, exactly) and at the end export_dir: an HF folder transformers loads (LoRA merged),
or a peft adapter folder (lora.export=adapter).

Modules (one concept each):
  sft_formats.py    record formats (alpaca, messages, sharegpt, oasst trees) and the Vicuna v1.1 template
  sft_data.py       files and mixtures -> ids and labels (loss on responses only), JSON(L) errors
  schedule.py       steps, data order (mixtures: BatchPlan) and lr as functions of the step
  ds_config.py      the DeepSpeed config dict from the recipe
  lora.py           peft LoRA wrapping and rebuilding for export
  ds_checkpoint.py  atomic DeepSpeed checkpoints, resume
  export.py         gathering (ZeRO-3) and writing the final HF / adapter folder
  trainer.py        the loop
  memory.py         the per-GPU memory estimate
"""
