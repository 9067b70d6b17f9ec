"""Every rung of the stability machinery, proved by injecting its fault into real training runs
(recipe group `faults`): a NaN gradient on one rank, a loss spike, a slow rank, 20 kill -9s with
damaged checkpoints. Tiny shapes (2 layers, hidden 64) on gloo. The faults whose answer is a
requeue (a bit flip in one rank's linear layer, a hung rank) run through the local Slurm in
tests/test_slurm.py, which checks detection and the requeue together."""

import json
import re

import pytest
import torch

from tests.conftest import torchrun
from tests.test_training import final_weights

TINY = ["tiny_cpu", "model.num_layers=2", "model.hidden_size=64", "train.steps=12", "train.global_batch_size=8",
        "train.micro_batch_size=2", "train.eval_interval=100", "train.eval_batches=0", "train.save_interval=2",
        "optimizer.warmup_steps=3", "logging.progress_bar=false", "logging.wandb_mode=disabled",
        "logging.log_interval=1", "stability.spike_warmup_steps=4", "stability.spike_window=3",
        "stability.rollback_steps=3", "stability.skip_batches=2", "stability.data_reserve_batches=8",
        "stability.sdc_check_interval=3"]
DP2 = ["parallel=cpu_single"]  # two data-parallel replicas: a NaN on one shows only in its own norm


def train(demo_data, run_dir, *extra, check=True, nproc=2):
    r = torchrun([*TINY, f"train.run_dir={run_dir}", *extra], {"DEMO_DATA": str(demo_data)}, nproc=nproc)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def rows(run_dir, name="metrics.jsonl"):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def nan_and_spike(demo_data, tmp_path_factory):
    """A run with a NaN in rank 1's gradients at step 3, a 10x loss spike at step 9 and a slow rank 1;
    and the reference: a clean run told by a ledger, from the start, to leave out the batches the
    faults cost (batch 2, whose update the NaN voided, and batches 6..10, which the rollback to step
    6 skips: the three that led into the spike, then skip_batches=2 more), stopped after the same 11
    updates."""
    root = tmp_path_factory.mktemp("faults")
    fault = train(demo_data, root / "fault", *DP2, "logging.wandb_mode=offline", "faults.nan_grad_at_step=3",
                  "faults.nan_grad_rank=1", "faults.loss_spike_at_step=9", "faults.straggler_rank=1",
                  "faults.straggler_sleep_s=0.3")
    (root / "ref").mkdir()
    (root / "ref" / "skipped_batches.json").write_text(json.dumps(
        {"entries": [{"at_step": 2, "skip": 1}, {"at_step": 5, "skip": 5}]}))
    ref = train(demo_data, root / "ref", *DP2, "train.exit_at_step=11")
    # paused, not finished: a Slurm chain ends here instead of resubmitting jobs that exit at once
    assert json.loads((root / "ref" / "PAUSED").read_text()) == {"step": 11, "exit_at_step": 11}
    assert not (root / "ref" / "FINISHED").exists()
    return root, fault, ref


def test_nan_and_spike_leave_the_weights_of_a_run_that_skipped_those_batches(nan_and_spike, tmp_path):
    root, fault, _ = nan_and_spike
    ledger = json.loads((root / "fault" / "skipped_batches.json").read_text())["entries"]
    assert [(e["at_step"], e["skip"], e["detected_at_step"], e["checkpoint"]) for e in ledger] == [
        (6, 5, 9, "step_00000006")]
    assert "> mean" in ledger[0]["reason"]
    a = final_weights(root / "fault", tmp_path, "fault")  # its step 12 = 11 updates
    b = final_weights(root / "ref", tmp_path, "ref")  # its step 11
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The rolled-back checkpoint (step 8) is gone; one old enough for a rollback is kept.
    assert sorted(p.name for p in (root / "fault" / "checkpoints").iterdir()) == ["step_00000010", "step_00000012"]
    assert "update skipped on every rank" in fault.stdout and "rolled back to step_00000006" in fault.stdout


def test_skips_and_spikes_are_counted_in_jsonl_wandb_and_run_state(nan_and_spike):
    from tests.wandb_reader import read_run

    root, _, _ = nan_and_spike
    m = rows(root / "fault")
    assert [r["step"] for r in m] == list(range(1, 13))  # one row per step of the kept trajectory
    assert [r["step"] for r in rows(root / "fault", "metrics.rolled_back.jsonl")] == [7, 8, 9]
    assert [r["train/skipped_update"] for r in m] == [0, 0, 1] + [0] * 9
    assert (m[5]["stability/spikes"], m[6]["stability/spikes"], m[6]["stability/rollbacks"]) == (0, 1, 1)
    assert m[-1]["stability/skipped_steps"] == 1 and m[-1]["stability/skipped_batches"] == 5
    history, _, _ = read_run(next((root / "fault" / "wandb").glob("offline-run-*/run-*.wandb")))
    # W&B's history only grows: the replayed steps 7..9 come after the spike, under new W&B steps.
    assert [h["train/step"] for h in history] == list(range(1, 10)) + list(range(7, 13))
    assert history[8]["train/loss"] > 5 * history[7]["train/loss"]  # the spike itself
    assert history[-1]["stability/rollbacks"] == 1 and history[-1]["stability/skipped_batches"] == 5
    state = json.loads((root / "fault" / "run_state.json").read_text())
    # SDC probes every 3 steps: 3, 6, 9, then 9 and 12 again after the rollback to step 6
    assert state["stability"] == {"spikes": 1, "rollbacks": 1, "skipped_steps": 1, "skipped_batches": 5, "sdc_probes": 5}
    g = state["goodput"]
    assert g["rollback"] > 0 and g["skipped_steps"] > 0 and g["sdc_checks"] > 0 and g["checkpoint_save"] > 0
    assert sum(v for k, v in g.items() if k != "wall") <= g["wall"]
    assert 0 < state["goodput_share"] == pytest.approx(g["productive"] / g["wall"])


def test_a_slow_rank_is_flagged(nan_and_spike):
    _, fault, ref = nan_and_spike
    flagged = re.findall(r"straggler\(s\): rank (\d) \(\S+\) at ([\d.]+)x", fault.stdout)
    assert len(flagged) >= 10 and {r for r, _ in flagged} == {"1"}
    # Every rank's step time is logged at every logged step (here every step, replays included).
    times = rows(nan_and_spike[0] / "fault", "step_times.jsonl")
    assert [r["step"] for r in times] == list(range(1, 10)) + list(range(7, 13))
    assert all(len(r["ms"]) == 2 for r in times)
    # rank 1 sleeps 0.3 s a step: it is that much slower in (nearly) every row; a loaded host can
    # stall rank 0 for a step now and then, so one row in five may miss
    slower = [r["ms"][1] - r["ms"][0] for r in times]
    assert sum(d >= 250 for d in slower) >= 0.8 * len(times) and sorted(slower)[len(slower) // 2] >= 250, slower
    assert "straggler" not in ref.stdout  # and no rank is flagged without the sleep
    assert "silent data corruption" not in fault.stdout + fault.stderr + ref.stdout + ref.stderr  # no false alarm


def test_non_finite_steps_in_a_row_roll_back_like_a_spike(demo_data, tmp_path):
    """NaN gradients in steps 5 and 6 with max_consecutive_skips=2: the second skip rolls back to the
    newest checkpoint at least rollback_steps=2 before step 6 (step 4) and skips from there through
    the batches of the voided steps (4 and 5) plus skip_batches=2 (6 and 7). The reference is a clean
    run whose ledger leaves out those batches from the start; both end after 8 updates with bitwise
    equal weights."""
    one = ["parallel=cpu_single", "train.steps=8", "stability.spike_detection=false", "stability.rollback_steps=2",
           "stability.max_consecutive_skips=2", "stability.sdc_check_interval=0"]
    fault = train(demo_data, tmp_path / "fault", *one, "faults.nan_grad_at_step=5", "faults.nan_grad_steps=2",
                  nproc=1)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "skipped_batches.json").write_text(json.dumps({"entries": [{"at_step": 4, "skip": 4}]}))
    train(demo_data, tmp_path / "ref", *one, nproc=1)
    ledger = json.loads((tmp_path / "fault" / "skipped_batches.json").read_text())["entries"]
    assert [(e["at_step"], e["skip"], e["detected_at_step"], e["checkpoint"]) for e in ledger] == [
        (4, 4, 6, "step_00000004")]
    assert "2 non-finite steps in a row" in ledger[0]["reason"]
    m = rows(tmp_path / "fault")
    assert [r["step"] for r in m] == list(range(1, 9))
    assert [r["step"] for r in rows(tmp_path / "fault", "metrics.rolled_back.jsonl")] == [5, 6]
    assert (m[-1]["stability/skipped_steps"], m[-1]["stability/rollbacks"], m[-1]["stability/spikes"]) == (2, 1, 0)
    a = final_weights(tmp_path / "fault", tmp_path, "fault_hf")
    b = final_weights(tmp_path / "ref", tmp_path, "ref_hf")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fault.stdout.count("update skipped on every rank") == 2


KILL9 = ["parallel=cpu_single", "model.num_layers=2", "model.hidden_size=64", "train.steps=240",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=1000", "train.eval_batches=0",
         "train.save_interval=4", "optimizer.warmup_steps=3", "logging.progress_bar=false",
         "logging.wandb_mode=disabled", "logging.log_interval=1", "stability.sdc_check_interval=0"]


def test_twenty_kill_9s_and_two_damaged_checkpoints_end_bitwise_equal(demo_data, tmp_path):
    """One process (forked per segment, tests/kill9_server.py) killed with SIGKILL 20 times at
    random moments tied to the run's progress (after a seeded 1-8 logged steps, then up to 0.3 s:
    during steps, saves, metric appends), so a slow host moves the kills but cannot keep a segment
    from loading; after the 7th and 14th kill the newest checkpoint gets a flipped byte / a
    truncated file. Every resume loads the newest verified checkpoint; the final weights and every
    logged loss equal an uninterrupted run's."""
    import subprocess
    import sys

    from tests.test_training import losses

    with open(tmp_path / "server.log", "w") as log:  # a file, not a pipe: no orphan can hold it open
        r = subprocess.run([sys.executable, "-m", "tests.kill9_server", "--demo-data", str(demo_data), "--root",
                            str(tmp_path), "--kills", "20", "--seed", "0", "--min-steps", "1", "--max-steps", "8", "--max-delay", "0.3",
                            *KILL9], stdout=log, stderr=subprocess.STDOUT, timeout=600)
    assert r.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    segments = report["segments"]
    resumed = [re.findall(r"resumed from \S+/(step_\d+) ", s["log"]) for s in segments]
    for seg, got in zip(segments, resumed):  # each segment logged steps before its kill: it loaded
        assert got == ([seg["expected_resume"]] if seg["expected_resume"] else []), (seg["expected_resume"], got)
    assert sum(1 for got in resumed if got) >= 15
    assert sum(s["during_save"] for s in segments) >= 1, "no kill landed during a checkpoint save"
    damaged = [s["damaged"] for s in segments if "damaged" in s]
    assert [d["how"] for d in damaged] == ["flip", "truncate"]
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step_*.corrupt-*"))) == 2
    assert report["final"]["exit"] == 0 and report["reference"]["exit"] == 0, report["final"]["log"][-2000:]
    assert re.findall(r"resumed from \S+/(step_\d+) ", report["final"]["log"]) == [report["final"]["expected_resume"]]
    ref, killed = losses(tmp_path / "reference"), losses(tmp_path / "killed")
    assert [s for s, *_ in ref] == list(range(1, 241)) and killed == ref
    a, b = final_weights(tmp_path / "reference", tmp_path, "ref_hf"), final_weights(tmp_path / "killed", tmp_path, "killed_hf")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_device_that_keeps_producing_nan_is_named_for_a_requeue_after_capped_rollbacks(demo_data, tmp_path):
    """On the LLaMA-7B recipe's shape (data parallel, distributed optimizer with overlapped reduce
    and gather, bf16): rank 1 puts a NaN into its gradients in every step from step 6 on, replays
    included. Two non-finite steps in a row roll back (to step 4); after stability.max_rollbacks=2
    rollbacks that never got past step 7 the run does not roll back again: it exits for a requeue
    naming rank 1 and its node, and the verified checkpoint stays."""
    from llama_plugin.run_files import node_name
    from llama_plugin.stability import manifest
    from tests.test_production_shaped import shrunk

    run = tmp_path / "run"
    args = [*shrunk("llama_7b_pretrain"), f"train.run_dir={run}", "faults.nan_grad_at_step=6",
            "faults.nan_grad_steps=1000", "faults.nan_grad_rank=1", "stability.max_consecutive_skips=2"]
    r = torchrun(args, {"DEMO_DATA": str(demo_data)})
    assert r.returncode != 0
    assert r.stdout.count("rolled back to step_00000004") == 2, r.stdout[-3000:]
    assert "ranks [1] produced non-finite values" in r.stdout
    request = json.loads((run / "requeue.json").read_text())
    assert request == {"reason": "nonfinite", "step": 7, "ranks": [1], "hosts": [node_name()],
                       "exclude_hosts": [node_name()]}
    assert f"produced by rank 1 on {node_name()}; exiting (75) for a requeue" in r.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000004"]
    assert manifest.verify(run / "checkpoints" / "step_00000004") is None


def test_a_lasting_loss_rise_is_accepted_after_capped_rollbacks(demo_data, tmp_path):
    """The loss seen is 10x from step 6 on for good: two rollbacks (each back to step 2) meet it
    again; the third detection accepts it as the new level and the run finishes."""
    r = train(demo_data, tmp_path / "run", "parallel=cpu_single", "faults.loss_spike_at_step=6",
              "faults.loss_spike_steps=1000", "stability.sdc_check_interval=0", nproc=1)
    assert r.stdout.count("rolled back to step_00000002") == 2, r.stdout[-3000:]
    assert "after 2 rollback(s) in a row (stability.max_rollbacks): a lasting change of the loss, accepted" in r.stdout
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert state["finished"] and state["stability"]["rollbacks"] == 2 and state["stability"]["spikes"] == 3


def test_a_run_directory_that_lost_its_skip_ledger_is_refused(nan_and_spike, demo_data, tmp_path):
    """A copy of the faulted run without skipped_batches.json would read other data from its
    step-12 checkpoint on; the resume compares the samples the ledger implies with the checkpoint's."""
    import shutil

    root, _, _ = nan_and_spike
    shutil.copytree(root / "fault", tmp_path / "copy")
    (tmp_path / "copy" / "skipped_batches.json").unlink()
    r = train(demo_data, tmp_path / "copy", *DP2, check=False)
    assert r.returncode != 0
    assert "the run directory lost (or gained) its skip ledger" in r.stderr and "skipped_batches.json" in r.stderr


@pytest.mark.parametrize("faulty", [0, 1])
def test_sdc_names_the_pipeline_stage_that_computed_wrongly_not_the_ones_after_it(demo_data, tmp_path, faulty):
    """The 65B recipe's shape (PP=2, bf16, distributed optimizer, probe every 4 steps): a bit flip in
    stage `faulty`'s forward changes what every later stage receives and every earlier stage's
    gradients; only the rank whose inputs were equal in both passes is named."""
    from tests.test_production_shaped import shrunk

    run = tmp_path / "run"
    r = torchrun([*shrunk("llama_65b_pretrain"), f"train.run_dir={run}", "faults.bitflip_from_step=3",
                  f"faults.bitflip_rank={faulty}"], {"DEMO_DATA": str(demo_data)})
    assert r.returncode != 0
    request = json.loads((run / "requeue.json").read_text())
    assert (request["reason"], request["step"], request["ranks"]) == ("sdc", 4, [faulty]), r.stderr[-2000:]
