"""DeepSpeed fine-tuning: ZeRO 1/2/3 (+ offload) and LoRA against plain PyTorch / plain peft, label
masking, exact resume, HF export, bad input.

One torchrun launch (2 processes, gloo) runs the DeepSpeed cases in sequence (tests/finetune_workers.py;
the signal test launches its own run twice). DeepSpeed's one compiled op (the shared-memory comm op,
~60 s to build) is cached under ~/.cache/llama_mcore/torch_extensions, so only the first launch on a
machine pays for it; the optimizer is torch's AdamW (no FusedAdam / cpu_adam build);
the references run in this process with plain torch.optim.AdamW, plain clip_grad_norm_ and their
own loss, data order and lr schedule written from the documented behaviour.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

from llama_plugin.distributed import free_port
from llama_plugin.finetune.sft_data import (ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, IGNORE_INDEX, SftDataError,
                                            load_tokenizer, read_records, tokenize_record)

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT / "tests" / "fixtures" / "alpaca_tiny.json"
CHAT = ROOT / "tests" / "fixtures" / "chat_tiny.jsonl"
SHAREGPT = ROOT / "tests" / "fixtures" / "sharegpt_tiny.json"
OASST = ROOT / "tests" / "fixtures" / "oasst_tiny.trees.jsonl"
STEPS = 10
LOSS_TOL = 1e-5  # fp32 losses of a 2-process DeepSpeed run vs one plain process (summation order only)


def make_base(path: Path, seed: int = 3) -> Path:
    """A random tiny HF LLaMA with the shapes of recipes/model/tiny_hf.yaml."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ft_env(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {"root": root, "base": make_base(root / "base"), "tokenizer": demo_data / "tokenizer.model"}


def common(env, run_dir):
    return [f"base_model={env['base']}", f"data.tokenizer_model={env['tokenizer']}", f"train.run_dir={run_dir}",
            f"train.max_steps={STEPS}", "optimizer.clip_grad=1.0", "optimizer.weight_decay=0.1",
            "train.save_interval=100", "zero.param_persistence_threshold=0"]


def saving_every_2(overrides):
    return [o for o in overrides if not o.startswith("train.save_interval=")] + ["train.save_interval=2"]


def launch(cases: list, tmp: Path, timeout=900):
    spec = tmp / "cases.json"
    spec.write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "tests.finetune_workers", str(spec)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


@pytest.fixture(scope="module")
def ds_runs(ft_env):
    """Every DeepSpeed case, in one 2-process world; returns {case: run_dir}."""
    root = ft_env["root"]
    runs = {n: root / n for n in ("zero0", "zero2_bf16", "zero1", "zero2", "zero3", "zero3_offload", "zero3_resumed", "lora_zero2",
                                  "lora_zero3", "chat_zero2", "zero3_ckpt", "lora_zero2_ckpt", "zero2_damaged",
                                  "zero1_offload", "zero2_offload", "mixture_zero2")}
    full = "tiny_alpaca_cpu"
    cases = [
        {"recipe": full, "overrides": common(ft_env, runs["zero0"]) + ["zero.stage=0"]},
        {"recipe": full, "overrides": common(ft_env, runs["zero2_bf16"]) + ["zero=stage2", "train.precision=bf16",
                                                                              "train.max_steps=4"]},
        {"recipe": full, "overrides": common(ft_env, runs["zero1"]) + ["zero=stage1"]},
        {"recipe": full, "overrides": common(ft_env, runs["zero2"]) + ["zero=stage2"]},
        {"recipe": full, "overrides": common(ft_env, runs["zero3"]) + ["zero=stage3"]},
        {"recipe": full, "overrides": common(ft_env, runs["zero3_offload"]) + ["zero=stage3_offload"]},
        # ZeRO-1/2 with the optimizer (fp32 master weights, moments, the AdamW step) in CPU memory
        {"recipe": full, "overrides": common(ft_env, runs["zero1_offload"]) + ["zero=stage1", "zero.offload_optimizer=true"]},
        {"recipe": full, "overrides": common(ft_env, runs["zero2_offload"]) + ["zero=stage2", "zero.offload_optimizer=true"]},
        # stopped after step 4 (checkpoint), then a second run in the same directory resumes it
        {"recipe": full, "overrides": common(ft_env, runs["zero3_resumed"]) + ["zero=stage3", "train.exit_at_step=4"]},
        {"tear": str(runs["zero3_resumed"])},  # a crash mid-write leaves half a metrics line
        {"recipe": full, "overrides": common(ft_env, runs["zero3_resumed"]) + ["zero=stage3"]},
        # checkpoints every 2 steps, stopped after step 6, a flipped byte in step 6's checkpoint: the
        # resume sets it aside and goes on from step 4
        {"recipe": full, "overrides": saving_every_2(common(ft_env, runs["zero2_damaged"])) + [
            "zero=stage2", "train.exit_at_step=6", "train.keep_checkpoints=3"]},
        {"damage": str(runs["zero2_damaged"])},
        {"recipe": full, "overrides": saving_every_2(common(ft_env, runs["zero2_damaged"])) + [
            "zero=stage2", "train.keep_checkpoints=3"]},
        {"recipe": "tiny_lora_cpu", "overrides": common(ft_env, runs["lora_zero2"]) + [
            "zero=stage2", "lora.export=adapter", f"optimizer.clip_grad={LORA_CLIP}"]},
        {"recipe": "tiny_lora_cpu", "overrides": common(ft_env, runs["lora_zero3"]) + [
            "zero=stage3", "lora.export=merged", f"optimizer.clip_grad={LORA_CLIP}"]},
        {"recipe": "tiny_chat_cpu", "overrides": common(ft_env, runs["chat_zero2"]) + ["zero=stage2", "train.max_steps=4"]},
        {"recipe": "tiny_mixture_cpu", "overrides": common(ft_env, runs["mixture_zero2"]) + ["train.max_steps=9"]},
        # the 7B recipes' activation checkpointing, under ZeRO-3 and with LoRA
        {"recipe": full, "overrides": common(ft_env, runs["zero3_ckpt"]) + ["zero=stage3", "train.max_steps=3",
                                                                            "train.gradient_checkpointing=true"]},
        {"recipe": "tiny_lora_cpu", "overrides": common(ft_env, runs["lora_zero2_ckpt"]) + [
            "zero=stage2", "train.max_steps=3", "train.gradient_checkpointing=true", f"optimizer.clip_grad={LORA_CLIP}"]},
    ]
    launch(cases, root)
    return runs


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the plain references


def lr_closed_form(step, peak, total, warmup_ratio):
    """Hugging Face's cosine schedule (what Alpaca trained with; warm-up steps = ceil(ratio x total)
    as its TrainingArguments counts them), evaluated by transformers itself."""
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(total * warmup_ratio), total)
    return peak * sched.lr_lambdas[0](step)


def reference_run(base, tokenizer, data_file, fmt, max_length, steps, lr, lora=None, seed=42, global_batch=4,
                  epochs=3, warmup_ratio=0.1, weight_decay=0.1, clip=1.0):
    """One process, no DeepSpeed: the whole global batch in one forward, torch AdamW, clip_grad_norm_."""
    from transformers import LlamaForCausalLM

    tok = load_tokenizer(tokenizer)
    samples = [tokenize_record(r, tok, max_length) for r in read_records(data_file, fmt)]
    per_epoch = len(samples) // global_batch
    total = min(steps, epochs * per_epoch)
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                                 target_modules=lora["targets"], task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    losses, norms = [], []
    for step in range(total):
        epoch, b = divmod(step, per_epoch)
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed + epoch))
        batch = [samples[i] for i in order[b * global_batch:(b + 1) * global_batch].tolist()]
        length = max(len(s["input_ids"]) for s in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, s in enumerate(batch):
            ids[row, :len(s["input_ids"])] = torch.tensor(s["input_ids"])
            labels[row, :len(s["labels"])] = torch.tensor(s["labels"])
            mask[row, :len(s["input_ids"])] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        loss = nll / (target != -100).sum()
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        for g in opt.param_groups:
            g["lr"] = lr_closed_form(step, lr, total, warmup_ratio)
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses, norms


@pytest.fixture(scope="module")
def full_reference(ft_env):
    return reference_run(ft_env["base"], ft_env["tokenizer"], ALPACA, "alpaca", 256, STEPS, lr=1e-3)


LORA_CLIP = 0.2  # the adapters' gradient norm is 0.16-0.37 here: clipping active on most steps
LORA = {"r": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def lora_reference(ft_env):
    return reference_run(ft_env["base"], ft_env["tokenizer"], ALPACA, "alpaca", 256, STEPS, lr=1e-2, lora=LORA,
                         clip=LORA_CLIP)


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize("case", ["zero0", "zero1", "zero2", "zero3", "zero1_offload", "zero2_offload", "zero3_offload"])
def test_zero_stage_matches_plain_pytorch(ds_runs, full_reference, case):
    _, ref_losses, ref_norms = full_reference
    rows = metrics(ds_runs[case])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    diffs = [abs(r["loss"] - ref) for r, ref in zip(rows, ref_losses)]
    print(f"{case}: max |loss - plain torch| over {STEPS} steps = {max(diffs):.3e}")
    assert max(diffs) <= LOSS_TOL, diffs
    for r, ref in zip(rows, ref_norms):
        assert r["grad_norm"] == pytest.approx(ref, rel=1e-4)
    # clipping was active (norm above clip 1.0) on most steps, in DeepSpeed and in the reference alike
    assert sum(r["clipped"] for r in rows) >= STEPS // 2
    assert [r["clipped"] for r in rows] == [n > 1.0 for n in ref_norms]
    # the loss moved: a wrong update would not hide behind a flat curve
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    # and DeepSpeed really ran the stage asked for
    engine = json.loads((ds_runs[case] / "run_state.json").read_text())["engine"]
    stage = int(case[4])
    assert engine["zero_stage"] == stage and engine["basic_optimizer"] == "AdamW"
    assert engine["optimizer"] == {0: "AdamW", 3: "DeepSpeedZeroOptimizer_Stage3"}.get(stage, "DeepSpeedZeroOptimizer")
    assert engine["offload_optimizer"] == case.endswith("offload")
    assert engine["offload_param"] == (case == "zero3_offload")
    assert engine["loaded_sharded"] == (stage == 3)  # full fine-tuning under ZeRO-3 never holds the whole model
    if stage == 3:  # every parameter is sharded: rank 0 holds about half of the elements
        assert engine["rank0_parameter_elements"] <= engine["parameter_elements"] // 2 + 64


def test_bf16_run_tracks_the_fp32_reference(ds_runs, full_reference):
    """bf16 weights and activations (fp32 master weights in the optimizer): the same curve within
    bf16's resolution (8 bits of mantissa: ~0.4% of a loss near 6.9)."""
    rows = metrics(ds_runs["zero2_bf16"])
    assert len(rows) == 4
    diffs = [abs(r["loss"] - ref) for r, ref in zip(rows, full_reference[1])]
    print(f"zero2 bf16: max |loss - fp32 plain torch| over 4 steps = {max(diffs):.3e}")
    assert max(diffs) <= 0.05
    exported = load_file(ds_runs["zero2_bf16"] / "hf_export" / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}


@pytest.mark.parametrize("case,reference", [("zero3_ckpt", "full_reference"), ("lora_zero2_ckpt", "lora_reference")])
def test_activation_checkpointing_changes_nothing(ds_runs, case, reference, request):
    ref_losses = request.getfixturevalue(reference)[1]
    rows = metrics(ds_runs[case])
    assert len(rows) == 3 and max(abs(r["loss"] - ref) for r, ref in zip(rows, ref_losses)) <= LOSS_TOL


def test_sigusr1_checkpoints_stops_and_resumes_exactly(ds_runs, ft_env, tmp_path):
    """SIGUSR1 to one rank: both stop after the same step with a checkpoint, exit 0; a rerun
    finishes with the uninterrupted run's numbers."""
    import time

    import psutil

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "llama_plugin.finetune", "tiny_alpaca_cpu", *common(ft_env, run_dir), "zero=stage2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "config.yaml").is_file():  # written once the engine is up
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-3000:] if proc.poll() else "timeout"
        time.sleep(0.02)
    ranks = [c for c in psutil.Process(proc.pid).children() if "llama_plugin.finetune" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    ranks[-1].send_signal(10)  # SIGUSR1
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["stopped"] and not state["finished"] and 1 <= state["step"] < STEPS
    assert (run_dir / "checkpoints" / f"step_{state['step']:08d}" / "train_state.json").is_file()
    assert not (run_dir / "hf_export").exists()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    def without_time(rows):
        return [{k: v for k, v in row.items() if k != "step_time_s"} for row in rows]

    assert without_time(metrics(run_dir)) == without_time(metrics(ds_runs["zero2"]))
    assert json.loads((run_dir / "run_state.json").read_text())["finished"]


def other_tokenizer(folder: Path) -> Path:
    """A SentencePiece model trained on other text than the demo's."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "omicron"]
    lines = [" ".join(words[(i * 7 + k) % 10] for k in range(12)) for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "other"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    return folder / "other.model"


@pytest.mark.parametrize("case,override,field", [
    ("zero3_resumed", "optimizer.lr=5e-4", "optimizer.lr"),
    ("zero3_resumed", "optimizer.weight_decay=0.0", "optimizer.weight_decay"),
    ("zero3_resumed", "optimizer.beta2=0.95", "optimizer.beta2"),
    ("zero3_resumed", "optimizer.clip_grad=0.5", "optimizer.clip_grad"),
    ("zero3_resumed", "train.precision=bf16", "train.precision"),
    ("zero3_resumed", "data.max_length=128", "data.max_length"),
    ("zero3_resumed", "base_model=<other weights>", "base_model (content)"),
    ("zero3_resumed", "data.tokenizer_model=<other tokenizer>", "data.tokenizer_model (content)"),
    ("lora_zero2", "lora.alpha=32", "lora.alpha"),
    ("lora_zero2", "lora.r=8", "lora.r"),
])
def test_changed_recipe_refuses_to_resume(ds_runs, ft_env, case, override, field, tmp_path, capsys, monkeypatch):
    """Each field that changes what the resumed run means is refused, naming it; the same recipe
    with the base model and tokenizer copied to other paths (same content) resumes."""
    import shutil

    from llama_plugin.finetune.trainer import check_resume
    from recipes import compose
    from recipes.finetune_schema import FinetuneConfig

    if case == "zero3_resumed":
        recipe, overrides = "tiny_alpaca_cpu", common(ft_env, ds_runs[case]) + ["zero=stage3"]
    else:
        recipe, overrides = "tiny_lora_cpu", common(ft_env, ds_runs[case]) + [
            "zero=stage2", "lora.export=adapter", f"optimizer.clip_grad={LORA_CLIP}"]
    if override.startswith("base_model="):
        override = f"base_model={make_base(tmp_path / 'other_base', seed=4)}"  # same shapes, other weights
    elif override.startswith("data.tokenizer_model="):
        override = f"data.tokenizer_model={other_tokenizer(tmp_path)}"
    else:  # the unchanged recipe, its files moved, resumes
        shutil.copytree(ft_env["base"], tmp_path / "base_copy")
        shutil.copyfile(ft_env["tokenizer"], tmp_path / "tok.model")
        check_resume(compose(recipe, overrides + [f"base_model={tmp_path / 'base_copy'}",
                                                  f"data.tokenizer_model={tmp_path / 'tok.model'}"], FinetuneConfig))
    from llama_plugin.finetune.trainer import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([recipe, *overrides, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after make_base's progress bar
    assert err.startswith(f"error: {field}:") and "an exact resume needs the same value" in err, err


def test_chat_zero2_matches_plain_pytorch(ds_runs, ft_env):
    _, ref_losses, _ = reference_run(ft_env["base"], ft_env["tokenizer"], CHAT, "messages", 160, 4, lr=1e-3)
    rows = metrics(ds_runs["chat_zero2"])
    assert len(rows) == 4
    assert max(abs(r["loss"] - ref) for r, ref in zip(rows, ref_losses)) <= LOSS_TOL


def test_a_mixture_run_feeds_each_batch_its_weights(ds_runs):
    """tiny_mixture_cpu: weights 1/2, 1/4, 1/4 of a 4-sample batch -> 2, 1, 1 in every logged step,
    over the 2+ epochs of 8 steps; the samples really come from the three files."""
    rows = metrics(ds_runs["mixture_zero2"])
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert all(r["samples_per_source"] == {"alpaca": 2, "chat": 1, "sharegpt": 1} for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    from omegaconf import OmegaConf

    derived = OmegaConf.load(ds_runs["mixture_zero2"] / "config.yaml").derived
    assert OmegaConf.to_container(derived.sources) == [
        {"name": "alpaca", "format": "alpaca", "records": 16, "per_epoch": 16},
        {"name": "chat", "format": "messages", "records": 8, "per_epoch": 8},
        {"name": "sharegpt", "format": "sharegpt", "records": 8, "per_epoch": 8}]
    assert derived.steps_per_epoch == 8


@pytest.mark.parametrize("case", ["lora_zero2", "lora_zero3"])
def test_lora_matches_plain_peft(ds_runs, lora_reference, case):
    _, ref_losses, ref_norms = lora_reference
    rows = metrics(ds_runs[case])
    diffs = [abs(r["loss"] - ref) for r, ref in zip(rows, ref_losses)]
    print(f"{case}: max |loss - plain peft| over {STEPS} steps = {max(diffs):.3e}; grad norms {[round(n, 3) for n in ref_norms]}")
    assert len(rows) == STEPS and max(diffs) <= LOSS_TOL, diffs
    engine = json.loads((ds_runs[case] / "run_state.json").read_text())["engine"]
    assert engine["zero_stage"] == int(case[-1])
    # only the adapters train: r x (in + out) per projection, 7 projections per layer, 2 layers
    assert engine["trainable_elements"] == 2 * 4 * (4 * (64 + 64) + 2 * (64 + 192) + (192 + 64))
    for r, ref in zip(rows, ref_norms):
        assert r["grad_norm"] == pytest.approx(ref, rel=1e-4)
    assert [r["clipped"] for r in rows] == [n > LORA_CLIP for n in ref_norms] and sum(r["clipped"] for r in rows) >= 3
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05


def test_resume_from_deepspeed_checkpoint_is_bitwise_equal(ds_runs):
    resumed = ds_runs["zero3_resumed"]
    assert json.loads((resumed / "checkpoints" / "step_00000004" / "train_state.json").read_text())["step"] == 4
    def without_time(rows):
        return [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows]

    # losses, grad norms, lr, clipping of steps 5..10 after the restart equal the uninterrupted run's
    assert without_time(metrics(resumed)) == without_time(metrics(ds_runs["zero3"]))
    assert len(metrics(resumed)) == STEPS
    assert "resumed_from_step: 4" in (resumed / "config.yaml").read_text()


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_resume_is_bitwise_equal(ds_runs):
    """Fine-tuning checkpoints carry a manifest too: the damaged step-6 checkpoint fails
    verification, is set aside, and the run resumes from step 4 to the uninterrupted run's numbers."""
    run = ds_runs["zero2_damaged"]
    damaged = (run / "damaged.txt").read_text().strip()
    assert damaged.startswith("step_00000006/")
    ckpts = run / "checkpoints"
    assert (ckpts / "step_00000006.corrupt-1" / damaged.split("/", 1)[1]).is_file()
    m = json.loads((ckpts / "step_00000010" / "manifest.json").read_text())["files"]
    assert "train_state.json" in m and any(n.startswith("deepspeed/") for n in m) and "rng_rank1.pt" in m

    def without_time(rows):
        return [{k: v for k, v in row.items() if k != "step_time_s"} for row in rows]

    assert without_time(metrics(run)) == without_time(metrics(ds_runs["zero2"]))
    assert "resumed_from_step: 4" in (run / "config.yaml").read_text()


def test_full_export_loads_in_transformers_with_the_trained_logits(ds_runs, full_reference, ft_env):
    """ZeRO-3's shards gathered into a plain HF folder: same logits as the model trained in plain torch."""
    from transformers import LlamaForCausalLM

    ref_model = full_reference[0]
    for case in ("zero2", "zero3"):
        exported = LlamaForCausalLM.from_pretrained(str(ds_runs[case] / "hf_export"), dtype=torch.float32).eval()
        ids = torch.tensor([[1, 5, 77, 300, 901, 12, 2]])
        with torch.no_grad():
            diff = (exported(ids).logits - ref_model(ids).logits).abs().max().item()
        print(f"{case}: max |exported logits - plain torch model logits| = {diff:.3e}")
        assert diff <= 1e-5
    assert (ds_runs["zero3"] / "hf_export" / "tokenizer.model").is_file()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ds_runs["zero3"] / "hf_export"))
    sp = spm.SentencePieceProcessor(model_file=str(ft_env["tokenizer"]))
    text = "Below is an instruction that describes a task. Il fait beau."
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert not list(ds_runs["zero3"].glob("*.tmp"))


def test_lora_merged_export_is_base_plus_scaled_BA(ds_runs, lora_reference, ft_env):
    """Merged weights = W + (alpha / r) B A, computed by hand from the plain peft run's adapters."""
    ref_model = lora_reference[0]
    merged = load_file(ds_runs["lora_zero3"] / "hf_export" / "model.safetensors")
    base = load_file(ft_env["base"] / "model.safetensors")
    ref = dict(ref_model.named_parameters())
    scale = LORA["alpha"] / LORA["r"]
    checked = 0
    for name, w in base.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LORA["targets"]:
            a = ref[f"base_model.model.{module}.lora_A.default.weight"].detach()
            b = ref[f"base_model.model.{module}.lora_B.default.weight"].detach()
            assert (b @ a).abs().max() > 1e-4  # the adapters really moved
            torch.testing.assert_close(merged[name], w + scale * (b @ a), atol=1e-5, rtol=0)
            checked += 1
        else:
            assert torch.equal(merged[name], w), name  # frozen weights untouched
    assert checked == 2 * 7


def test_lora_adapter_export_loads_with_peft(ds_runs, lora_reference, ft_env):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    folder = ds_runs["lora_zero2"] / "hf_export"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(ft_env["base"]), dtype=torch.float32),
                                      str(folder)).eval()
    ids = torch.tensor([[1, 40, 41, 42, 500, 2]])
    with torch.no_grad():
        diff = (model(ids).logits - lora_reference[0](ids).logits).abs().max().item()
    assert diff <= 1e-4


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def sp_and_tok(demo_data):
    return (spm.SentencePieceProcessor(model_file=str(demo_data / "tokenizer.model")),
            load_tokenizer(demo_data / "tokenizer.model"))


def test_tokenizer_ids_equal_sentencepiece(sp_and_tok):
    sp, tok = sp_and_tok
    for record in read_records(ALPACA, "alpaca") + read_records(CHAT, "messages"):
        text = "".join(t for t, _ in record.segments)  # a response is only ever encoded after its prompt
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_alpaca_labels_cover_exactly_the_response(sp_and_tok):
    """Record 2 of the fixture has an input: the template with input; loss on output + </s> only."""
    sp, tok = sp_and_tok
    raw = json.loads(ALPACA.read_text())[2]
    record = read_records(ALPACA, "alpaca")[2]
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n"
              f"### Instruction:\n{raw['instruction']}\n\n### Input:\n{raw['input']}\n\n### Response:")
    assert record.segments == ((prompt, False), (raw["output"], True))
    sample = tokenize_record(record, tok, 10_000)
    joint, prompt_ids = sp.encode(prompt + raw["output"]), sp.encode(prompt)  # prompt and response together
    assert sample["input_ids"] == [1] + joint + [2]
    loss_positions = [i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX]
    first = 1 + len(prompt_ids)
    assert loss_positions == list(range(first, len(joint) + 2))
    assert [sample["labels"][i] for i in loss_positions] == joint[len(prompt_ids):] + [2]
    assert sp.decode([sample["labels"][i] for i in loss_positions[:-1]]) == "Il fait beau aujourd'hui."
    # a record without input uses the other template
    assert read_records(ALPACA, "alpaca")[0].segments[0][0] == ALPACA_PROMPT_NO_INPUT.format(
        instruction="Give three tips for staying healthy.")
    assert "paired with an input" in ALPACA_PROMPT_WITH_INPUT and "paired" not in ALPACA_PROMPT_NO_INPUT


def stanford_alpaca_preprocess(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """tatsu-lab/stanford_alpaca train.py's data path, its logic rewritten here: the prompt
    template filled in, target = output + eos_token, `_tokenize_fn` on sources and on
    source + target (the tokenizer adds BOS; "</s>" in the text is the EOS token; truncation at
    max_length), labels = input_ids with the first len(tokenized source) set to IGNORE_INDEX."""
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
    no_input = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
    sources = [(with_input if r.get("input", "") != "" else no_input).format_map(r) for r in records]
    targets = [f"{r['output']}{tokenizer.eos_token}" for r in records]
    out = []
    for source, target in zip(sources, targets):
        input_ids = tokenizer(source + target, max_length=max_length, truncation=True).input_ids
        source_len = len(tokenizer(source, max_length=max_length, truncation=True).input_ids)
        labels = list(input_ids)
        labels[:source_len] = [IGNORE_INDEX] * min(source_len, len(labels))
        out.append({"input_ids": input_ids, "labels": labels})
    return out


def test_alpaca_tokens_and_labels_equal_stanford_alpacas(demo_data, tmp_path):
    """Every fixture record, at Alpaca's 512 and at a length that cuts responses: the same ids and
    labels as stanford_alpaca's preprocess on a plain HF LlamaTokenizer that adds BOS (as LLaMA's
    tokenizer_config.json has it)."""
    import shutil

    from transformers import LlamaTokenizer

    shutil.copyfile(demo_data / "tokenizer.model", tmp_path / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(str(tmp_path), add_bos_token=True, add_eos_token=False)
    tok = load_tokenizer(demo_data / "tokenizer.model")
    raw = json.loads(ALPACA.read_text())
    for max_length in (512, 40):
        ours = [tokenize_record(r, tok, max_length) for r in read_records(ALPACA, "alpaca")]
        assert ours == stanford_alpaca_preprocess(raw, hf, max_length), max_length
    assert any(len(s["input_ids"]) == 40 for s in ours)  # 40 did cut


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def fastchat_preprocess(conversations: list[list[dict]], tokenizer, max_length: int) -> list[dict]:
    """lm-sys/FastChat fastchat/train/train.py `preprocess`, its logic rewritten here, for the
    vicuna_v1.1 template (system message + " ", then "USER: m " and "ASSISTANT: m</s>"):
    a first message not from "human" is dropped; the conversation text is tokenized whole (the
    tokenizer adds BOS; "</s>" in the text is EOS); then per "</s>"-separated turn, the tokens of
    "... ASSISTANT: " minus 2 (BOS and the trailing "▁", FastChat's LLaMA rule) are masked, and
    everything after the last full turn; a length mismatch masks the whole sample. Padding is
    left out (FastChat pads to max_length; pads carry no loss)."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    out = []
    for source in conversations:
        if roles[source[0]["from"]] != "USER":
            source = source[1:]
        text = VICUNA_SYSTEM + " "
        for j, sentence in enumerate(source):
            assert roles[sentence["from"]] == ("USER", "ASSISTANT")[j % 2]
            text += roles[sentence["from"]] + ": " + sentence["value"] + (" " if j % 2 == 0 else "</s>")
        input_ids = tokenizer(text, max_length=max_length, truncation=True).input_ids
        target = list(input_ids)

        def mask(a, b):
            for k in range(a, min(b, len(target))):
                target[k] = IGNORE_INDEX

        sep = " ASSISTANT: "
        cur_len = 1
        mask(0, cur_len)
        for turn in text.split("</s>"):
            if turn == "":
                break
            turn_len = len(tokenizer(turn).input_ids)
            parts = turn.split(sep)
            if len(parts) != 2:
                break
            instruction_len = len(tokenizer(parts[0] + sep).input_ids) - 2
            mask(cur_len, cur_len + instruction_len)
            cur_len += turn_len
        mask(cur_len, len(target))
        if cur_len < max_length and cur_len != len(input_ids):
            mask(0, len(target))  # FastChat: "tokenization mismatch", the sample is ignored
        out.append({"input_ids": input_ids, "labels": target})
    return out


@pytest.fixture(scope="module")
def legacy_hf_tokenizer(demo_data, tmp_path_factory):
    """A plain HF LlamaTokenizer on the demo model, BOS added, legacy=True: text after "</s>" is
    tokenized as a new sentence (with its "▁"), as the tokenizer Vicuna v1.1 was trained with did."""
    import shutil

    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("legacy_tokenizer")
    shutil.copyfile(demo_data / "tokenizer.model", folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=False, legacy=True)


def loss_texts(sample, sp) -> list[str]:
    """The decoded runs of positions that carry loss (each must end with </s>)."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert all(r[-1] == 2 for r in runs)
    return [sp.decode(r[:-1]) for r in runs]


def as_sharegpt(messages_record: dict) -> list[dict]:
    return [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in messages_record["messages"]]


def test_sharegpt_and_messages_equal_fastchats_vicuna_preprocess(sp_and_tok, legacy_hf_tokenizer):
    """Every record of a ShareGPT file (one opens with a "gpt" message, one ends with a "human" one)
    and of a messages file, at Vicuna's 2048 and at a length that cuts a reply: the same ids and
    labels as FastChat's preprocess, and the loss exactly on the assistant replies and their </s>."""
    sp, tok = sp_and_tok
    share = json.loads(SHAREGPT.read_text())
    chats = [json.loads(line) for line in CHAT.read_text().splitlines()]
    cut_any = False
    for max_length in (2048, 90):
        ours = [tokenize_record(r, tok, max_length) for r in read_records(SHAREGPT, "sharegpt")]
        # One deliberate difference: a conversation that ends with a human message fails FastChat's
        # length check ("tokenization mismatch") and trains on nothing; we drop that last message and
        # train on the rest, which is FastChat's result for the conversation without it.
        convs = [c["conversations"] for c in share]
        trailing = [i for i, c in enumerate(convs) if c[-1]["from"] == "human"]
        assert trailing == [3]
        assert set(fastchat_preprocess([convs[3]], legacy_hf_tokenizer, max_length)[0]["labels"]) == {IGNORE_INDEX}
        ref = fastchat_preprocess([c[:-1] if i in trailing else c for i, c in enumerate(convs)], legacy_hf_tokenizer,
                                  max_length)
        assert ours == ref, max_length
        if max_length == 2048:  # no other mismatch (at 90 some replies are cut off whole)
            assert all(any(label != IGNORE_INDEX for label in r["labels"]) for r in ref)
        cut_any |= any(len(r["input_ids"]) == max_length for r in ref)
        ours = [tokenize_record(r, tok, max_length) for r in read_records(CHAT, "messages")]
        assert ours == fastchat_preprocess([as_sharegpt(c) for c in chats], legacy_hf_tokenizer, max_length)
    assert cut_any
    full = [tokenize_record(r, tok, 2048) for r in read_records(SHAREGPT, "sharegpt")]
    assert loss_texts(full[1], sp) == ["17 x 23 = 391.", "391 / 3 is about 130.33."]
    # the opening "gpt" message is dropped, so the first user turn follows the system message
    assert loss_texts(full[2], sp) == [share[2]["conversations"][2]["value"]]
    assert sp.decode(full[2]["input_ids"][1:]).startswith(VICUNA_SYSTEM + " USER: Why is a sunset red then?")
    assert loss_texts(full[3], sp) == [share[3]["conversations"][1]["value"]]  # "Thanks!" carries none


def test_oasst_trees_flatten_into_open_assistants_sft_threads(sp_and_tok, legacy_hf_tokenizer):
    """The fixture's 5 trees: kept threads, by the rule in sft_formats.oasst_threads, listed by hand."""
    from llama_plugin.finetune.sft_formats import Rendering

    sp, tok = sp_and_tok
    trees = [json.loads(line) for line in OASST.read_text().splitlines()]

    def texts(*path):  # a thread by child indices from the prompt
        node, out = trees[path[0]]["prompt"], []
        out.append(node["text"])
        for k in path[1:]:
            node = node["replies"][k]
            out.append(node["text"])
        return out

    expected = {
        # tree 0: the ranked replies' threads; the deleted answer's thread is dropped
        ("en",): [texts(0, 0, 0, 0), texts(0, 1), texts(0, 2),
                  # tree 1: "Thanks!" is the first reply of its parent: kept, without it; "Great, thanks." is not
                  texts(1, 0)],
        # top_k=1: rank >= 1 dropped; German tree 2 kept; tree 3 is not ready; tree 4 has a synthetic reply
        ("en", "de", 1): [texts(0, 0, 0, 0), texts(1, 0), texts(2, 0)],
    }
    for key, threads in expected.items():
        rendering = Rendering(oasst_languages=key[:2] if len(key) > 1 else key, oasst_top_k=key[2] if len(key) > 2 else None)
        records = read_records(OASST, "oasst", rendering)
        samples = [tokenize_record(r, tok, 2048) for r in records]
        assert [loss_texts(s, sp) for s in samples] == [t[1::2] for t in threads], key
        as_share = [[{"from": ("human", "gpt")[j % 2], "value": v} for j, v in enumerate(t)] for t in threads]
        assert samples == fastchat_preprocess(as_share, legacy_hf_tokenizer, 2048), key


def test_a_mixture_delivers_its_weights_within_one_sample_per_batch():
    """Three sources at 1/2, 3/10, 1/5 of a 10-sample batch (and a Koala-like skew at batch 128):
    every batch holds floor(B p) or that + 1 of each, the running count stays within one of
    its target, and in an epoch each source's samples are drawn without repeats."""
    from llama_plugin.finetune.schedule import BatchPlan

    for sizes, per_epoch, batch in (([40, 30, 7], [50, 30, 20], 10), ([300, 52, 900], [300, 52, 900], 128)):
        plan = BatchPlan(sizes, per_epoch, batch, seed=42, shuffle=True)
        total = sum(per_epoch)
        assert plan.steps_per_epoch == total // batch
        running = [0] * len(sizes)
        for epoch in range(2):
            drawn = [[] for _ in sizes]
            for b in range(plan.steps_per_epoch):
                idx = plan.indices(epoch * plan.steps_per_epoch + b)
                assert len(idx) == batch
                offsets = [sum(sizes[:i]) for i in range(len(sizes))] + [sum(sizes)]
                counts = [sum(offsets[i] <= j < offsets[i + 1] for j in idx) for i in range(len(sizes))]
                assert counts == plan.source_counts(b)
                for i, c in enumerate(counts):
                    share = batch * per_epoch[i] / total
                    assert math.floor(share) <= c <= math.floor(share) + 1
                    running[i] = (running[i] if b else 0) + c
                    assert abs(running[i] - (b + 1) * share) < 1
                    drawn[i] += [j - offsets[i] for j in idx if offsets[i] <= j < offsets[i + 1]]
            for i, d in enumerate(drawn):
                # fewer draws than records: no repeats; more (source 1 of the first plan): every record,
                # then a second permutation
                assert len(set(d[:sizes[i]])) == min(len(d), sizes[i])
    # one source: the permutation per epoch that a plain run used (seed + epoch)
    plan = BatchPlan([16], [16], 4, seed=42, shuffle=True)
    assert [j for b in range(4) for j in plan.indices(4 + b)] == torch.randperm(
        16, generator=torch.Generator().manual_seed(43)).tolist()


def test_truncation_keeps_labels_aligned(sp_and_tok):
    _, tok = sp_and_tok
    record = read_records(ALPACA, "alpaca")[4]
    full = tokenize_record(record, tok, 10_000)
    cut = tokenize_record(record, tok, len(full["input_ids"]) - 7)
    n = len(cut["input_ids"])
    assert n == len(cut["labels"]) == len(full["input_ids"]) - 7
    assert cut["input_ids"] == full["input_ids"][:n] and cut["labels"] == full["labels"][:n]
    assert 2 not in cut["labels"]  # the EOS was cut off with the end of the response


# ---------------------------------------------------------------- bad input


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bad.write_text(good + "\n" + good + "\n" + '{"messages": [{"role": "user", "content": "hi"}\n')
    with pytest.raises(SftDataError, match=rf"{bad}:3: not valid JSON"):
        read_records(bad, "messages")


def test_missing_field_names_file_line_and_field(tmp_path):
    bad = tmp_path / "alpaca.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n\n" + json.dumps({"instruction": "c"}) + "\n")
    with pytest.raises(SftDataError, match=rf"{bad}:3: field 'output' missing"):
        read_records(bad, "alpaca")
    array = tmp_path / "alpaca.json"
    array.write_text('[\n {"instruction": "a", "output": "b"},\n {"output": "d"}\n]\n')
    with pytest.raises(SftDataError, match=rf"{array}:3 \(record 1\): field 'instruction' missing"):
        read_records(array, "alpaca")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(SftDataError, match=rf"{chat}:1: messages: turn 0 is 'assistant'"):
        read_records(chat, "messages")


@pytest.mark.parametrize("override,field", [
    ("train.global_batch_size=6", "train.global_batch_size"),  # not divisible by micro-batch 4 x world 1
    ("zero.stage=4", "zero.stage"),
    ("zero.offload_param=true", "zero.offload_param"),
    ("lora.r=0", "lora.r"),
    ("data.format=xml", "data.format"),
    ("optimizer.warmup_ratio=1.5", "optimizer.warmup_ratio"),
    ("+zero.no_such_knob=1", "no_such_knob"),
    ("model.hidden_size=128", "model.hidden_size"),
])
def test_bad_recipe_values_exit_2_naming_the_field(ft_env, override, field, capsys, monkeypatch):
    from llama_plugin.finetune.trainer import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    extra = ["train.micro_batch_size=4"] if field == "train.global_batch_size" else []
    code = main(["tiny_alpaca_cpu", f"base_model={ft_env['base']}", f"train.run_dir={ft_env['root'] / 'unused'}",
                 *extra, override])
    assert code == 2
    assert field in capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    (["data.train_file=x.json"], "data.train_file: set together with data.mixture"),
    (["data.mixture.1.samples=8"], "data.mixture[1]: give exactly one of weight and samples"),
    (["data.mixture.1.weight=null", "data.mixture.1.samples=8"], "data.mixture[1]: mixes weight and samples"),
    (["data.mixture.2.format=csv"], "data.mixture[2].format: 'csv' is not one of"),
    (["data.mixture.2.weight=0"], "data.mixture[2].weight: must be > 0"),
    (["data.mixture.2.name=chat"], "data.mixture[2].name: 'chat' appears twice"),
    (["data.mixture.2.weight=0.001"], "data.mixture[2].weight: sharegpt gets no sample of the 32 per epoch"),
])
def test_bad_mixtures_exit_2_naming_the_entry(ft_env, overrides, message, capsys, monkeypatch):
    from llama_plugin.finetune.trainer import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    code = main(["tiny_mixture_cpu", f"base_model={ft_env['base']}", f"data.tokenizer_model={ft_env['tokenizer']}",
                 f"train.run_dir={ft_env['root'] / 'unused'}", *overrides])
    assert code == 2
    assert message in capsys.readouterr().err


def test_the_seed_fine_tunes_carry_their_published_numbers():
    """Vicuna (its release and FastChat's script), Koala (its data counts, 2 epochs), Open-Assistant's
    LLaMA SFT config, Alpaca; every 7B recipe uses the AdamW the suite tests (impl torch)."""
    from recipes import compose
    from recipes.finetune_schema import FinetuneConfig

    def get(name):
        return compose(name, [], FinetuneConfig)

    v = get("vicuna_7b")
    assert (v.data.format, v.data.template, v.data.max_length, v.optimizer.lr, v.optimizer.weight_decay,
            v.optimizer.warmup_ratio, v.optimizer.schedule, v.train.epochs, v.train.global_batch_size,
            v.train.precision) == ("sharegpt", "vicuna_v1.1", 2048, 2e-5, 0.0, 0.03, "cosine", 3, 128, "bf16")
    k = get("koala_7b")
    assert {m.name: m.samples for m in k.data.mixture} == {
        "sharegpt": 30_000, "hc3": 87_000, "oig": 30_000, "alpaca": 52_000, "anthropic_hh": 50_000,
        "webgpt": 20_000, "summarization": 93_000}
    assert k.train.epochs == 2 and sum(m.samples for m in k.data.mixture[:2]) == 117_000  # Koala-Distill's 117k
    o = get("oasst_7b")
    assert (o.optimizer.lr, o.optimizer.weight_decay, o.optimizer.warmup_steps, o.train.epochs, o.data.max_length,
            o.data.oasst_top_k) == (1e-5, 0.0, 20, 8, 2048, None)
    assert o.data.oasst_languages == "bg ca cs da de en es fr hr hu it nl pl pt ro ru sl sr sv uk".split()
    a = get("alpaca_7b")
    assert (a.optimizer.lr, a.train.epochs, a.train.global_batch_size, a.data.max_length, a.optimizer.weight_decay) == (
        2e-5, 3, 128, 512, 0.0)
    for name in ("alpaca_7b", "lora_7b", "chat_7b", "vicuna_7b", "koala_7b", "oasst_7b", "llama_i_7b"):
        assert get(name).optimizer.impl == "torch", name


def test_warmup_steps_override_the_ratio_as_hf_does():
    from omegaconf import OmegaConf
    from transformers import get_cosine_schedule_with_warmup

    from llama_plugin.finetune.schedule import lr_at

    o = OmegaConf.create({"lr": 1e-5, "warmup_ratio": 0.03, "warmup_steps": 20, "schedule": "cosine"})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    sched = get_cosine_schedule_with_warmup(opt, 20, 400)
    assert [lr_at(s, o, 400) for s in range(400)] == pytest.approx([1e-5 * sched.lr_lambdas[0](s) for s in range(400)],
                                                                   rel=1e-12, abs=1e-20)


def test_a_52k_alpaca_array_loads_in_linear_time(tmp_path):
    """The reader visits a JSON array once: 8x the records take about 8x the time, not 64x
    (the old reader counted lines from the file's start for every record). Timing is in
    benchmarks/sft_load.py; here only the ratio, with a generous margin."""
    import time

    def timed(n):
        path = tmp_path / f"a{n}.json"
        path.write_text(json.dumps([{"instruction": f"Task {i}.", "input": "", "output": "Done. " * 20}
                                    for i in range(n)], indent=4))
        t0 = time.perf_counter()
        assert len(read_records(path, "alpaca")) == n
        return time.perf_counter() - t0

    small, large = min(timed(1500) for _ in range(3)), min(timed(12000) for _ in range(2))
    assert large < 24 * small, (small, large)


def test_malformed_training_file_exits_2(ft_env, tmp_path, capsys, monkeypatch):
    from llama_plugin.finetune.trainer import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n{oops\n")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["tiny_alpaca_cpu", f"base_model={ft_env['base']}", f"data.train_file={bad}",
                 f"train.run_dir={tmp_path / 'run'}"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_deepspeed_config_is_generated_consistently():
    from llama_plugin.finetune.ds_config import deepspeed_config
    from recipes import compose
    from recipes.finetune_schema import FinetuneConfig

    cfg = compose("alpaca_7b", ["zero=stage3_offload"], FinetuneConfig)
    ds = deepspeed_config(cfg, 8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (128, 4, 4)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                         "torch_adam": True}  # the AdamW the suite tests, not a compiled op
    assert ds["zero_force_ds_cpu_optimizer"] is False  # offload steps torch's AdamW on the CPU (tested)
    ds_adam = deepspeed_config(compose("alpaca_7b", ["zero=stage3_offload", "optimizer.impl=deepspeed"], FinetuneConfig), 8)
    assert "torch_adam" not in ds_adam["optimizer"]["params"] and ds_adam["zero_force_ds_cpu_optimizer"] is True
    assert ds["gradient_clipping"] == 1.0
    lora = deepspeed_config(compose("tiny_lora_cpu", [], FinetuneConfig), 2)
    assert lora["optimizer"]["params"]["torch_adam"] is True and not lora["bf16"]["enabled"]
    assert lora["gradient_accumulation_steps"] == 2 and "offload_optimizer" not in lora["zero_optimization"]


# ---------------------------------------------------------------- memory estimate


def test_memory_estimate_reproduces_the_7b_figures():
    from llama_plugin.finetune.memory import main, report
    from recipes import compose
    from recipes.finetune_schema import FinetuneConfig

    out = report(compose("lora_7b", [], FinetuneConfig), gpus=8)
    d, f, layers, v = 4096, 11008, 32, 32000
    P = layers * (4 * d * d + 3 * d * f + 2 * d) + 2 * v * d + d
    assert out["parameters"] == P == 6_738_415_616  # LLaMA-7B in HF format
    P_lora = layers * 8 * (4 * (d + d) + 3 * (d + f))
    assert out["lora_parameters"] == P_lora
    rows = {r["formula"]: r for r in out["rows_nominal"]}
    assert rows["16 P"]["gpu_gb"] == pytest.approx(7e9 * 4 * 4 / 1e9) == 112.0  # the notes' 7·4·4 = 112 GB
    assert rows["4P + 16 P_lora"]["gpu_gb"] == pytest.approx(28.0 + 16 * P_lora / 1e9)  # "about 28 GB"
    assert 28.0 < rows["4P + 16 P_lora"]["gpu_gb"] < 28.5
    exact = {r["formula"]: r for r in out["rows"]}
    assert exact["16P/N"]["gpu_gb"] == pytest.approx(16 * P / 8 / 1e9)
    assert exact["2P + (2P + 12P)/N"]["gpu_gb"] == pytest.approx((2 * P + 14 * P / 8) / 1e9)
    assert exact["2P + 2P + 12P/N"]["gpu_gb"] == pytest.approx((4 * P + 12 * P / 8) / 1e9)
    # the recipe's own row: lora_7b has a bf16 base (2 bytes, not the notes' fp32 4) and ZeRO-2
    # shards the adapters' 2-byte grads and 12-byte optimizer state over the 8 GPUs
    assert out["recipe_row"]["gpu_gb"] == pytest.approx((2 * P + (2 + 12) * P_lora / 8) / 1e9)
    assert out["recipe_row"]["setup"] == "this recipe: bf16, ZeRO-2, LoRA r=8"
    full = report(compose("alpaca_7b", ["zero=stage3_offload"], FinetuneConfig), gpus=8)["recipe_row"]
    assert (full["gpu_gb"], full["cpu_gb"]) == (0.0, pytest.approx(16 * P / 8 / 1e9))
    fp32 = report(compose("alpaca_7b", ["train.precision=fp32", "zero=stage1", "zero.offload_optimizer=true"],
                          FinetuneConfig), gpus=4)["recipe_row"]  # fp32: no master copy
    assert (fp32["gpu_gb"], fp32["cpu_gb"]) == (pytest.approx(8 * P / 1e9), pytest.approx(8 * P / 4 / 1e9))


def test_memory_cli_prints_the_formulas(capsys):
    from llama_plugin.finetune.memory import main

    assert main(["alpaca_7b", "--gpus", "8"]) == 0
    text = capsys.readouterr().out
    assert "P = 6,738,415,616 parameters" in text and "16 P" in text and "4P + 16 P_lora" in text
    assert " 112.0" in text and "16P/N" in text
    assert main(["alpaca_7b", "--gpus", "0"]) == 2


def test_llama_i_mmlu_five_shot_is_one_command_on_the_export(ds_runs, tmp_path, capsys):
    """LLaMA-I's measure after an instruction fine-tune: MMLU 5-shot on the exported HF folder."""
    from llama_plugin.eval.__main__ import main

    out = tmp_path / "mmlu.json"
    assert main(["--model", str(ds_runs["zero2"] / "hf_export"), "--tasks", "mmlu", "--shots", "5", "--limit", "8",
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())["tasks"]["mmlu"]["metrics"]["acc"]
    assert m["n"] == 8 and 0 <= m["value"] <= 1 and "| mmlu | 8 |" in capsys.readouterr().out
