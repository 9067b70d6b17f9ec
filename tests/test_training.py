"""The training loop: exact schedule, exact resume (clean stop, kill -9, other layout), metrics."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from llama_plugin.convert import mcore_to_hf
from llama_plugin.distributed import free_port
from llama_plugin.train import build_scheduler, lr_at
from recipes import compose
from recipes.schema import RecipeConfig
from tests.conftest import torchrun

# A short run: 4 layers, 8 sequences of 128 tokens per step, fp32, TP=2 + SP on 2 processes.
SHORT = ["tiny_cpu", "train.steps=12", "train.global_batch_size=8", "train.micro_batch_size=2",
         "train.eval_interval=6", "train.eval_batches=2", "train.save_interval=4", "optimizer.warmup_steps=3",
         "logging.progress_bar=false", "logging.wandb_mode=disabled", "logging.log_interval=1"]


def run(demo_data, run_dir, *extra, check=True):
    r = torchrun([*SHORT, f"train.run_dir={run_dir}", *extra], {"DEMO_DATA": str(demo_data)})
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in rows]


def start_run_and_wait(demo_data, run_dir, logged_steps: int, *extra) -> subprocess.Popen:
    """Start a SHORT run in the background; return once `logged_steps` steps are in metrics.jsonl."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "llama_plugin.train", *SHORT, f"train.run_dir={run_dir}", *extra]
    env = dict(os.environ, DEMO_DATA=str(demo_data))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    jsonl = run_dir / "metrics.jsonl"
    while not (jsonl.is_file() and len(jsonl.read_text().splitlines()) >= logged_steps):
        assert time.time() < deadline and proc.poll() is None, "the run did not reach the step"
        time.sleep(0.05)
    return proc


def final_weights(run_dir, tmp_path, name):
    from llama_plugin.checkpoint import complete_checkpoints

    ckpt = complete_checkpoints(run_dir / "checkpoints")[-1][1]
    mcore_to_hf(ckpt, tmp_path / name)
    return load_file(tmp_path / name / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(demo_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    run(demo_data, run_dir)
    return run_dir


def test_lr_schedule_equals_closed_form():
    cfg = compose("llama_7b_pretrain", [], RecipeConfig)
    o, steps = cfg.optimizer, cfg.train.steps
    peak, floor, warm = 3e-4, 3e-5, 2000

    def closed_form(s):  # LLaMA: linear warm-up to 3e-4 over 2,000 steps, cosine to 10% of peak
        if s <= warm:
            return peak * s / warm
        return floor + 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))) * (peak - floor)

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(opt, o, steps)
    checks = {0, 1, 1999, 2000, (steps + warm) // 2, steps - 1, steps}
    for s in range(steps + 1):
        if s in checks:
            assert opt.param_groups[0]["lr"] == pytest.approx(closed_form(s), rel=1e-12, abs=1e-15), s
            assert lr_at(s, o, steps) == pytest.approx(closed_form(s), rel=1e-12, abs=1e-15), s
        scheduler.step(increment=1)
    assert closed_form(steps) == pytest.approx(3e-5)
    assert closed_form((steps + warm) // 2) == pytest.approx((peak + floor) / 2, rel=1e-4)


def test_palm_inverse_square_root_schedule():
    # the recipe's own peak lr wins over the schedule file's; PaLM's 1e-2 is set explicitly
    cfg = compose("llama_7b_pretrain", ["optimizer=palm_inverse_sqrt", "optimizer.lr=1e-2"], RecipeConfig)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(opt, cfg.optimizer, cfg.train.steps)
    for s in range(40001):
        if s in (5000, 10000, 40000):
            want = 1e-2 * s / 10000 if s <= 10000 else 1e-2 * math.sqrt(10000 / s)
            assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
        scheduler.step(increment=1)


def test_palm_540b_recipe_schedule_and_batch_ramp():
    """PaLM section 5: lr 1e-2 for 10k steps then 1/sqrt(k); batch 512 until step 50k, 1,024 until
    115k, then 2,048 to step 255k (780B tokens); Adafactor, z-loss 1e-4."""
    from llama_plugin.optim.batch_ramp import from_recipe

    cfg = compose("palm_540b_pretrain", [], RecipeConfig)
    o, t = cfg.optimizer, cfg.train
    assert (o.name, o.beta1, o.beta2_decay, o.clip_grad, o.weight_decay_lr_power, cfg.model.z_loss) == (
        "adafactor", 0.9, -0.8, 1.0, 2.0, 1e-4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(opt, o, t.steps)
    checks = {0, 1, 9999, 10000, 10001, 40000, 254999}
    for s in range(255000):
        if s in checks:  # PaLM's rsqrt schedule as T5X counts steps (from 0): 1 / sqrt(max(s, 10^4))
            assert opt.param_groups[0]["lr"] == pytest.approx(max(s, 10000) ** -0.5, rel=1e-12), s
        scheduler.step(increment=1)
    from llama_plugin.layout import resolve
    from llama_plugin.plan.__main__ import plan_recipe

    resolved, notes = resolve(cfg, 2048, have_te=True, have_cuda=True)
    p = resolved.parallel
    assert (p.tensor, p.pipeline, p.data, p.first_stage_layers, p.last_stage_layers) == (8, 8, 32, 14, 14)
    assert plan_recipe(resolved)["memory"]["fits"]  # 118 layers = 14 + 6 x 15 + 14, Adafactor over shards
    ramp = from_recipe(t, data_parallel_size=128)
    sizes = [ramp.global_batch(b) for b in range(t.steps)]  # batch b is step b + 1
    assert sizes[:50000] == [512] * 50000 and sizes[50000:115000] == [1024] * 65000
    assert sizes[115000:] == [2048] * 140000
    assert ramp.first_sample(t.steps) == sum(sizes) == 378_880_000  # x 2,048 tokens = 776B
    for b in (0, 1, 49999, 50000, 50001, 114999, 115000, 254999):
        assert ramp.first_sample(b) == sum(sizes[:b]) and ramp.batch_at_sample(sum(sizes[:b])) == b
        ramp.update(sum(sizes[:b]), consistency_check=True)  # megatron's calculator interface
        assert (ramp.get_current_global_batch_size(), ramp.get()) == (sizes[b], sizes[b] // 128)


# PaLM's pieces through the training loop (recipes/tiny_palm_cpu.yaml), short: the batch grows 4 -> 8 -> 16.
# Data parallel with the distributed optimizer (Adafactor over shards, its state saved per shard);
# tests/test_seed_architectures.py covers the layers under TP=2 + SP and PP=2.
PALM_SHORT = ["tiny_palm_cpu", "model.num_layers=2", "train.steps=9", "optimizer.warmup_steps=3",
              "parallel=cpu_single", "parallel.distributed_optimizer=true", "train.micro_batch_size=2",
              "train.batch_ramp=[{global_batch_size:4,until_step:3},{global_batch_size:8,until_step:6}]",
              "train.eval_interval=100", "train.eval_batches=0", "train.save_interval=3",
              "logging.progress_bar=false", "logging.wandb_mode=disabled", "logging.log_interval=1"]


def test_palm_recipe_trains_with_its_ramp_and_resumes_exactly(demo_data, tmp_path):
    env = {"DEMO_DATA": str(demo_data)}
    full, staged = tmp_path / "full", tmp_path / "staged"
    r = torchrun([*PALM_SHORT, f"train.run_dir={full}"], env)
    assert r.returncode == 0, r.stderr[-4000:]
    r = torchrun([*PALM_SHORT, f"train.run_dir={staged}", "train.exit_at_step=4"], env)
    assert r.returncode == 0, r.stderr[-4000:]
    r = torchrun([*PALM_SHORT, f"train.run_dir={staged}"], env)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-4000:]
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/global_batch_size"] for r in rows] == [4, 4, 4, 8, 8, 8, 16, 16, 16]
    # logged step k ran at 0-based step k - 1: 1e-2 * sqrt(3 / max(k - 1, 3))
    assert [r["train/lr"] for r in rows] == pytest.approx([1e-2 * math.sqrt(3 / max(k - 1, 3)) for k in range(1, 10)],
                                                          rel=1e-12)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 1.0
    assert losses(staged) == losses(full)  # the resumed run reads the same samples, batch by batch


def test_training_lowers_the_loss_and_writes_checkpoints(uninterrupted):
    rows = losses(uninterrupted)
    assert [r[0] for r in rows] == list(range(1, 13))
    assert rows[-1][1] < rows[0][1] - 0.3
    ckpts = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert ckpts == ["step_00000008", "step_00000012"]  # keep_checkpoints=2
    state = json.loads((uninterrupted / "run_state.json").read_text())
    assert state["finished"] and state["step"] == 12


@pytest.mark.slow
def test_clean_stop_and_resume_is_bitwise_exact(demo_data, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    run(demo_data, run_dir, "train.exit_at_step=5")
    assert json.loads((run_dir / "run_state.json").read_text())["step"] == 5
    r = run(demo_data, run_dir)
    assert "resumed from" in r.stdout + r.stderr
    assert losses(run_dir) == losses(uninterrupted)
    a, b = final_weights(uninterrupted, tmp_path, "a"), final_weights(run_dir, tmp_path, "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kill_9(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and every worker (torchrun starts workers in their own sessions)."""
    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in victims:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(victims, timeout=30)


@pytest.mark.slow
def test_bf16_distributed_optimizer_kill_9_resumes_bitwise(demo_data, tmp_path):
    """bf16 parameters, fp32 main params in the distributed optimizer (DP=2): kill -9 after the
    step-4 checkpoint, resume, and every loss and grad norm equals the uninterrupted run's."""
    layout = ["parallel=cpu_single", "parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
              "train.precision=bf16", "train.steps=8", "train.eval_interval=100"]
    run(demo_data, tmp_path / "full", *layout)
    run_dir = tmp_path / "killed"
    proc = start_run_and_wait(demo_data, run_dir, 6, *layout)
    kill_9(proc)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) < 8
    r = run(demo_data, run_dir, *layout)
    assert "step_00000004 (step 4)" in r.stdout
    full, resumed = losses(tmp_path / "full"), losses(run_dir)
    assert len(full) == 8 and full[-1][1] < full[0][1] - 0.3
    assert resumed == full
    cfg = (run_dir / "config.yaml").read_text()
    assert "precision: bf16" in cfg and "distributed_optimizer: true" in cfg


@pytest.mark.slow
def test_corrupted_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
        demo_data, uninterrupted, tmp_path):
    """A flipped byte in the newest checkpoint: the restart verifies it against its manifest, sets
    it aside, resumes from the previous verified one and reproduces the uninterrupted run bitwise."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    newest = run_dir / "checkpoints" / "step_00000012"
    target = max(newest.glob("__*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x10
    target.write_bytes(bytes(data))
    r = run(demo_data, run_dir)
    assert f"{target.name}: checksum differs from the manifest" in r.stderr
    assert "resumed from" in r.stdout and r.stdout.count("step_00000008 (step 8)") == 1, r.stdout[-2000:]
    assert (run_dir / "checkpoints" / "step_00000012.corrupt-1" / target.name).read_bytes() == bytes(data)
    assert losses(run_dir) == losses(uninterrupted)
    a, b = final_weights(uninterrupted, tmp_path, "a"), final_weights(run_dir, tmp_path, "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_tp2_checkpoint_resumes_as_dp2(demo_data, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    run(demo_data, run_dir, "train.exit_at_step=4")
    run(demo_data, run_dir, "parallel=cpu_single")  # 2 processes: now DP=2
    ref, got = losses(uninterrupted), losses(run_dir)
    assert [g[0] for g in got] == [r[0] for r in ref]
    assert got[:4] == ref[:4]
    # Losses within 1e-5; grad norms (sums of squares over ~1M fp32 values reduced in another order)
    # within 1e-4 relative.
    for (_, l1, g1), (_, l2, g2) in zip(ref[4:], got[4:]):
        assert abs(l1 - l2) <= 1e-5 and abs(g1 - g2) <= 1e-4 * g1, (l1, l2, g1, g2)


@pytest.mark.slow
def test_demo_short_run_lowers_validation_loss(tmp_path):
    """`make demo`'s code path, shortened: the demo itself asserts the loss fell below the unigram entropy."""
    r = subprocess.run([sys.executable, "-m", "llama_plugin.demo", "--out", str(tmp_path / "demo"), "--steps", "60"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads(r.stdout[r.stdout.rindex("\n{") + 1:r.stdout.rindex("}") + 1])
    assert report["final_val_loss"] < report["unigram_entropy_nats"] - 0.5
    assert report["final_val_loss"] < report["first_val_loss"] or report["first_val_loss"] == report["final_val_loss"]
    assert (tmp_path / "demo" / "run" / "metrics.jsonl").is_file()
    assert list((tmp_path / "demo" / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    # the loss plot, and the report command over the same run
    assert report["loss_plot"] == str(tmp_path / "demo" / "run" / "plots" / "loss.png")
    assert Path(report["loss_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"demo: loss plot {report['loss_plot']}" in r.stdout
    from llama_plugin.report.__main__ import main as report_main

    assert report_main([str(tmp_path / "demo" / "run"), "--out", str(tmp_path / "plots")]) == 0
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"loss.png", "lr.png", "grad_norm.png",
                                                                    "throughput.png"}
    assert "![loss](loss.png)" in (tmp_path / "plots" / "report.md").read_text()
    assert report_main([str(tmp_path)]) == 2  # no metrics.jsonl there


@pytest.mark.slow
def test_distributed_optimizer_with_overlapped_gather_resumes_exactly(demo_data, tmp_path):
    """DP=2, distributed optimizer, overlapped grad reduce-scatter and param all-gather: a stop and
    resume (with a validation pass in between) reproduces the uninterrupted losses bit for bit."""
    layout = ["parallel=cpu_single", "parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
              "parallel.overlap_param_gather=true", "train.steps=8", "train.eval_interval=3"]
    run(demo_data, tmp_path / "full", *layout)
    run(demo_data, tmp_path / "staged", *layout, "train.exit_at_step=3")
    run(demo_data, tmp_path / "staged", *layout)
    assert losses(tmp_path / "staged") == losses(tmp_path / "full")
    assert len(losses(tmp_path / "full")) == 8


def test_metrics_reach_jsonl_and_wandb_offline(demo_data, tmp_path):
    from tests.wandb_reader import read_run

    run_dir = tmp_path / "run"
    run(demo_data, run_dir, "logging.wandb_mode=offline", "train.steps=6", "train.eval_interval=3",
        "train.eval_tasks=[piqa,boolq,nq]", "train.eval_tasks_limit=6", "train.eval_tasks_max_new_tokens=6")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # in-loop benchmarks (TP=2 + sequence parallel) at the eval steps, equal to the offline command
    # on the final checkpoint (loaded at TP=1)
    evals = {f"eval/{t}/{m}" for t in ("piqa", "boolq") for m in ("acc", "acc_norm", "llama_acc")} | {"eval/nq/exact_match"}
    assert [r["step"] for r in rows if evals <= r.keys()] == [3, 6]
    r = subprocess.run([sys.executable, "-m", "llama_plugin.eval", "--model", str(run_dir / "checkpoints" / "step_00000006"),
                        "--tokenizer", str(demo_data / "tokenizer.model"), "--tasks", "piqa,boolq,nq", "--limit", "6",
                        "--max-new-tokens", "6"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    offline = json.loads(r.stdout.strip().splitlines()[-1])["tasks"]
    assert {f"eval/{t}/{m}": v for t, ms in offline.items() for m, v in ms.items()} == {k: rows[-1][k] for k in evals}
    names = {"train/loss", "train/lr", "train/grad_norm", "throughput/tokens_per_sec",
             "throughput/tokens_per_sec_per_gpu", "throughput/tflops_per_gpu", "throughput/mfu",
             "memory/max_allocated_gb", "step_time_s", "tokens_seen", "data/books_share"}
    assert all(names <= r.keys() for r in rows)
    assert "val/loss" in rows[2] and "val/loss" in rows[5]
    assert rows[-1]["tokens_seen"] == 6 * 8 * 128 and rows[-1]["data/books_share"] == 1.0
    assert 0 < rows[-1]["throughput/mfu"] < 1
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, config, exit_code = read_run(files[0])
    assert exit_code == 0  # the file is complete
    assert [h["_step"] for h in history] == [1, 2, 3, 4, 5, 6]
    for h, r in zip(history, rows):
        for name in names | ({"val/loss"} | evals if "val/loss" in r else set()):
            assert h[name] == pytest.approx(r[name], rel=1e-12), name
    assert config["model"]["hidden_size"] == 128 and config["optimizer"]["beta2"] == 0.95
    assert config["derived"]["peak_flops_source"].startswith("CPU: measured")
    assert config["derived"]["flops_formula"].startswith("6*N_matmul")


@pytest.mark.slow
def test_sigusr1_checkpoints_stops_and_resumes_exactly(demo_data, uninterrupted, tmp_path):
    """What Slurm's --signal=USR1 triggers: checkpoint after the current step, exit 0, resume exactly."""
    run_dir = tmp_path / "run"
    proc = start_run_and_wait(demo_data, run_dir, 2)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "llama_plugin.train" in " ".join(c.cmdline())]
    assert len(workers) == 2
    workers[0].send_signal(signal.SIGUSR1)  # one rank is enough: ranks agree at the end of each step
    assert proc.wait(timeout=300) == 0
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["stopped"] and not state["finished"] and 2 <= state["step"] < 12
    assert (run_dir / "checkpoints" / f"step_{state['step']:08d}").is_dir()
    run(demo_data, run_dir)
    assert losses(run_dir) == losses(uninterrupted)


@pytest.fixture(scope="module")
def continued(demo_data, tmp_path_factory):
    """Continued pre-training (recipe tiny_continued_cpu: train.load = an imported HF LLaMA) for 3
    steps in fp32 and in bf16, and a bf16 run from random weights (what a lost load would give)."""
    from llama_plugin.convert import hf_to_mcore
    from tests.conftest import make_hf_llama

    root = tmp_path_factory.mktemp("continued")
    hf_model = make_hf_llama(root / "hf", num_layers=4, vocab=1024, hidden=128, intermediate=512, seed=5)
    hf_to_mcore(root / "hf", root / "mcore")
    runs = {}
    for name, extra in (("fp32", [f"train.load={root / 'mcore'}"]), ("bf16", [f"train.load={root / 'mcore'}"]),
                        ("bf16_random", ["train.load=null"])):
        run_dir = root / name
        precision = "train.precision=" + ("fp32" if name == "fp32" else "bf16")
        r = torchrun(["tiny_continued_cpu", *SHORT[1:], f"train.run_dir={run_dir}", precision, *extra,
                      "train.steps=3", "optimizer.warmup_steps=1"], {"DEMO_DATA": str(demo_data)})
        assert r.returncode == 0, r.stderr[-4000:]
        runs[name] = run_dir
    return root, hf_model, runs


def _hf_loss_on_first_batch(demo_data, hf_model, run_dir, cache) -> float:
    """Hugging Face's loss on step 1's global batch, computed in the model's own dtype."""
    from llama_plugin.data import build_datasets

    cfg = compose("tiny_continued_cpu", [f"train.run_dir={run_dir}"], RecipeConfig)
    data_cfg = OmegaConf.merge(cfg.data, {"tokenizer_model": str(demo_data / "tokenizer.model"),
                                          "sources": {"books": {"prefix": str(demo_data / "books_text_document")}}})
    train_ds, _, _ = build_datasets(data_cfg, 128, cfg.train.seed, 3 * 8, 2 * 8, str(cache))
    samples = [train_ds[i] for i in range(8)]
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
    with torch.no_grad():
        logits = hf_model(tokens).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()


def test_training_starts_from_converted_hf_weights(demo_data, continued, tmp_path):
    """fp32: the first step's loss equals Hugging Face's loss on the same global batch (1e-5)."""
    root, hf_model, runs = continued
    ref = _hf_loss_on_first_batch(demo_data, hf_model, runs["fp32"], tmp_path / "cache")
    first_loss = losses(runs["fp32"])[0][1]
    assert abs(first_loss - ref) <= 1e-5, (first_loss, ref)
    assert "initial weights from" in (runs["fp32"] / "config.yaml").read_text()


def test_bf16_continued_pretraining_keeps_the_loaded_weights(demo_data, continued, tmp_path):
    """bf16: step 1's loss is HF's bf16 loss (1e-2), and 3 steps later the weights are those of the
    fp32 run from the same HF weights, up to bf16 rounding, and nowhere near a run from random
    weights. (Before the optimizer's fp32 main params were reloaded after train.load, step 1
    replaced the loaded weights with the random initialisation.)"""
    import copy

    root, hf_model, runs = continued
    ref_bf16 = _hf_loss_on_first_batch(demo_data, copy.deepcopy(hf_model).to(torch.bfloat16), runs["bf16"],
                                       tmp_path / "cache")
    bf16_losses = [r[1] for r in losses(runs["bf16"])]
    fp32_losses = [r[1] for r in losses(runs["fp32"])]
    print("losses fp32", fp32_losses, "bf16", bf16_losses, "HF bf16 step 1", ref_bf16,
          "bf16 from random", [r[1] for r in losses(runs["bf16_random"])])
    assert abs(bf16_losses[0] - ref_bf16) <= 1e-2, (bf16_losses[0], ref_bf16)
    assert max(abs(a - b) for a, b in zip(bf16_losses, fp32_losses)) <= 2e-2
    fp32, bf16 = final_weights(runs["fp32"], tmp_path, "fp32"), final_weights(runs["bf16"], tmp_path, "bf16")
    rand = final_weights(runs["bf16_random"], tmp_path, "rand")
    assert {str(t.dtype) for t in bf16.values()} == {"torch.bfloat16"}
    worst_close, nearest_random = 0.0, float("inf")
    for name, w in fp32.items():
        scale = w.float().norm()
        worst_close = max(worst_close, ((bf16[name].float() - w.float()).norm() / scale).item())
        if "norm" not in name:  # norm weights start at 1 in both
            nearest_random = min(nearest_random, ((rand[name].float() - w.float()).norm() / scale).item())
    print(f"relative distance to the fp32 run: bf16 {worst_close:.3g} (worst tensor), random start "
          f"{nearest_random:.3g} (nearest tensor)")
    assert worst_close <= 2e-2
    assert nearest_random >= 0.5
