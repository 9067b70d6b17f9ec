"""Schemas of the recipe tree: every field a recipe may set, its type and its default.

A composed recipe is merged into these dataclasses, so an unknown key (also one added with
`+key=`), a wrong type or a missing value fails before any work starts, naming the field.
Defaults are LLaMA's (../shared/LLAMA_FACTS.md); a preset file sets only what differs.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    # Key/value head groups for grouped-query attention; None means one per head (LLaMA-1).
    num_query_groups: Optional[int] = None
    # SwiGLU hidden size; None means LLaMA's rule: 2/3 * 4 * hidden_size rounded up to a multiple.
    ffn_hidden_size: Optional[int] = None
    ffn_multiple_of: int = 256
    vocab_size: int = 32000
    seq_length: int = 2048
    norm_epsilon: float = 1e-6
    rotary_base: float = 10000.0
    init_method_std: float = 0.02
    # LLaMA keeps the input embedding and output projection separate.
    share_embeddings_and_output_weights: bool = False


@dataclass
class OptimizerConfig:
    """LLaMA's AdamW and schedule (paper section 2.3)."""

    lr: float = MISSING  # peak learning rate, set per size
    min_lr_ratio: float = 0.1  # final lr = 10% of peak
    warmup_steps: int = 2000
    decay_style: str = "cosine"  # cosine | linear | constant | inverse-square-root (PaLM)
    decay_steps: Optional[int] = None  # None: decay until train.steps
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5  # the paper gives none; LLaMA-2 states 1e-5
    weight_decay: float = 0.1
    clip_grad: float = 1.0


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    data: Optional[int] = None  # None: world size / (tensor * pipeline)
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False  # needs distributed_optimizer
    tp_comm_overlap: bool = False  # needs TransformerEngine, tensor > 1, sequence_parallel
    recompute: str = "none"  # none | selective (attention core, the paper's choice) | full
    bucket_size: Optional[int] = None  # DDP bucket size in parameters; None: megatron's default


@dataclass
class DataSource:
    prefix: str = MISSING  # indexed dataset path prefix (<prefix>.bin / <prefix>.idx)
    weight: float = 1.0  # sampling share in the blend
    # Epochs over this source in the reference run (LLaMA table 1); data_prep's mix report warns when
    # a token budget would repeat the source more. Planning only: training ignores it.
    epochs: Optional[float] = None


@dataclass
class DataConfig:
    name: str = MISSING
    tokenizer_model: str = MISSING
    sources: Dict[str, DataSource] = field(default_factory=dict)
    split: str = "98,2,0"  # train, validation, test shares of each source's documents
    cache_dir: Optional[str] = None  # megatron's sample-index cache; None: <run_dir>/data_cache


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "llama"
    wandb_entity: Optional[str] = None
    log_interval: int = 1
    progress_bar: bool = True


@dataclass
class ClusterConfig:
    """Where the run goes: the machine shape for the layout checks and what slurm/ renders."""

    name: str = MISSING
    nodes: int = 1
    gpus_per_node: int = 8  # processes per node (CPU processes on `local`)
    # Dense bf16 FLOP/s for MFU of a GPU missing from llama_plugin/throughput.py's table (A100,
    # H100, H200 are detected); the figure used and its source are written to the run config.
    peak_flops_per_gpu: Optional[float] = None
    # --- Slurm (slurm/launch.py); the rest is ignored by a direct torchrun ---
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_limit: str = "1:00:00"  # the partition's limit, [D-]HH:MM:SS; longer runs requeue or chain
    cpus_per_node: int = 2  # for the one task (torchrun) per node
    gres: Optional[str] = None  # e.g. "gpu": asks --gres=gpu:<gpus_per_node>; None on CPU nodes
    mem: Optional[str] = None  # --mem per node, e.g. "0" (all of it)
    exclusive: bool = False
    job_name: str = "${name}"
    workdir: Optional[str] = None  # where jobs run (relative paths resolve here); None: the launch dir
    venv: Optional[str] = None  # virtualenv activated in the job
    modules: List[str] = field(default_factory=list)  # `module load` each, before the venv
    container_image: Optional[str] = None  # pyxis/enroot image for srun (--container-image)
    container_mounts: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)  # exported in the job (NCCL/network settings)
    srun_args: List[str] = field(default_factory=list)  # extra srun options, one per item
    rdzv_port: int = 29500  # c10d rendezvous port on the first node
    signal_lead_s: int = 300  # USR1 this long before the time limit: checkpoint, then requeue/chain
    max_restarts: int = 3  # requeues of one job (preemption or time limit) before it gives up
    chain_jobs: int = 1  # >1: a chain of up to this many jobs, each depending (afterany) on the last
    max_failures: int = 2  # chain: stop when this many jobs of the chain ended with training failing


@dataclass
class TrainConfig:
    steps: int = MISSING  # optimizer steps
    global_batch_size: int = MISSING  # sequences per step
    micro_batch_size: int = 1
    precision: str = "bf16"  # bf16 | fp32
    seed: int = 1234
    eval_interval: int = 1000
    eval_batches: int = 10
    save_interval: int = 1000
    keep_checkpoints: int = 2
    run_dir: str = "runs/${name}"
    load: Optional[str] = None  # initial weights (e.g. an imported HF checkpoint) if run_dir has none
    exit_at_step: Optional[int] = None  # checkpoint and stop after this step (for staged runs)
    # Checkpoint and stop (not finished) at every multiple of this step: one slice of a long run per
    # job; the scheduler requeues or chains the next (slurm/).
    exit_interval: Optional[int] = None


@dataclass
class RecipeConfig:
    name: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DescribeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
