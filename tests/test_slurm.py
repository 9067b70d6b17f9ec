"""slurm/: rendered sbatch scripts, run on a real local Slurm (slurm/local_cluster.sh).

The cluster tests start Debian's slurmctld/slurmd with fake nodes on this machine, submit the
rendered scripts with sbatch and check what the jobs did: training results against a direct
torchrun run, preemption (USR1 -> checkpoint -> requeue -> resume), a dependency chain, the 65B
paper script on a fake 256 x 8-GPU cluster, and quoting of hostile names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from recipes import RecipeError, compose
from recipes.schema import RecipeConfig
from slurm.launch import prepare
from slurm.render import render
from tests.conftest import torchrun
from tests.test_training import final_weights, losses

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = ROOT / "slurm" / "local_cluster.sh"
PWNED = Path("/tmp/pwned")
HOSTILE = "'; touch /tmp/pwned #"
# tiny_cpu, short, data parallel over 2 processes: one per fake node.
STEPS = 24
SHORT = ["parallel=cpu_single", f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2",
         "train.eval_interval=6", "train.eval_batches=2", "train.save_interval=4", "optimizer.warmup_steps=3",
         "logging.progress_bar=false", "logging.wandb_mode=disabled", "logging.log_interval=1"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class LocalSlurm:
    """The local cluster, restarted only when a test needs another shape."""

    def __init__(self):
        self.shape = None

    def ensure(self, nodes: int, cpus: int, gpus: int = 0):
        if self.shape != (nodes, cpus, gpus):
            r = subprocess.run([str(LOCAL_CLUSTER), "start", "--nodes", str(nodes), "--cpus", str(cpus),
                                "--gpus", str(gpus)], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
            self.shape = (nodes, cpus, gpus)

    def stop(self):
        subprocess.run([str(LOCAL_CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def slurm():
    cluster = LocalSlurm()
    yield cluster
    cluster.stop()


def q(value) -> str:
    """A Hydra override value as a quoted string (what a user types for spaces, quotes, `#`)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def job_info(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    info = dict(re.findall(r"(\w+)=(\S*)", out))
    name = re.search(r"JobName=(.*?) UserId=", out)  # the one field that may hold spaces here
    if name:
        info["JobName"] = name.group(1)
    return info


def wait_for_job(job_id: str, timeout: float = 600, until=lambda info: info.get("JobState") in TERMINAL) -> dict:
    deadline = time.time() + timeout
    while True:
        info = job_info(job_id)
        if until(info):
            return info
        assert time.time() < deadline, f"job {job_id} still {info.get('JobState')} after {timeout} s"
        time.sleep(0.2)


# Jobs activate the venv the tests run in (`make test` does not put it on PATH).
VENV = [f"cluster.venv={sys.prefix}"] if sys.prefix != sys.base_prefix else []


def launch(*args, env=None) -> str:
    """`python -m slurm.launch ...` (in this venv); the submitted job id."""
    r = subprocess.run([sys.executable, "-m", "slurm.launch", *args, *VENV], capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return re.search(r"submitted job (\d+)", r.stderr).group(1)


def job_output(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").glob("slurm-*.out")))


def logged_steps(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+)/", text, re.M)]


# ---------------------------------------------------------------------------------- rendering


def test_time_limit_seconds():
    from slurm.render import time_limit_seconds

    cases = {"30": 1800, "5:30": 330, "1:00:00": 3600, "2-0": 172800, "2-3": 183600, "1-2:30": 95400,
             "1-00:00:10": 86410}
    assert {t: time_limit_seconds(t) for t in cases} == cases


def test_layout_that_does_not_fit_the_allocation_fails_before_submission(demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DEMO_DATA", str(demo_data))
    # The command line: exit 2, the field named, nothing written or submitted.
    run_dir = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "slurm.launch", "tiny_cpu", "cluster=local_2nodes",
                        f"train.run_dir={run_dir}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "parallel.tensor: 2 is more than cluster.gpus_per_node=1" in r.stderr, r.stderr
    assert "submitted" not in r.stderr and not run_dir.exists()
    cases = [
        (["cluster=local", "parallel=cpu_single", "parallel.data=4"], "parallel.data"),
        (["cluster=local", "cluster.nodes=3"], "world size = cluster.nodes * cluster.gpus_per_node = 3 * 2"),
        (["cluster=local", "train.global_batch_size=6", "parallel=cpu_single"], "train.global_batch_size"),
        (["cluster=no_such_cluster"], "no_such_cluster"),
        (["cluster=local", "cluster.time_limit=tomorrow"], "cluster.time_limit"),
        (["cluster=local", "cluster.partitoin=gpu"], "partitoin"),
        (["cluster=local", "cluster.max_restarts=-1"], "cluster.max_restarts"),
        (["cluster=local", "+cluster.env.BAD-NAME=1"], "cluster.env"),
        (["cluster=local", "+cluster.env.RUN_DIR=/elsewhere"], "cluster.env.RUN_DIR: set by the job script"),
        (["cluster=local", "+cluster.env.SLURM_JOB_ID=1"], "cluster.env.SLURM_JOB_ID: set by the job script"),
        (["cluster=local", "cluster.time_limit=5", "cluster.signal_lead_s=300"], "cluster.signal_lead_s: 300 s"),
        (["cluster=local", "cluster.time_limit=0-1", "cluster.signal_lead_s=70000"], "at most 65535 s"),
    ]
    for overrides, message in cases:
        run_dir = tmp_path / f"run{len(message)}"
        with pytest.raises(RecipeError, match=re.escape(message)):
            prepare("tiny_cpu", [*overrides, f"train.run_dir={run_dir}"], cwd=tmp_path)
        assert not run_dir.exists(), overrides
    # A newline would end the #SBATCH comment line and start a command.
    cfg = OmegaConf.create(OmegaConf.to_container(compose("tiny_cpu", ["cluster=local"], RecipeConfig)))
    cfg.cluster.job_name = "x\ntouch /tmp/pwned"
    with pytest.raises(RecipeError, match="cluster.job_name: control characters"):
        render(cfg, tmp_path / "r", tmp_path / "r.yaml", tmp_path / "r.sbatch", tmp_path)


def test_rendered_scripts_pass_shellcheck_and_quote_every_value(demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DEMO_DATA", str(demo_data))
    scripts = []
    run_dir = tmp_path / f"run dir {HOSTILE}"
    for recipe, overrides in [
        ("tiny_cpu", ["cluster=local"]),
        ("tiny_cpu", ["cluster=local_2nodes", *SHORT, "cluster.chain_jobs=3", f"cluster.job_name={q('x' + HOSTILE)}"]),
        ("llama_65b_pretrain", [f"cluster.partition={q('gpu a')}", f"cluster.account={q('proj;1')}", "cluster.qos=high",
                                f"cluster.venv={q('/opt/venv $HOME')}", f"cluster.modules=[cuda/12.4,{q('nccl 2')}]",
                                "cluster.container_image=nvcr.io/nvidia/pytorch:24.05-py3",
                                "cluster.container_mounts=/data:/data", f"cluster.srun_args=[{q('--mpi=pmix')}]",
                                f"+cluster.env.NCCL_SOCKET_IFNAME={q('eth0 `id`')}"]),
    ]:
        script, text, _ = prepare(recipe, [*overrides, f"train.run_dir={q(run_dir / recipe)}"], cwd=tmp_path)
        scripts.append(script)
        r = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
    # Every paper run fits its 256 x 8 allocation with the recipe's layout.
    for recipe, (tp, pp) in {"llama_7b_pretrain": (1, 1), "llama_13b_pretrain": (2, 1),
                             "llama_33b_pretrain": (4, 2), "llama_65b_pretrain": (8, 4)}.items():
        script, _, layout = prepare(recipe, [f"train.run_dir={tmp_path / recipe}"], cwd=tmp_path)
        assert (layout["world_size"], layout["tensor"], layout["pipeline"], layout["data"]) == (2048, tp, pp, 2048 // (tp * pp))
        assert subprocess.run(["shellcheck", str(script)]).returncode == 0
    text = scripts[2].read_text()
    # GPUs asked for: a rank without working CUDA fails at start (llama_plugin.distributed)
    assert "export LLAMA_REQUIRE_CUDA=1" in text and "LLAMA_REQUIRE_CUDA" not in scripts[0].read_text()
    assert "source '/opt/venv $HOME/bin/activate'" in text
    assert "export NCCL_SOCKET_IFNAME='eth0 `id`'" in text
    assert '#SBATCH --partition="gpu a"' in text and '#SBATCH --account="proj;1"' in text
    assert "module load 'nccl 2'" in text and "--container-image=nvcr.io/nvidia/pytorch:24.05-py3" in text
    # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): the task gets the node's CPUs.
    assert "#SBATCH --cpus-per-task=128" in text and "srun --ntasks-per-node=1 --cpus-per-task=128 " in text
    # The composed recipe the job trains from, with the run dir made absolute.
    saved = OmegaConf.load(scripts[2].parent / "recipe.yaml")
    assert saved.train.run_dir == str(run_dir / "llama_65b_pretrain") and saved.cluster.partition == "gpu a"


# ----------------------------------------------------------------------------- on real Slurm


def test_two_nodes_match_torchrun_and_preemption_resumes_exactly(slurm, demo_data, tmp_path):
    """The same recipe directly under torchrun, through the template on 2 fake nodes, and through
    the template preempted in the middle of training as Slurm does it: TERM to every process of the
    job, srun, torchrun and the batch shell included (`scancel --signal=TERM --full`). srun ends the
    step at once, so the run loses the steps since its last checkpoint: at most train.save_interval
    (4), what slurm/README.md states; the requeued job resumes from there, bitwise exact."""
    slurm.ensure(nodes=2, cpus=2)
    env = {"DEMO_DATA": str(demo_data)}
    slurm_args = ["tiny_cpu", "cluster=local_2nodes", *SHORT]  # train.steps=STEPS
    clean_dir, preempted_dir, direct_dir = tmp_path / "clean", tmp_path / "preempted", tmp_path / "direct"
    clean = launch(*slurm_args, f"train.run_dir={clean_dir}", env=env)
    preempted = launch(*slurm_args, f"train.run_dir={preempted_dir}", "cluster.rdzv_port=29611", env=env)

    # Preempt once 5 steps are done (the stop comes at the end of a later step, between checkpoints).
    jsonl = preempted_dir / "metrics.jsonl"
    wait_for_job(preempted, 600, lambda info: info.get("JobState") in TERMINAL
                 or (jsonl.is_file() and len(jsonl.read_text().splitlines()) >= 5))
    subprocess.run(["scancel", "--signal=TERM", "--full", preempted], check=True)
    r = torchrun(["tiny_cpu", *SHORT, f"train.run_dir={direct_dir}"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    info = wait_for_job(preempted, 600, lambda i: i.get("JobState") in TERMINAL and i.get("Restarts") == "1"
                        or i.get("JobState") in TERMINAL - {"COMPLETED"})
    out = job_output(preempted_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out[-3000:]
    assert "TERM: asking training to checkpoint and stop" in out and "requeueing" in out
    assert "training failed" not in out  # a preemption is not a failure of the run
    first_job_steps = logged_steps(out.split("restart 1,")[0])
    assert 5 <= len(first_job_steps) < STEPS, "the stop should land mid-run"
    resumed = int(re.search(r"resumed from \S+ \(step (\d+)\)", out).group(1))
    steps_lost = first_job_steps[-1] - resumed
    print(f"preemption: TERM after step {first_job_steps[-1]}, resumed at step {resumed}: {steps_lost} steps lost")
    assert 0 <= steps_lost <= 4  # train.save_interval
    # Every step after the checkpoint is trained again, none skipped.
    assert logged_steps(out.split("restart 1,")[1]) == list(range(resumed + 1, STEPS + 1)), out[-3000:]

    info = wait_for_job(clean)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", job_output(clean_dir)[-3000:]
    assert (clean_dir / "FINISHED").is_file() and (preempted_dir / "FINISHED").is_file()
    direct = losses(direct_dir)
    assert [s for s, *_ in direct] == list(range(1, STEPS + 1))
    assert losses(clean_dir) == direct  # same processes, same data order: bitwise
    assert losses(preempted_dir) == direct

    a = final_weights(direct_dir, tmp_path, "direct_hf")
    b = final_weights(preempted_dir, tmp_path, "preempted_hf")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_dependency_chain_of_three_jobs_with_hostile_names(slurm, demo_data, tmp_path):
    """STEPS steps, a third per job (train.exit_interval): three allocations through afterany dependencies;
    the fourth job finds the FINISHED marker and ends the chain. The run dir and the job name carry
    a shell injection attempt, which must stay text."""
    slurm.ensure(nodes=2, cpus=2)
    PWNED.unlink(missing_ok=True)
    run_dir = tmp_path / f"run {HOSTILE}"
    first = launch("tiny_cpu", "cluster=local", "cluster.gpus_per_node=1", "cluster.cpus_per_node=1", *SHORT,
                   f"train.exit_interval={STEPS // 3}", "cluster.chain_jobs=6", "cluster.max_restarts=0",
                   f"cluster.job_name={q('chain' + HOSTILE)}", f"train.run_dir={q(run_dir)}", env={"DEMO_DATA": str(demo_data)})
    jobs = [first]
    deadline = time.time() + 900
    while True:
        info = wait_for_job(jobs[-1], max(1, deadline - time.time()))
        successor = run_dir / "slurm" / f"successor_of_{jobs[-1]}"
        if not successor.is_file():
            break
        jobs.append(successor.read_text().strip())
    out = job_output(run_dir)
    assert len(jobs) == 4, out[-3000:]
    states = [job_info(j)["JobState"] for j in jobs]
    assert states == ["COMPLETED"] * 4, (states, out[-3000:])
    assert job_info(jobs[0])["JobName"] == f"chain{HOSTILE}"
    assert logged_steps(out) == list(range(1, STEPS + 1))
    assert out.count("continues") == 2 and "requeueing" not in out
    assert "the run is finished" in out and (run_dir / "FINISHED").is_file()
    assert [s for s, *_ in losses(run_dir)] == list(range(1, STEPS + 1))
    assert not PWNED.exists()


def test_chain_stops_after_max_failures(slurm, demo_data, tmp_path):
    slurm.ensure(nodes=2, cpus=2)
    run_dir = tmp_path / "failing"
    # The tokenizer path is wrong: every job's training fails at its data check.
    first = launch("tiny_cpu", "cluster=local", "cluster.gpus_per_node=1", *SHORT, "cluster.chain_jobs=5",
                   "cluster.max_failures=2", "data.tokenizer_model=/nonexistent/tokenizer.model",
                   f"train.run_dir={run_dir}", env={"DEMO_DATA": str(demo_data)})
    jobs = [first]
    while True:
        wait_for_job(jobs[-1], 300)
        successor = run_dir / "slurm" / f"successor_of_{jobs[-1]}"
        if not successor.is_file():
            break
        jobs.append(successor.read_text().strip())
    out = job_output(run_dir)
    assert [job_info(j)["JobState"] for j in jobs] == ["FAILED"] * 3, out[-3000:]
    assert out.count("training failed (exit code 1)") == 2  # torchrun's code for a failed worker
    assert out.count("error: data.tokenizer_model: /nonexistent/tokenizer.model does not exist") == 2
    assert "the chain stops: 2 job(s) in a row failed (cluster.max_failures=2)" in out


def test_65b_paper_script_on_a_fake_256_node_8_gpu_cluster(slurm, tmp_path):
    """sbatch --test-only accepts the paper's 65B job, and running it with a stub in place of
    torchrun shows what each of the 256 node tasks would start."""
    slurm.ensure(nodes=256, cpus=128, gpus=8)
    run_dir = tmp_path / "llama_65b"
    script, text, layout = prepare("llama_65b_pretrain", [f"train.run_dir={run_dir}"], cwd=tmp_path)
    assert layout == {"world_size": 2048, "tensor": 8, "pipeline": 4, "data": 64, "notes": []}
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", text, re.M))
    assert directives["nodes"] == "256" and directives["ntasks-per-node"] == "1"
    assert directives["gres"] == "gpu:8" and directives["cpus-per-task"] == "128"
    assert directives["time"] == "2-00:00:00" and "exclusive" in directives and directives["mem"] == "0"
    r = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr
    too_big = subprocess.run(["sbatch", "--test-only", "--nodes=257", str(script)], capture_output=True, text=True)
    assert too_big.returncode != 0  # the check above can fail

    stub_dir = tmp_path / "stub"
    stub_dir.mkdir()
    (stub_dir / "torchrun").write_text(
        "#!/bin/bash\n"
        "# Stands in for torchrun: records what this node's task would start.\n"
        'printf "%s\\n" "$@" >"$STUB_OUT/args.$SLURM_NODEID"\n'
        'printf "%s %s %s\\n" "$CUDA_VISIBLE_DEVICES" "$MASTER_ADDR" "$OMP_NUM_THREADS" >"$STUB_OUT/env.$SLURM_NODEID"\n'
        'if [ "$SLURM_NODEID" = 0 ]; then echo done >"$(dirname "$(dirname "$RECIPE_FILE")")/FINISHED"; fi\n')
    (stub_dir / "torchrun").chmod(0o755)
    out_dir = tmp_path / "stub_out"
    out_dir.mkdir()
    env = dict(os.environ, PATH=f"{stub_dir}:{os.environ['PATH']}", STUB_OUT=str(out_dir))
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, check=True)
    info = wait_for_job(job.stdout.strip().split(";")[0], 300)
    assert info["JobState"] == "COMPLETED", job_output(run_dir)[-3000:]
    assert info["NumNodes"] == "256" and info["NumTasks"] == "256"
    args = {int(p.suffix[1:]): p.read_text().split("\n")[:-1] for p in out_dir.glob("args.*")}
    assert sorted(args) == list(range(256))  # $SLURM_NODEID expanded per task, on each node
    for node, argv in args.items():
        opts = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        assert int(opts["--nnodes"]) * int(opts["--nproc_per_node"]) == 2048
        assert opts["--rdzv_endpoint"] == "node1:29500" and opts["--rdzv_backend"] == "c10d"
        assert opts["--rdzv_conf"] == f"is_host={'true' if node == 0 else 'false'}"
        assert argv[-3:] == ["llama_plugin.train", "--config", str(run_dir / "slurm" / "recipe.yaml")]
    envs = {tuple(p.read_text().split()) for p in out_dir.glob("env.*")}
    assert envs == {("0,1,2,3,4,5,6,7", "node1", "16")}
    saved = (run_dir / "slurm" / "recipe.yaml").read_text()
    assert "tensor: 8" in saved and "pipeline: 4" in saved


def test_finetune_through_the_template_with_preemption(slurm, demo_data, tmp_path):
    """A fine-tuning recipe (DeepSpeed ZeRO-2 + LoRA) through the same template: 2 fake nodes, USR1
    mid-run -> checkpoint, requeue, resume; its losses equal a direct torchrun run's and it ends
    with the HF export and the FINISHED marker."""
    from llama_plugin.distributed import free_port
    from tests.test_finetune import make_base

    slurm.ensure(nodes=2, cpus=2)
    base = make_base(tmp_path / "base")
    common = [f"base_model={base}", f"data.tokenizer_model={demo_data / 'tokenizer.model'}", "train.epochs=4",
              "train.save_interval=1000"]
    direct_dir, run_dir = tmp_path / "direct", tmp_path / "slurm_run"
    job = launch("tiny_lora_cpu", "cluster=local_2nodes", *common, f"train.run_dir={run_dir}")
    wait_for_job(job, 600, lambda i: i.get("JobState") in TERMINAL or (run_dir / "config.yaml").is_file())
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "llama_plugin.finetune", "tiny_lora_cpu", *common,
                        f"train.run_dir={direct_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    info = wait_for_job(job, 900, lambda i: i.get("JobState") in TERMINAL and i.get("Restarts") == "1"
                        or i.get("JobState") in TERMINAL - {"COMPLETED"})
    out = job_output(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out[-3000:]
    assert "USR1: asking training to checkpoint and stop" in out and "requeueing" in out
    rows = lambda d: [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    direct = rows(direct_dir)
    assert [s for s, *_ in direct] == list(range(1, 17))
    assert rows(run_dir) == direct  # resumed exactly: same data order, optimizer state and schedule
    assert (run_dir / "FINISHED").is_file() and (run_dir / "hf_export" / "config.json").is_file()
    assert json.loads((run_dir / "FINISHED").read_text())["step"] == 16


# ------------------------------------------------- stability on the cluster (llama_plugin/stability)

# One node, 2 processes (data parallel), tiny shapes: the fault-injection runs of test_fault_injection.
FAULT_RUN = ["tiny_cpu", "cluster=local", "parallel=cpu_single", "model.num_layers=2", "model.hidden_size=64",
             "train.steps=12", "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_interval=100",
             "train.eval_batches=0", "train.save_interval=3", "optimizer.warmup_steps=3", "logging.progress_bar=false",
             "logging.wandb_mode=disabled", "logging.log_interval=1", "stability.sdc_check_interval=3"]


def test_silent_data_corruption_requeues_the_run_without_the_node(slurm, demo_data, tmp_path):
    """bf16, DP=2. From step 5 rank 1's first MLP projection flips a mantissa bit in every other
    output, on node1 only (a faulty device). The recomputation check at step 6 (interval 3) names
    rank 1 on node1 alone; the run checkpoints (step 5) and exits with the SDC code; the script hands
    the run to a replacement job that excludes node1; it resumes on node2 and finishes."""
    from llama_plugin.run_files import EXIT_SDC

    slurm.ensure(nodes=2, cpus=2)
    run_dir = tmp_path / "run"
    first = launch(*FAULT_RUN, "train.steps=8", "train.precision=bf16", "faults.bitflip_from_step=5", "faults.bitflip_rank=1", "faults.bitflip_node=node1",
                   f"train.run_dir={run_dir}", env={"DEMO_DATA": str(demo_data)})
    info = wait_for_job(first, 600)
    out = job_output(run_dir)
    assert info["NodeList"] == "node1", out[-3000:]
    replaced = run_dir / "slurm" / f"replaced_by_{first}"
    assert replaced.is_file(), out[-3000:]
    second = replaced.read_text().strip()
    info = wait_for_job(second, 600)
    out = job_output(run_dir)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node2" and info["ExcNodeList"] == "node1", out[-3000:]
    assert re.search(r"silent data corruption at step 6: rank 1 on node1 computed", out)  # rank 1 alone
    assert f"exitcode  : {EXIT_SDC}" in out  # torchrun's report of the workers
    assert '"ranks": [1], "hosts": ["node1"], "exclude_hosts": ["node1"]' in out
    assert "sdc: node(s) node1 excluded from now on" in out and f"requeued as job {second} (restart 1 of 3)" in out
    assert "resumed from" in out and "step_00000005 (step 5)" in out
    assert (run_dir / "FINISHED").is_file()
    assert [r[0] for r in losses(run_dir)] == list(range(1, 9))


def test_a_hang_hands_the_run_to_the_next_job_and_it_finishes(slurm, demo_data, tmp_path):
    """Rank 1 stops at step 2 (before any checkpoint); after hang_timeout_s (10 s) every rank's
    watchdog dumps its stacks and exits; rank 0's names rank 1 (the one not waiting in a collective)
    and the job asks for a requeue without its node, and in a chain its waiting successor takes over (a plain `scontrol requeue` adds Slurm's requeue delay; the preemption test
    covers that branch) and finishes the run."""
    slurm.ensure(nodes=2, cpus=2)
    run_dir = tmp_path / "run"
    first = launch(*FAULT_RUN, "train.steps=6", "cluster.chain_jobs=2", "faults.hang_at_step=2",
                   "faults.hang_rank=1", "stability.hang_timeout_s=10", f"train.run_dir={run_dir}",
                   env={"DEMO_DATA": str(demo_data)})
    wait_for_job(first, 600)
    successor = (run_dir / "slurm" / f"successor_of_{first}").read_text().strip()
    info = wait_for_job(successor, 600)
    out = job_output(run_dir)
    assert info["JobState"] == "COMPLETED", out[-3000:]
    assert '"reason": "hang"' in out and f"chain job {successor} continues" in out
    # rank 1 was not waiting for anyone: it alone is named, and its node is left out from now on
    assert '"ranks": [1], "hosts": ["node1"], "exclude_hosts": ["node1"]' in out, out[-3000:]
    assert job_info(successor)["NodeList"] == "node2"
    stacks = {p.name.split("-rank")[1][0]: p.read_text() for p in (run_dir / "incidents").glob("hang-step2-*.txt")}
    assert sorted(stacks) == ["0", "1"]
    idle = float(re.search(r"no step finished for (\d+) s", stacks["1"]).group(1))
    assert 10 <= idle <= 10 + 10  # fired within hang_timeout_s + 10 s
    assert "in before_step" in stacks["1"]  # the hung rank's own stack shows where it stopped
    assert "torch/distributed/" in stacks["0"].split("Thread")[-1]  # the other waits in a collective
    assert (run_dir / "FINISHED").is_file() and [r[0] for r in losses(run_dir)] == list(range(1, 7))
    assert not (run_dir / "slurm" / "chain_failures").exists()  # the good segment reset the count


def test_stop_ends_a_chain_and_a_live_run_refuses_a_second_launch(slurm, demo_data, tmp_path):
    """A chain (its successor waiting) with a secret in cluster.env: a second launch onto the run is
    refused; slurm.stop cancels the successor and the running job checkpoints and ends; the secret's
    value is in no file of the run."""
    slurm.ensure(nodes=2, cpus=2)
    run_dir = tmp_path / "run"
    secret = "s3cr3t-value-4711"
    args = [*FAULT_RUN, "train.steps=200", "cluster.chain_jobs=3", "stability.sdc_check_interval=0",
            f"+cluster.env.WANDB_API_KEY={secret}", f"train.run_dir={run_dir}"]
    first = launch(*args, env={"DEMO_DATA": str(demo_data)})
    jsonl = run_dir / "metrics.jsonl"
    wait_for_job(first, 600, lambda i: i.get("JobState") in TERMINAL or (jsonl.is_file() and len(jsonl.read_text().splitlines()) >= 2))
    successor = (run_dir / "slurm" / f"successor_of_{first}").read_text().strip()
    again = subprocess.run([sys.executable, "-m", "slurm.launch", *args, *VENV], capture_output=True, text=True,
                           env=dict(os.environ, DEMO_DATA=str(demo_data)), cwd=ROOT, timeout=300)
    assert again.returncode == 2 and "has live Slurm jobs" in again.stderr and "python -m slurm.stop" in again.stderr
    r = subprocess.run([sys.executable, "-m", "slurm.stop", str(run_dir), "--wait"], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    assert job_info(successor)["JobState"] == "CANCELLED" and job_info(first)["JobState"] == "COMPLETED"
    out = job_output(run_dir)
    assert "the run was stopped by slurm.stop: no requeue, no successor" in out, out[-3000:]
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["stopped"] and not state["finished"] and (run_dir / "checkpoints" / f"step_{state['step']:08d}").is_dir()
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []
    assert "WANDB_API_KEY:?" in (run_dir / "slurm" / "job.sbatch").read_text()  # the job checks it arrived
