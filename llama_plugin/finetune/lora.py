"""LoRA through peft: wrapping the base model, and folding trained adapters back into it."""

from __future__ import annotations


def peft_lora_config(lora_cfg):
    from peft import LoraConfig

    return LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=list(lora_cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def apply_lora(model, lora_cfg):
    """peft model with trainable adapters on `lora_cfg.target_modules`; everything else frozen."""
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [m for m in lora_cfg.target_modules if m not in names]
    if absent:
        from recipes import RecipeError

        raise RecipeError(f"lora.target_modules: {', '.join(absent)} not in the model (LLaMA has q_proj, k_proj, "
                          "v_proj, o_proj, gate_proj, up_proj, down_proj)")
    return get_peft_model(model, peft_lora_config(lora_cfg))


def scale(lora_cfg) -> float:
    """peft's LoRA scaling: alpha / r."""
    return lora_cfg.alpha / lora_cfg.r


def rebuild_with_adapters(base_model_dir, lora_cfg, adapter_state: dict, dtype):
    """A CPU peft model: the base weights from their folder plus trained adapter tensors
    (names as in the trained peft model's named_parameters)."""
    import torch
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(base_model_dir), dtype=dtype)
    model = apply_lora(base, lora_cfg)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in adapter_state]
    unknown = [n for n in adapter_state if n not in params]
    if missing or unknown:
        raise RuntimeError(f"adapter tensors do not match the LoRA layout: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in adapter_state.items():
            params[name].copy_(tensor)
    return model
