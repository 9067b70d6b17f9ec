"""Schemas of the fine-tuning recipes (python -m llama_plugin.finetune): every field, type, default.

Defaults follow Stanford Alpaca's recipe (../shared/LLAMA_FACTS.md, "Fine-tuning"): lr 2e-5,
weight decay 0, cosine schedule with 3% warm-up, 3 epochs, 512 tokens, global batch 128, bf16.
`check_finetune` adds the cross-field rules (batch divisibility, offload only where ZeRO has it).
"""

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from recipes.schema import ClusterConfig, ModelConfig


@dataclass
class SftSourceConfig:
    """One file of a data mixture; give `weight` (a share of every global batch) or `samples`
    (records per epoch: fewer than the file has draws a different subset each epoch, more repeats it)."""

    name: str = MISSING
    format: str = "alpaca"  # as data.format
    train_file: str = MISSING
    weight: Optional[float] = None
    samples: Optional[int] = None


@dataclass
class SftDataConfig:
    name: str = MISSING
    # alpaca (instruction / input / output) | messages ({"messages": [{"role", "content"}]}) |
    # sharegpt ({"conversations": [{"from": "human"|"gpt", "value"}]}) | oasst (OpenAssistant trees, one per line)
    format: Optional[str] = None
    train_file: Optional[str] = None  # a JSON array of records, or JSONL (one record per line)
    # several files instead of train_file, each with its format and its share of every batch (Koala)
    mixture: List[SftSourceConfig] = field(default_factory=list)
    tokenizer_model: str = MISSING  # SentencePiece tokenizer.model, read by HF LlamaTokenizer
    max_length: int = 512  # tokens per sample, BOS and EOS included; longer samples are cut at the end
    shuffle: bool = True  # a new permutation of the records each epoch (seeded by train.seed + epoch)
    # conversations (messages, sharegpt, oasst): FastChat's template; Alpaca records keep Alpaca's own
    template: str = "vicuna_v1.1"
    system_prompt: Optional[str] = None  # null: the template's own system message
    oasst_languages: List[str] = field(default_factory=lambda: ["en"])  # the tree prompt's `lang`
    oasst_top_k: Optional[int] = None  # keep only assistant replies ranked < k (null: all)


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO: what is sharded over data-parallel ranks, and what lives in CPU memory."""

    stage: int = 2  # 0 (plain data parallel) | 1 (optimizer state) | 2 (+ gradients) | 3 (+ parameters)
    offload_optimizer: bool = False  # fp32 master weights and Adam moments in CPU memory (stage >= 1)
    offload_param: bool = False  # parameters in CPU memory between uses (stage 3 only)
    overlap_comm: bool = False
    reduce_bucket_size: int = 500_000_000  # elements
    allgather_bucket_size: int = 500_000_000  # elements (stages 1 and 2)
    # Stage 3 keeps parameters smaller than this (elements) whole on every rank; 0 shards all of them.
    param_persistence_threshold: int = 100_000


@dataclass
class LoraConfig:
    """peft LoRA: W x + (alpha / r) * B A x on the listed projections; the base weights are frozen."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    export: str = "merged"  # merged (a plain HF folder, B A folded into W) | adapter (peft adapter folder)


@dataclass
class FinetuneOptimizerConfig:
    """AdamW with linear warm-up then cosine (or linear) decay to 0, as Alpaca's HF Trainer run."""

    lr: float = 2.0e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1.0e-8
    warmup_ratio: float = 0.03  # warm-up steps = ceil(ratio * total steps)
    warmup_steps: Optional[int] = None  # a fixed number of warm-up steps instead of the ratio (as HF's)
    schedule: str = "cosine"  # cosine | linear | constant
    clip_grad: float = 1.0  # global gradient norm; 0 disables clipping
    # torch: torch.optim.AdamW inside DeepSpeed (no compiled op; also with CPU offload).
    # deepspeed: DeepSpeed's own Adam (FusedAdam on GPU, DeepSpeedCPUAdam with optimizer offload).
    impl: str = "torch"


@dataclass
class FinetuneTrainConfig:
    epochs: int = 3
    max_steps: Optional[int] = None  # stop after this many optimizer steps (None: all epochs)
    global_batch_size: int = 128  # sequences per optimizer step
    micro_batch_size: int = 4  # sequences per forward/backward on one process
    precision: str = "bf16"  # bf16 | fp32
    seed: int = 42
    save_interval: int = 500  # optimizer steps between DeepSpeed checkpoints (and at the end)
    keep_checkpoints: int = 2
    log_interval: int = 1
    exit_at_step: Optional[int] = None  # checkpoint and stop after this step (staged runs)
    run_dir: str = "runs/${name}"
    gradient_checkpointing: bool = False


@dataclass
class FinetuneConfig:
    name: str = MISSING
    # The shapes of the base model (for the memory estimate; checked against base_model/config.json).
    model: ModelConfig = field(default_factory=ModelConfig)
    base_model: str = MISSING  # an HF LlamaForCausalLM folder (config.json + safetensors)
    data: SftDataConfig = field(default_factory=SftDataConfig)
    optimizer: FinetuneOptimizerConfig = field(default_factory=FinetuneOptimizerConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    export_dir: str = "${train.run_dir}/hf_export"  # the final HF folder
    # Where slurm.launch sends it; a direct torchrun ignores it. Default: this machine.
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig(name="local", nodes=1, gpus_per_node=2))


FORMATS = ("alpaca", "messages", "sharegpt", "oasst")
_CHOICES = {
    "data.template": ("vicuna_v1.1",),
    "zero.stage": (0, 1, 2, 3),
    "lora.export": ("merged", "adapter"),
    "optimizer.schedule": ("cosine", "linear", "constant"),
    "optimizer.impl": ("torch", "deepspeed"),
    "train.precision": ("bf16", "fp32"),
}
_POSITIVE = ("data.max_length", "lora.r", "lora.alpha", "train.epochs", "train.global_batch_size",
             "train.micro_batch_size", "train.save_interval", "train.keep_checkpoints", "train.log_interval",
             "optimizer.lr", "zero.reduce_bucket_size", "zero.allgather_bucket_size")


def check_finetune(cfg, world_size: int) -> None:
    """Cross-field rules of a validated FinetuneConfig; raises RecipeError naming the field."""
    from omegaconf import OmegaConf

    from recipes import RecipeError

    for key, allowed in _CHOICES.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise RecipeError(f"{key}: {OmegaConf.select(cfg, key)!r} is not one of {', '.join(map(str, allowed))}")
    for key in _POSITIVE:
        if not OmegaConf.select(cfg, key) > 0:
            raise RecipeError(f"{key}: must be > 0 (got {OmegaConf.select(cfg, key)})")
    for key in ("optimizer.weight_decay", "optimizer.clip_grad", "optimizer.eps"):
        if OmegaConf.select(cfg, key) < 0:
            raise RecipeError(f"{key}: must be >= 0 (got {OmegaConf.select(cfg, key)})")
    for key in ("optimizer.warmup_ratio", "lora.dropout", "optimizer.beta1", "optimizer.beta2"):
        if not 0 <= OmegaConf.select(cfg, key) < 1:
            raise RecipeError(f"{key}: must be in [0, 1) (got {OmegaConf.select(cfg, key)})")
    for key in ("train.max_steps", "train.exit_at_step", "optimizer.warmup_steps"):
        if OmegaConf.select(cfg, key) is not None and OmegaConf.select(cfg, key) < 1:
            raise RecipeError(f"{key}: must be >= 1 or null (got {OmegaConf.select(cfg, key)})")
    check_data(cfg.data)
    z, t = cfg.zero, cfg.train
    if z.offload_param and z.stage != 3:
        raise RecipeError(f"zero.offload_param: parameter offload needs zero.stage=3 (got stage {z.stage})")
    if z.offload_optimizer and z.stage == 0:
        raise RecipeError("zero.offload_optimizer: optimizer offload needs zero.stage >= 1")
    if cfg.lora.enabled and not cfg.lora.target_modules:
        raise RecipeError("lora.target_modules: empty; LoRA needs at least one projection")
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise RecipeError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by train.micro_batch_size x world size "
            f"= {t.micro_batch_size} x {world_size} = {per_step}")


def check_data(data) -> None:
    """One training file or a mixture, never both; a mixture's entries all by weight or all by count."""
    from recipes import RecipeError

    if data.mixture:
        for key in ("train_file", "format"):
            if data[key] is not None:
                raise RecipeError(f"data.{key}: set together with data.mixture (whose entries name their own)")
    else:
        for key in ("train_file", "format"):
            if data[key] is None:
                raise RecipeError(f"data.{key}: missing (or give data.mixture)")
        if data.format not in FORMATS:
            raise RecipeError(f"data.format: {data.format!r} is not one of {', '.join(FORMATS)}")
    if data.oasst_top_k is not None and data.oasst_top_k < 1:
        raise RecipeError(f"data.oasst_top_k: must be >= 1 or null (got {data.oasst_top_k})")
    names = set()
    for i, m in enumerate(data.mixture):
        at = f"data.mixture[{i}]"
        if m.format not in FORMATS:
            raise RecipeError(f"{at}.format: {m.format!r} is not one of {', '.join(FORMATS)}")
        if (m.weight is None) == (m.samples is None):
            raise RecipeError(f"{at}: give exactly one of weight and samples")
        if (m.weight is None) != (data.mixture[0].weight is None):
            raise RecipeError(f"{at}: mixes weight and samples; give every entry the same kind")
        if (m.weight if m.weight is not None else m.samples) <= 0:
            raise RecipeError(f"{at}.{'weight' if m.weight is not None else 'samples'}: must be > 0")
        if m.name in names:
            raise RecipeError(f"{at}.name: {m.name!r} appears twice")
        names.add(m.name)


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    # Fine-tuning recipes list `finetune_schema` first in their defaults (as recipe_schema for training).
    ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)


_register()
