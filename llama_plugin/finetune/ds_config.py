"""The DeepSpeed config dict, generated from a fine-tuning recipe (never kept by hand).

train_batch_size = micro_batch x gradient_accumulation x world size holds by construction: the
accumulation steps are derived from the recipe's global batch (check_finetune has already refused a
global batch that does not divide).
"""

from __future__ import annotations

import torch


def gradient_accumulation_steps(cfg, world_size: int) -> int:
    t = cfg.train
    return t.global_batch_size // (t.micro_batch_size * world_size)


def deepspeed_config(cfg, world_size: int) -> dict:
    t, o, z = cfg.train, cfg.optimizer, cfg.zero
    pin = torch.cuda.is_available()  # pinned host memory only helps (and only works) with a GPU
    optimizer_params = {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay}
    if o.impl == "torch":
        optimizer_params["torch_adam"] = True  # torch.optim.AdamW: no FusedAdam / cpu_adam build
    zero = {"stage": z.stage, "overlap_comm": z.overlap_comm, "contiguous_gradients": True,
            "reduce_bucket_size": z.reduce_bucket_size}
    if z.stage in (1, 2):
        zero.update(allgather_bucket_size=z.allgather_bucket_size, reduce_scatter=True)
    if z.stage == 3:
        zero.update(stage3_param_persistence_threshold=z.param_persistence_threshold,
                    # the final export gathers the shards itself (export.py)
                    stage3_gather_16bit_weights_on_model_save=False)
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if z.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, world_size),
        "gradient_clipping": o.clip_grad,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # torch.optim.AdamW is not on ZeRO's list of tested optimizers, and with offload DeepSpeed
        # insists on its CPU Adam unless told otherwise.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": o.impl == "deepspeed",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    assert config["train_batch_size"] == (config["train_micro_batch_size_per_gpu"]
                                          * config["gradient_accumulation_steps"] * world_size)
    return config
