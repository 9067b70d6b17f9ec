"""Every script in benchmarks/ starts, and the GPU acceptance script's CPU smoke mode passes, so
none of them breaks unseen. (They print figures; no test asserts on time.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


def test_the_scripts_are_the_ones_listed():
    assert SCRIPTS == ["eval_speed.py", "gpu_acceptance.py", "index_memory.py", "sft_load.py",
                       "tokenize_throughput.py", "train_throughput.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script, tmp_path):
    """Run as the README shows (`python benchmarks/<script>`), from another directory: no module of
    benchmarks/ may shadow the standard library, and the imports must resolve."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage:" in r.stdout


def test_train_throughput_measures_a_recipe(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "tiny_cpu",
                        "parallel=cpu_single", "model.num_layers=2", "train.global_batch_size=2",
                        "train.micro_batch_size=1", "--warmup", "1", "--steps", "2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["timed_steps"] == 2 and out["world_size"] == 1 and out["transformer_impl"] == "local"
    assert out["throughput/tokens_per_sec_per_gpu"] > 0 and 0 < out["throughput/mfu"] < 1
    assert out["peak_flops_source"].startswith("CPU: measured")


def test_gpu_acceptance_cpu_smoke(demo_data, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--cpu-smoke",
                        "--demo-data", str(demo_data), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=600)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps({k: report[k] for k in ("wall_s", "section_wall_s", "checks")}))
    assert r.returncode == 0 and report["ok"], (report, r.stderr[-3000:])
    assert report["device"] == "cpu" and report["cpu_smoke"] and not report["te_importable"]
    assert {(c["case"], c["precision"]) for c in report["parity"]} == {
        (case, precision) for case in ("tiny", "llama_7b_layer", "tiny_sliding_window") for precision in ("fp32", "bf16")}
    for case in report["parity"]:
        assert case["logits_max_abs"] > 0.1 and case["logits_max_abs_diff"] <= case["tolerance"], case
    train = report["train"]
    assert train["loss_falls"] and train["resume_bitwise_equal"] and train["resumed_from"] == 2
    assert train["killed_after_step"] < train["steps"]
    assert set(report["throughput"]) == {"local"} and report["throughput"]["local"]["timed_steps"] == 3


def test_gpu_acceptance_refuses_to_run_without_a_gpu():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--cpu-smoke" in r.stderr
