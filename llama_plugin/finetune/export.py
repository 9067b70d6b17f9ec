"""The final export: a plain HF folder (or a peft adapter folder), written atomically.

Under ZeRO-3 every rank holds a slice of each parameter; they are gathered one parameter at a time
(so rank 0 never needs more than the model plus one full tensor) and copied to CPU on rank 0.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def gathered_parameters(engine, trainable_only: bool) -> dict:
    """{name: full CPU tensor} on rank 0 ({} elsewhere); a collective: call on every rank."""
    import deepspeed

    rank = dist.get_rank()
    zero3 = engine.zero_optimization_stage() == 3
    out = {}
    for name, p in engine.module.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        if zero3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out[name] = p.detach().to("cpu", copy=True)
        elif rank == 0:
            out[name] = p.detach().to("cpu", copy=True)
    return out


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completed `tmp` into place at `final`, replacing an older one."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def export_hf(engine, cfg, dtype: torch.dtype) -> Path | None:
    """Write cfg.export_dir from the trained engine; returns it on rank 0, None elsewhere."""
    from llama_plugin.finetune.lora import rebuild_with_adapters
    from llama_plugin.finetune.sft_data import load_tokenizer

    lora = cfg.lora.enabled
    state = gathered_parameters(engine, trainable_only=lora)
    final = Path(cfg.export_dir)
    if dist.get_rank() == 0:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if lora:
            model = rebuild_with_adapters(cfg.base_model, cfg.lora, state, dtype)
            if cfg.lora.export == "merged":
                model.merge_and_unload().save_pretrained(tmp)
            else:
                model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        else:
            module = engine.module
            module.save_pretrained(tmp, state_dict={k: v.to(dtype) for k, v in state.items()})
        # the training tokenizer beside the weights: HF's files (tokenizer.json, tokenizer_config.json)
        # and the SentencePiece model itself
        load_tokenizer(cfg.data.tokenizer_model).save_pretrained(tmp)
        shutil.copyfile(cfg.data.tokenizer_model, tmp / "tokenizer.model")
        replace_dir(tmp, final)
    dist.barrier()
    return final if dist.get_rank() == 0 else None
