"""Recipes: the paper's numbers, overrides that reach the final config, and errors naming the field."""

import math

import pytest
from omegaconf import OmegaConf

from llama_plugin.flops import flops_per_token
from llama_plugin.layout import resolve
from llama_plugin.throughput import speed_metrics
from recipes import RecipeError, compose
from recipes.schema import RecipeConfig

PAPER_RUNS = {  # size: (peak lr, tokens), LLaMA paper table 2 / LLAMA_FACTS.md
    "llama_7b": (3.0e-4, 1.0e12), "llama_13b": (3.0e-4, 1.0e12),
    "llama_33b": (1.5e-4, 1.4e12), "llama_65b": (1.5e-4, 1.4e12),
}


def recipe(name, *overrides):
    return compose(name, list(overrides), RecipeConfig)


@pytest.mark.parametrize("size", PAPER_RUNS)
def test_paper_recipes(size):
    cfg = recipe(f"{size}_pretrain")
    lr, tokens = PAPER_RUNS[size]
    o, t = cfg.optimizer, cfg.train
    assert (o.lr, o.beta1, o.beta2, o.weight_decay, o.clip_grad, o.warmup_steps, o.min_lr_ratio, o.decay_style) == (
        lr, 0.9, 0.95, 0.1, 1.0, 2000, 0.1, "cosine")
    assert o.eps == 1e-5
    assert t.global_batch_size * cfg.model.seq_length == 2048 * 2048  # 4M tokens per step
    assert t.steps == math.ceil(tokens / (2048 * 2048))  # enough steps for the paper's tokens
    assert cfg.cluster.nodes * cfg.cluster.gpus_per_node == 2048
    resolved, notes = resolve(cfg, 2048, have_te=True, have_cuda=True)
    p = resolved.parallel
    assert p.tensor * p.pipeline * p.data == 2048 and p.tensor <= cfg.cluster.gpus_per_node
    assert notes == []


@pytest.mark.parametrize("size,lr", [("7b", 3.0e-4), ("13b", 3.0e-4), ("70b", 1.5e-4)])
def test_llama2_recipes(size, lr):
    """LLaMA-2's table 1: 2.0T tokens, 4M tokens per step at a 4,096 context, peak lr 3e-4 (7B, 13B)
    and 1.5e-4 (70B), AdamW eps 1e-5 and LLaMA's schedule; the layout fits 2,048 GPUs."""
    cfg = recipe(f"llama2_{size}_pretrain")
    o, t = cfg.optimizer, cfg.train
    assert (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.clip_grad, o.warmup_steps, o.min_lr_ratio,
            o.decay_style) == (lr, 0.9, 0.95, 1e-5, 0.1, 1.0, 2000, 0.1, "cosine")
    assert cfg.model.seq_length == 4096 and t.global_batch_size * cfg.model.seq_length == 4 * 2**20
    assert t.steps == math.ceil(2.0e12 / (4 * 2**20))
    assert cfg.model.num_query_groups == (8 if size == "70b" else None)
    resolved, notes = resolve(cfg, 2048, have_te=True, have_cuda=True)
    p = resolved.parallel
    assert p.tensor * p.pipeline * p.data == 2048 and t.global_batch_size % p.data == 0 and notes == []


def test_gpt3_recipe():
    """GPT-3's table 2.1 and appendix B: 300B tokens of 2,048-token sequences in ~3.2M-token batches,
    Adam(0.9, 0.95, 1e-8), lr 0.6e-4, 375M warm-up tokens, cosine to 10% over 260B tokens."""
    cfg = recipe("gpt3_175b_pretrain")
    o, t = cfg.optimizer, cfg.train
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    assert (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.clip_grad, o.min_lr_ratio, o.decay_style) == (
        0.6e-4, 0.9, 0.95, 1e-8, 0.1, 1.0, 0.1, "cosine")
    assert round(tokens_per_step / 1e5) == 31 and cfg.model.seq_length == 2048
    assert (t.steps, o.warmup_steps, o.decay_steps) == tuple(
        math.ceil(n / tokens_per_step) for n in (300e9, 375e6, 260e9))
    resolved, notes = resolve(cfg, 2048, have_te=True, have_cuda=True)
    p = resolved.parallel
    assert p.tensor * p.pipeline * p.data == 2048 and notes == []


def test_llama_mixture_shares():
    cfg = recipe("llama_7b_pretrain")
    shares = {k: v.weight for k, v in cfg.data.sources.items()}
    assert shares == {"commoncrawl": 0.67, "c4": 0.15, "github": 0.045, "wikipedia": 0.045, "books": 0.045,
                      "arxiv": 0.025, "stackexchange": 0.02}
    assert sum(shares.values()) == pytest.approx(1.0)


def test_overrides_reach_the_final_config():
    cfg = recipe("llama_13b_pretrain", "model.num_query_groups=8", "optimizer.lr=2e-4", "optimizer.warmup_steps=500",
                 "parallel.tensor=4", "parallel.recompute=full", "data.sources.c4.weight=0.2",
                 "logging.wandb_mode=online", "logging.wandb_project=mine", "cluster.nodes=128",
                 "train.micro_batch_size=2", "train.run_dir=/tmp/x", "train.seed=7", "data.sources.books.prefix=/d/books")
    values = {k: OmegaConf.select(cfg, k) for k in (
        "model.num_query_groups", "optimizer.lr", "optimizer.warmup_steps", "parallel.tensor", "parallel.recompute",
        "data.sources.c4.weight", "logging.wandb_mode", "logging.wandb_project", "cluster.nodes",
        "train.micro_batch_size", "train.run_dir", "train.seed", "data.sources.books.prefix")}
    assert values == {
        "model.num_query_groups": 8, "optimizer.lr": 2e-4, "optimizer.warmup_steps": 500, "parallel.tensor": 4,
        "parallel.recompute": "full", "data.sources.c4.weight": 0.2, "logging.wandb_mode": "online",
        "logging.wandb_project": "mine", "cluster.nodes": 128, "train.micro_batch_size": 2, "train.run_dir": "/tmp/x",
        "train.seed": 7, "data.sources.books.prefix": "/d/books"}
    assert recipe("tiny_cpu").train.run_dir == "runs/tiny_cpu"  # interpolated from the recipe name


BAD = [  # (overrides, world size, the field the message must name)
    (["+train.foo=1"], 2, "train.foo"),
    (["+model.nonsense=1"], 2, "model.nonsense"),
    (["train.steps=abc"], 2, "train.steps"),
    (["optimizer.lr=fast"], 2, "optimizer.lr"),
    (["parallel.sequence_parallel=maybe"], 2, "parallel.sequence_parallel"),
    (["model=llama_1b"], 2, "model/llama_1b"),
    (["parallel=nope"], 2, "parallel/nope"),
    (["parallel.tensor=4"], 2, "parallel.tensor"),
    (["parallel.data=2"], 2, "parallel.data"),
    (["train.global_batch_size=6", "train.micro_batch_size=4", "parallel=cpu_single"], 2, "train.global_batch_size"),
    (["parallel.recompute=some"], 2, "parallel.recompute"),
    (["train.precision=fp8"], 2, "train.precision"),
    (["optimizer.decay_style=exp"], 2, "optimizer.decay_style"),
    (["logging.wandb_mode=cloud"], 2, "logging.wandb_mode"),
    (["parallel=cpu_single", "parallel.distributed_optimizer=false", "parallel.overlap_param_gather=true"], 2,
     "parallel.overlap_param_gather"),
    (["optimizer.warmup_steps=400"], 2, "optimizer.warmup_steps"),
    (["optimizer.min_lr_ratio=1.5"], 2, "optimizer.min_lr_ratio"),
    (["optimizer.beta2=1.0"], 2, "optimizer.beta2"),
    (["train.steps=0"], 2, "train.steps"),
    (["model.num_attention_heads=3", "model.hidden_size=129"], 2, "model.num_attention_heads"),
    (["model.seq_length=127"], 2, "model.seq_length"),
    (["train.exit_at_step=301"], 2, "train.exit_at_step"),
    (["model.num_layers=3", "parallel.tensor=1", "parallel.pipeline=2"], 2, "model.num_layers"),
    # the seed systems' layer choices (issue 14)
    (["model.num_query_groups=1"], 2, "model.kv_projection=shared"),  # multi-query at TP=2 needs the shared projection
    (["model.kv_projection=shared"], 2, "model.kv_projection"),  # 4 key/value heads are not multi-query
    (["model.position_embedding=alibi"], 2, "model.position_embedding"),
    (["model.normalization=BatchNorm"], 2, "model.normalization"),
    (["model.activation=relu"], 2, "model.activation"),
    (["model.init=xavier"], 2, "model.init"),
    (["model.sliding_window=0"], 2, "model.sliding_window"),
    (["model.full_attention_every=2"], 2, "model.full_attention_every"),  # no window to skip
    (["parallel.first_stage_layers=1"], 2, "parallel.first_stage_layers"),  # no pipeline
    (["parallel=cpu_single", "parallel.pipeline=2", "parallel.first_stage_layers=4"], 2, "parallel.first_stage_layers"),
    (["model.z_loss=-1e-4"], 2, "model.z_loss"),
    (["optimizer.name=lion"], 2, "optimizer.name"),
    (["optimizer.warmup_style=cosine"], 2, "optimizer.warmup_style"),
    (["train.batch_ramp=[{global_batch_size:6,until_step:10}]"], 2, "train.batch_ramp[0].global_batch_size"),
    (["train.batch_ramp=[{global_batch_size:8,until_step:20},{global_batch_size:12,until_step:10}]"], 2,
     "train.batch_ramp[1].until_step"),
    (["train.batch_ramp=[{global_batch_size:8,until_step:300}]"], 2, "train.batch_ramp[0].until_step"),
]


@pytest.mark.parametrize("overrides,world,field", BAD, ids=[b[2] for b in BAD])
def test_invalid_override_names_the_field(overrides, world, field):
    with pytest.raises(RecipeError) as e:
        resolve(recipe("tiny_cpu", *overrides), world)
    assert field in str(e.value)


@pytest.mark.parametrize("field,value", [("parallel_layers", "true"), ("position_embedding", "relative"),
                                         ("kv_projection", "shared")])
def test_transformer_engine_refuses_layers_it_has_no_spec_for(field, value):
    extra = ["model.num_query_groups=1"] if field == "kv_projection" else []
    with pytest.raises(RecipeError, match=f"model.{field}"):
        resolve(recipe("tiny_cpu", "model.transformer_impl=te", f"model.{field}={value}", *extra), 2, have_te=True)


def test_knobs_that_cannot_apply_are_reported_and_turned_off():
    cfg, notes = resolve(recipe("tiny_cpu", "parallel.tp_comm_overlap=true"), 2, have_te=False, have_cuda=False)
    assert cfg.parallel.tp_comm_overlap is False
    assert any("tp_comm_overlap turned off" in n and "model.transformer_impl=te" in n and "CUDA" in n for n in notes)
    cfg, notes = resolve(recipe("tiny_cpu", "parallel=cpu_single", "parallel.sequence_parallel=true"), 2)
    assert cfg.parallel.sequence_parallel is False and any("sequence_parallel turned off" in n for n in notes)
    cfg, notes = resolve(recipe("llama_65b_pretrain", "model.transformer_impl=te", "parallel.tp_comm_overlap=true"),
                         2048, have_te=True, have_cuda=True)
    assert cfg.parallel.tp_comm_overlap and cfg.parallel.data == 64 and notes == []
    # TE's userbuffers overlap needs TE's modules, not just an importable TE.
    cfg, notes = resolve(recipe("llama_65b_pretrain", "parallel.tp_comm_overlap=true"), 2048, have_te=True, have_cuda=True)
    assert not cfg.parallel.tp_comm_overlap and any("model.transformer_impl=te" in n for n in notes)


def test_transformer_impl_is_checked():
    with pytest.raises(RecipeError, match="model.transformer_impl: 'te' needs TransformerEngine"):
        resolve(recipe("tiny_cpu", "model.transformer_impl=te"), 2, have_te=False)
    with pytest.raises(RecipeError, match="model.transformer_impl: 'flash' is not one of local, te"):
        resolve(recipe("tiny_cpu", "model.transformer_impl=flash"), 2)
    assert resolve(recipe("tiny_cpu"), 2)[0].model.transformer_impl == "local"


# Names as torch.cuda.get_device_name() reports them.
PEAK_NAMES = {
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835.5e12, "NVIDIA H200": 989.4e12, "NVIDIA H200 NVL": 835.5e12,
    "NVIDIA GH200 480GB": 989.4e12, "NVIDIA L40S": 362.05e12, "NVIDIA L40": 181.05e12, "NVIDIA A10": 125e12,
    "NVIDIA L4": 121e12, "NVIDIA A40": 149.7e12, "NVIDIA B200": 2250e12,
}
NOT_IN_TABLE = ["NVIDIA RTX A1000", "NVIDIA RTX A1000 Laptop GPU", "NVIDIA A10G", "NVIDIA A100X", "NVIDIA A16",
                "NVIDIA RTX A4000", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-32GB", "NVIDIA H100", "NVIDIA L4T"]


def test_dense_bf16_peak_matches_whole_device_names():
    from llama_plugin.throughput import dense_bf16_peak

    for name, peak in PEAK_NAMES.items():
        found = dense_bf16_peak(name)
        assert found and found[0] == peak and found[1].startswith(name), name
    for name in NOT_IN_TABLE:
        assert dense_bf16_peak(name) is None, name


def test_configured_peak_wins_and_an_unknown_gpu_gives_no_mfu():
    from llama_plugin.throughput import peak_flops_per_device

    assert peak_flops_per_device(400e12, "NVIDIA H100 80GB HBM3") == (400e12, "cluster.peak_flops_per_gpu")
    assert peak_flops_per_device(None, "NVIDIA H100 PCIe")[0] == 756e12
    with pytest.warns(UserWarning, match="NVIDIA RTX A1000: not in"):
        peak, why = peak_flops_per_device(None, "NVIDIA RTX A1000")
    assert peak is None and "cluster.peak_flops_per_gpu" in why
    m = speed_metrics(tokens=1000, seconds=1.0, devices=1, flops_per_token=10, peak=peak)
    assert "throughput/mfu" not in m and m["throughput/tflops_per_gpu"] == pytest.approx(1e-8)


def test_mfu_for_the_7b_shape_by_hand():
    model = recipe("llama_7b_pretrain").model
    n = 6_738_415_616
    # by hand: 6 * (N - V*d) + 12 * L * H * Q * T
    by_hand = 6 * (n - 32000 * 4096) + 12 * 32 * 32 * 128 * 2048
    assert by_hand == 42_865_287_168
    assert flops_per_token(n, model) == by_hand
    # 8 GPUs at 3,000 tokens/s each for 10 s, A100 dense bf16 peak 312 TFLOP/s:
    m = speed_metrics(tokens=8 * 3000 * 10, seconds=10.0, devices=8, flops_per_token=by_hand, peak=312e12)
    assert m["throughput/tokens_per_sec_per_gpu"] == pytest.approx(3000)
    assert m["throughput/tflops_per_gpu"] == pytest.approx(3000 * 42_865_287_168 / 1e12)
    assert m["throughput/mfu"] == pytest.approx(3000 * 42_865_287_168 / 312e12)  # = 0.4122
    assert m["throughput/mfu"] == pytest.approx(0.41216622, rel=1e-6)


def test_resume_refuses_a_recipe_that_changes_the_data_order(tmp_path):
    import json

    from llama_plugin.train import check_resume, resume_fields

    cfg, _ = resolve(recipe("tiny_cpu", f"train.run_dir={tmp_path}"), 2)
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "llama_model.json").write_text("{}")
    (ckpt / "train_state.json").write_text(json.dumps({"step": 4, "resume_fields": resume_fields(cfg)}))
    check_resume(cfg)  # the same recipe resumes
    changed, _ = resolve(recipe("tiny_cpu", f"train.run_dir={tmp_path}", "train.global_batch_size=32"), 2)
    with pytest.raises(RecipeError, match="train.global_batch_size"):
        check_resume(changed)
    decay, _ = resolve(recipe("tiny_cpu", f"train.run_dir={tmp_path}", "optimizer.weight_decay=0.05"), 2)
    with pytest.raises(RecipeError, match="optimizer.weight_decay: 0.05 differs from 0.1"):
        check_resume(decay)
    other_layout, _ = resolve(recipe("tiny_cpu", f"train.run_dir={tmp_path}", "parallel=cpu_single"), 2)
    check_resume(other_layout)  # without the distributed optimizer the layout may change
