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
    # Sliding-window attention (the Mistral-7B shape): each token sees itself and the window - 1
    # tokens before it. None: full causal attention. A window >= seq_length changes nothing (warned).
    sliding_window: Optional[int] = None
    # With a window: every n-th layer (n, 2n, ...) attends to the whole context instead, as GPT-3
    # alternates dense and locally banded layers (n = 2). None: every layer is windowed (Mistral).
    full_attention_every: Optional[int] = None
    init_method_std: float = 0.02
    # normal: N(0, init_method_std), megatron's output-layer scaling by 1/sqrt(2 layers). palm: kernels
    # N(0, std 1/sqrt(fan-in)), embeddings N(0, 1) (PaLM, section 2).
    init: str = "normal"
    # The layer choices the seed systems differ in (LLAMA_FACTS.md, "Other seed systems"); the
    # defaults are LLaMA's. norm: RMSNorm | LayerNorm. activation: swiglu | geglu (LaMDA's gated
    # GELU) | gelu (GPT-3's; GELU is the tanh approximation, as GPT-2/3 and T5 have it).
    # position_embedding: rope | learned_absolute (GPT-3) | relative (T5's bias, LaMDA). bias: biases in every linear and
    # LayerNorm (GPT-3). head_dim: None means hidden_size / heads (LaMDA: 128 with d 8192 and 128
    # heads). parallel_layers: PaLM's y = x + attn(norm(x)) + mlp(norm(x)).
    normalization: str = "RMSNorm"
    activation: str = "swiglu"
    # fused: megatron's one q/k/v projection, key/value heads split over TP ranks. shared (PaLM,
    # num_query_groups 1): a query projection split over TP ranks and the one key/value head's
    # projection on every rank (llama_plugin/layers/multi_query.py), for any TP size.
    kv_projection: str = "fused"
    position_embedding: str = "rope"
    bias: bool = False
    head_dim: Optional[int] = None
    parallel_layers: bool = False
    relative_attention_num_buckets: int = 32  # T5's, for position_embedding=relative
    relative_attention_max_distance: int = 128
    # PaLM's auxiliary loss z_loss * log(Z)^2 per token (PaLM: 1e-4); 0 is off. Part of the
    # training loss (and of the logged loss).
    z_loss: float = 0.0
    # LLaMA keeps the input embedding and output projection separate.
    share_embeddings_and_output_weights: bool = False
    # Modules of the layer (llama_plugin/layers/spec.py): local (megatron-core linears, SDPA
    # attention; the tested default on CPU and GPU) | te (TransformerEngine; must import).
    transformer_impl: str = "local"


@dataclass
class OptimizerConfig:
    """LLaMA's AdamW and schedule (paper section 2.3); PaLM's Adafactor as an alternative."""

    name: str = "adamw"  # adamw | adafactor (PaLM's: llama_plugin/optim/adafactor.py)
    lr: float = MISSING  # peak learning rate, set per size
    min_lr_ratio: float = 0.1  # final lr = 10% of peak
    warmup_steps: int = 2000
    # linear: from 0 to the peak over warmup_steps; constant: the peak from step 1 (PaLM: 1e-2 for
    # 10k steps, then the inverse square root decay).
    warmup_style: str = "linear"
    decay_style: str = "cosine"  # cosine | linear | constant | inverse-square-root (PaLM)
    decay_steps: Optional[int] = None  # None: decay until train.steps
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5  # the paper gives none; LLaMA-2 states 1e-5
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    # Adafactor only (PaLM): second-moment decay beta2 = 1 - k^beta2_decay, update clipping, lr
    # scaled by the parameter's RMS, weight decay lr^weight_decay_lr_power (null: weight_decay x lr).
    # beta1 is the momentum; eps, beta2 are Adam's only.
    beta2_decay: float = -0.8
    clip_threshold: float = 1.0
    scale_parameter: bool = True
    weight_decay_lr_power: Optional[float] = None


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
    # Uneven pipeline stages (megatron's num_layers_in_first/last_pipeline_stage): the first / last
    # stage holds this many layers, the stages between share the rest evenly (PaLM 540B's 118
    # layers on 8 stages: 14 + 6 x 15 + 14). None: num_layers / pipeline on every stage.
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
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
    # Dense bf16 FLOP/s per GPU for MFU. Always used when set; else llama_plugin/throughput.py's
    # table by exact device name (an unknown GPU: a warning and no MFU). Written to the run config.
    peak_flops_per_gpu: Optional[float] = None
    # For the planner (python -m llama_plugin.plan) and slurm.launch's fit check; None on CPU nodes.
    gpu_memory_gb: Optional[float] = None  # GiB per GPU (an A100-80GB: 80)
    gpu_power_w: Optional[float] = None  # what the carbon estimate charges per GPU (A100: 400 W)
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
class BatchStage:
    global_batch_size: int = MISSING
    until_step: int = MISSING  # this batch size for data batches before this one


@dataclass
class TrainConfig:
    steps: int = MISSING  # optimizer steps
    global_batch_size: int = MISSING  # sequences per step (after any ramp)
    # Smaller global batches first (PaLM: 512 until step 50k, 1024 until 115k, then 2048): stages in
    # order, each used until its until_step (llama_plugin/optim/batch_ramp.py).
    batch_ramp: List[BatchStage] = field(default_factory=list)
    micro_batch_size: int = 1
    precision: str = "bf16"  # bf16 | fp32
    seed: int = 1234
    eval_interval: int = 1000
    eval_batches: int = 10
    # Benchmarks scored during training (llama_plugin/eval: piqa, boolq, hellaswag, ...), logged as
    # eval/<task>/<metric> every eval_tasks_interval steps (null: eval_interval) and at the end, on
    # the first eval_tasks_limit items of each (null: all), the requests shared over data-parallel ranks.
    eval_tasks: List[str] = field(default_factory=list)
    eval_tasks_interval: Optional[int] = None
    eval_tasks_limit: Optional[int] = None
    eval_tasks_max_new_tokens: int = 32  # nq / triviaqa in the loop: greedy answer budget
    save_interval: int = 1000
    keep_checkpoints: int = 2
    run_dir: str = "runs/${name}"
    load: Optional[str] = None  # initial weights (e.g. an imported HF checkpoint) if run_dir has none
    exit_at_step: Optional[int] = None  # checkpoint and stop after this step (for staged runs)
    # Checkpoint and stop (not finished) at every multiple of this step: one slice of a long run per
    # job; the scheduler requeues or chains the next (slurm/).
    exit_interval: Optional[int] = None


@dataclass
class StabilityConfig:
    """What keeps a long run alive by itself (llama_plugin/stability/). Defaults follow PaLM's
    loss-spike protocol (restart ~100 steps before the spike, skip ~200-500 batches)."""

    # A spike: a finite loss above the running mean of the last `spike_window` losses by more than
    # `spike_std_factor` running standard deviations, or above `spike_ratio` times that mean
    # (either may be null); looked for from step `spike_warmup_steps` on.
    spike_detection: bool = True
    spike_window: int = 100
    spike_warmup_steps: int = 2000
    spike_std_factor: Optional[float] = 6.0
    spike_ratio: Optional[float] = 1.5
    # On a spike (or after max_consecutive_skips non-finite steps in a row) at step S: reload the
    # newest verified checkpoint at or before S - rollback_steps, replay the data up to step
    # S - rollback_steps, and from there skip the batches through the spike's plus skip_batches
    # more (PaLM: restart ~100 steps before the spike, skip ~200-500 batches). The skips go to
    # <run_dir>/skipped_batches.json, which every resume honours.
    rollback_steps: int = 100
    skip_batches: int = 200
    # Rollbacks in a row that do not get the run past the step that caused the first of them: the
    # next one is not taken. Non-finite steps then end the run for a requeue without the node of
    # the ranks that produced them (exit 75, requeue.json), or with an error if every rank did; a
    # spike is accepted as the new loss level (the spike window starts afresh).
    max_rollbacks: int = 2
    # Spare global batches the data set is built with, for skips; None: 5% of train.steps. Part of
    # the data order, so fixed for a run.
    data_reserve_batches: Optional[int] = None
    max_consecutive_skips: int = 5
    # Every this many steps recompute one micro-batch's forward and backward and compare bitwise
    # (silent data corruption); 0 turns it off.
    sdc_check_interval: int = 1000
    # No step finished for this long: dump every thread's stack into the run directory and exit
    # for a requeue; 0 turns it off. Checkpoint saves and evaluation count as progress.
    hang_timeout_s: float = 1800.0
    # A rank whose step time is above this many times the median of the ranks is a straggler.
    straggler_factor: float = 1.5


@dataclass
class FaultsConfig:
    """Faults injected on purpose, to prove the stability machinery (tests; off by default,
    refused on clusters of 256 GPUs or more). Steps are 1-based; the one-off faults (NaN, spike,
    hang) fire once per run."""

    loss_spike_at_step: Optional[int] = None  # the step's loss, as the run sees it, times loss_spike_factor
    loss_spike_factor: float = 10.0
    loss_spike_steps: int = 1  # in this many steps run from then on (replays count; more than the run: a lasting rise)
    nan_grad_at_step: Optional[int] = None  # a NaN in one gradient element of nan_grad_rank,
    nan_grad_steps: int = 1  # in this many steps run from then on (replays count; more than the run: for good)
    nan_grad_rank: int = 0
    bitflip_from_step: Optional[int] = None  # from this step on, every other output of one linear
    bitflip_rank: int = 0  # layer on this rank has a bit flipped (an intermittently faulty GPU)
    bitflip_node: Optional[str] = None  # only on this node (Slurm's name for it); None: any
    hang_at_step: Optional[int] = None  # hang_rank stops making progress at the start of this step
    hang_rank: int = 0
    straggler_rank: Optional[int] = None  # computes straggler_sleep_s slower in every step
    straggler_sleep_s: float = 0.5
    kill_at_step: Optional[int] = None  # kill_rank is killed (SIGKILL) at the start of this step, once
    kill_rank: int = 0


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
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)


@dataclass
class DescribeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)


# --- data_prep clean (data_prep/clean.py): one source's raw files -> cleaned JSONL ---


@dataclass
class StackExchangeCleanConfig:
    sites: int = 28  # the largest sites of the dump, by Posts.xml size (LLaMA: 28)
    piece_bytes: int = 256 << 20  # split stage: a task's unit, a byte range of one site's Posts.xml
    bucket_bytes: int = 128 << 20  # assemble stage: posts grouped per bucket (its memory), <= 512 per site


@dataclass
class GithubCleanConfig:
    licenses: List[str] = field(default_factory=lambda: ["apache-2.0", "bsd", "mit"])
    # RedPajama's GitHub filters (LLaMA states only "line length or proportion of alphanumeric").
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alphanumeric_share: float = 0.25
    max_file_bytes: int = 1_000_000
    extensions: List[str] = field(default_factory=lambda: [
        ".py", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".java", ".js", ".ts", ".go", ".rs", ".rb",
        ".php", ".cs", ".scala", ".swift", ".kt", ".m", ".sh", ".lua", ".pl", ".r", ".jl", ".hs", ".ml", ".sql",
        ".tex", ".md", ".f90", ".dart", ".el", ".clj", ".erl", ".ex", ".vim", ".ps1", ".bat", ".cmake", ".proto",
        ".pyx"])


@dataclass
class WikipediaCleanConfig:
    languages: List[str] = field(default_factory=lambda: [
        "bg", "ca", "cs", "da", "de", "en", "es", "fr", "hr", "hu", "it", "nl", "pl", "pt", "ro", "ru", "sl", "sr",
        "sv", "uk"])


@dataclass
class BooksCleanConfig:
    max_overlap: float = 0.9  # LLaMA: books with more than 90% content overlap are removed
    shingle_words: int = 5
    num_perm: int = 128  # MinHash permutations (candidates only; overlaps are then computed exactly)


@dataclass
class C4CleanConfig:
    # As the code that made C4 (TFDS c4_utils.py; the T5 paper's prose swaps 3 and 5): lines of
    # >= 5 words, pages of >= 3 sentences, no word over 1,000 characters.
    min_words_per_line: int = 5
    min_sentences: int = 3
    max_word_length: int = 1000
    bad_words_file: Optional[str] = None  # one word per line (C4 used the LDNOOBW English list)
    languages: List[str] = field(default_factory=lambda: ["en"])
    min_language_score: float = 0.5


@dataclass
class CommonCrawlCleanConfig:
    languages: List[str] = field(default_factory=lambda: ["en"])  # LLaMA kept English
    min_language_score: float = 0.5  # CCNet's threshold
    min_doc_chars: int = 300  # CCNet: pages shorter than this after line dedup are dropped
    # The "referenced by Wikipedia" classifier: a trained fastText model, or JSONL samples to
    # train one from (pages Wikipedia cites / random pages). Neither: the step is left out.
    reference_classifier: Optional[str] = None
    reference_positives: Optional[str] = None
    reference_negatives: Optional[str] = None
    min_reference_score: float = 0.5
    # CCNet's n-gram LM filter (data_prep/sources/perplexity.py): a KenLM model (.arpa or binary)
    # and the SentencePiece model its training text was split with (CCNet ships both per
    # language). Pages are bucketed at the two perplexity cutoffs (CCNet: the language's 33rd and
    # 66th percentiles; `python -m data_prep perplexity-cutoffs` measures them on a sample) into
    # head / middle / tail, and keep_buckets are kept. No model: the step is left out.
    kenlm_model: Optional[str] = None
    kenlm_tokenizer: Optional[str] = None
    perplexity_cutoffs: List[float] = field(default_factory=list)
    keep_buckets: List[str] = field(default_factory=lambda: ["head", "middle"])


@dataclass
class CleanConfig:
    source: str = MISSING  # stackexchange | github | wikipedia | books | arxiv | c4 | commoncrawl
    input: str = MISSING  # the source's raw files (see data_prep/README.md for each layout)
    output: str = MISSING  # cleaned JSONL shards: <output>/<task>.jsonl
    tasks: int = 1  # datatrove tasks (input shards)
    workers: int = 1  # tasks run at once (local executor)
    executor: str = "local"  # local | slurm
    logging_dir: Optional[str] = None  # datatrove's logs, completions, stats; None: <output>/.logs
    slurm_partition: Optional[str] = None  # executor=slurm: one array job, a task per array element
    slurm_time: str = "24:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: int = 2
    slurm_venv: Optional[str] = None  # activated in the jobs; None: the venv this command runs in
    slurm_wait: bool = False  # wait for the job and write the report (else: submit and return)
    # A rerun into an existing output must be the same run (source, input, tasks, the source's
    # rules; <output>/clean_config.json): else refused. true: delete the output and start again.
    overwrite: bool = False
    stackexchange: StackExchangeCleanConfig = field(default_factory=StackExchangeCleanConfig)
    github: GithubCleanConfig = field(default_factory=GithubCleanConfig)
    wikipedia: WikipediaCleanConfig = field(default_factory=WikipediaCleanConfig)
    books: BooksCleanConfig = field(default_factory=BooksCleanConfig)
    c4: C4CleanConfig = field(default_factory=C4CleanConfig)
    commoncrawl: CommonCrawlCleanConfig = field(default_factory=CommonCrawlCleanConfig)
    language_id_model: Optional[str] = None  # fastText lid.176.bin/.ftz (c4, commoncrawl)


@dataclass
class PipelineSourceConfig:
    input: Optional[str] = None  # the source's raw folder (layouts: data_prep/README.md); None: left out
    tasks: int = 1  # datatrove tasks of its clean stage
    clean_overrides: List[str] = field(default_factory=list)  # e.g. ["c4.bad_words_file=/x/en.txt"]


@dataclass
class PipelineTokenizerConfig:
    model: Optional[str] = None  # an existing tokenizer.model to use; None: train one on the cleaned text
    vocab_size: int = 32000  # LLaMA's
    character_coverage: float = 0.99995
    max_sentences: int = 0  # documents sampled for training it; 0: all


@dataclass
class DataPipelineConfig:
    """python -m data_prep pipeline: raw source folders -> cleaned JSONL -> tokenizer -> one indexed
    dataset per source -> mixture report and the data recipe training reads."""

    output: str = MISSING  # everything goes here; LLAMA_DATA=<output> makes recipes/data/llama_mixture read it
    sources: Dict[str, PipelineSourceConfig] = field(default_factory=lambda: {
        s: PipelineSourceConfig() for s in ("commoncrawl", "c4", "github", "wikipedia", "books", "arxiv",
                                            "stackexchange")})
    language_id_model: Optional[str] = None  # fastText lid.176.bin/.ftz (c4, commoncrawl)
    tokenizer: PipelineTokenizerConfig = field(default_factory=PipelineTokenizerConfig)
    mixture: str = "llama_mixture"  # recipes/data/<mixture>.yaml: each source's weight and reference epochs
    tokens: float = 1.4e12  # the budget of the epochs column (LLaMA 65B: 1.4T)
    workers: int = 1  # processes for cleaning and tokenizing
    executor: str = "local"  # local | slurm (the clean stages as datatrove Slurm jobs, waited for)
    slurm_partition: Optional[str] = None
