"""Verified checkpoints: a manifest with a checksum per file; a torn or corrupted checkpoint is
detected (naming the file) and never loaded. Faults are injected into real checkpoints."""

import shutil

import pytest
import torch
from omegaconf import OmegaConf

from llama_plugin import checkpoint
from llama_plugin.distributed import init_distributed
from llama_plugin.model import build_gpt_model, transformer_config
from llama_plugin.stability import manifest
from recipes import validate
from recipes.schema import ModelConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of a tiny model (and the model), written by save_checkpoint in a world of one."""
    init_distributed(1, 1)
    model_cfg = validate(OmegaConf.create(dict(name="t", num_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_query_groups=None, ffn_hidden_size=128, ffn_multiple_of=256,
                                      vocab_size=256, seq_length=32, norm_epsilon=1e-6, rotary_base=10000.0,
                                      init_method_std=0.02, share_embeddings_and_output_weights=False,
                                      transformer_impl="local")), ModelConfig)
    model = build_gpt_model(model_cfg, transformer_config(model_cfg))
    out = tmp_path_factory.mktemp("ckpt") / "step_00000001"
    checkpoint.save_checkpoint([model], out, model_cfg, torch.float32, train_state={"step": 1})
    return out, model


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "step_00000001"
    shutil.copytree(saved[0], dst)
    return dst


def test_manifest_lists_every_file_with_its_checksum(saved):
    ckpt, _ = saved
    m = manifest.read_manifest(ckpt)
    on_disk = sorted(p.name for p in ckpt.iterdir() if p.name != manifest.MANIFEST)
    assert sorted(m["files"]) == on_disk and "train_state.json" in on_disk and "__0_0.distcp" in on_disk
    import hashlib

    for name, entry in m["files"].items():  # recomputed here with hashlib directly
        data = (ckpt / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert len(m["config_sha256"]) == 64
    assert manifest.verify(ckpt) is None


def _largest_distcp(ckpt):
    return max(ckpt.glob("__*.distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("fault,expect", [
    ("flip_byte", "checksum differs"), ("truncate", "bytes, the manifest says"), ("delete", "missing"),
    ("torn_manifest", "manifest.json: unreadable"), ("edit_train_state", "train_state.json: checksum differs"),
])
def test_a_damaged_checkpoint_fails_verification_naming_the_file(copy, fault, expect):
    target = _largest_distcp(copy)
    if fault == "flip_byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif fault == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif fault == "delete":
        target.unlink()
    elif fault == "torn_manifest":
        target = copy / manifest.MANIFEST
        target.write_text(target.read_text()[:40])
    else:
        target = copy / "train_state.json"
        target.write_text(target.read_text().replace('"step": 1', '"step": 7'))  # same size, other content
    reason = manifest.verify(copy)
    assert reason is not None and expect in reason and (fault == "torn_manifest" or target.name in reason), reason


def test_checkpoint_without_manifest_is_accepted_only_if_it_predates_manifests(copy):
    import json

    (copy / manifest.MANIFEST).unlink()  # half deleted: its model record says it had one
    assert "manifest.json: missing, though llama_model.json says" in manifest.verify(copy)
    record = json.loads((copy / checkpoint.MODEL_FILE).read_text())
    del record["manifest"]  # as written before manifests
    (copy / checkpoint.MODEL_FILE).write_text(json.dumps(record))
    assert manifest.verify(copy) is None and manifest.read_manifest(copy) is None
    (copy / checkpoint.MODEL_FILE).unlink()  # and without a record it is no checkpoint at all
    assert "llama_model.json is unreadable: an incomplete checkpoint" in manifest.verify(copy)


def test_a_rollback_sets_abandoned_checkpoints_aside_and_pruning_removes_them_once_passed(tmp_path):
    from llama_plugin.stability.rollback import set_aside_abandoned

    for step in (4, 6, 8):
        d = tmp_path / checkpoint.step_dir_name(step)
        d.mkdir()
        (d / checkpoint.MODEL_FILE).write_text("{}")
        (d / checkpoint.TRAIN_STATE_FILE).write_text("{}")
    moved = set_aside_abandoned(tmp_path, 4)
    assert sorted(p.name for p in moved) == ["step_00000006.abandoned-0", "step_00000008.abandoned-0"]
    assert [k for k, _ in checkpoint.complete_checkpoints(tmp_path)] == [4]
    checkpoint.prune_checkpoints(tmp_path, 2)
    assert len(list(tmp_path.glob("*.abandoned-*"))) == 2  # the kept trajectory has not passed them
    d = tmp_path / checkpoint.step_dir_name(6)  # the replay saves step 6 again
    d.mkdir()
    (d / checkpoint.MODEL_FILE).write_text("{}")
    (d / checkpoint.TRAIN_STATE_FILE).write_text("{}")
    checkpoint.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006", "step_00000008.abandoned-0"]


def test_rollback_plan_restarts_rollback_steps_before_the_spike_and_skips_through_it(tmp_path, monkeypatch):
    """PaLM's protocol with the recipe's numbers: checkpoints every 1000 steps, a spike at step
    1500, rollback_steps 100, skip_batches 200: the run reloads step 1000, replays the data up to
    step 1400 and skips the 100 batches leading into the spike and 200 after, so the spike's batch
    (1499) is never read again."""
    from llama_plugin.stability import rollback
    from llama_plugin.stability.ledger import SkipLedger

    monkeypatch.setattr(rollback, "rollback_target", lambda root, limit, at: (1000, tmp_path / "step_00001000"))
    plan = rollback.plan(tmp_path, 1500, 100, 200)
    assert (plan.target_step, plan.skip_from_step, plan.skip) == (1000, 1400, 300)
    ledger = SkipLedger(tmp_path / "l.json", 1000)
    before = [ledger.batch_index(s) for s in range(1000, 1500)]
    ledger.add(plan.skip_from_step, plan.skip, write=True)
    after = [ledger.batch_index(s) for s in range(1000, 1800)]
    assert after[:400] == before[:400]  # steps 1000..1399 replay the same batches
    assert 1499 not in after and after[400] == 1700  # the spike's batch skipped, 200 more after it


def test_set_aside_keeps_the_damaged_checkpoint_out_of_the_way(copy):
    aside = checkpoint.set_aside(copy)
    assert aside.name == "step_00000001.corrupt-1" and aside.is_dir() and not copy.exists()
    assert checkpoint.complete_checkpoints(copy.parent) == []
    checkpoint.prune_checkpoints(copy.parent, 1)
    assert aside.is_dir()  # pruning never deletes it


# --- the spike detector, the skip ledger and checkpoint retention (pure functions) ---


def test_spike_detector_matches_mean_and_std_computed_with_numpy():
    import numpy as np

    from llama_plugin.stability.spikes import SpikeDetector

    rng = np.random.default_rng(0)
    losses = list(3.0 + 0.05 * rng.standard_normal(60))
    losses[40] = 3.4  # a spike by both rules
    losses[50] = float("nan")  # not a spike: non-finite steps are skipped, counted elsewhere
    d = SpikeDetector(window=20, warmup_steps=25, std_factor=6.0, ratio=1.5)
    window, flagged = [], []
    for step, loss in enumerate(losses, start=1):
        expected = False
        if np.isfinite(loss) and step > 25 and len(window) == 20:
            expected = loss > np.mean(window) + 6.0 * np.std(window) or loss > 1.5 * np.mean(window)
        got = d.check(step, loss)
        assert (got is not None) == expected, (step, loss, got)
        if got:
            flagged.append(step)
        elif np.isfinite(loss):
            window = (window + [loss])[-20:]
    assert flagged == [41]
    restored = SpikeDetector(20, 25, 6.0, 1.5)
    restored.load_state_dict(__import__("json").loads(__import__("json").dumps(d.state_dict())))
    assert list(restored.losses) == window  # exact through JSON, as in train_state.json


def test_ratio_rule_alone_and_warmup():
    from llama_plugin.stability.spikes import SpikeDetector

    d = SpikeDetector(window=3, warmup_steps=5, std_factor=None, ratio=2.0)
    assert [d.check(s, 1.0) for s in range(1, 6)] == [None] * 5
    assert d.check(6, 1.9) is None and d.check(7, 5.0).startswith("loss 5.0000 > 2 x mean")


def test_ledger_maps_steps_to_batches_as_the_protocol_says(tmp_path):
    from llama_plugin.stability.ledger import LedgerError, SkipLedger

    ledger = SkipLedger(tmp_path / "skipped_batches.json", reserve=10)
    assert ledger.add(3, 4, write=True, reason="spike") == 4
    assert ledger.add(8, 5, write=True) == 5
    assert ledger.add(9, 5, write=True) == 1  # the reserve (10) has 1 left
    again = SkipLedger(tmp_path / "skipped_batches.json", reserve=10)
    assert again.entries == ledger.entries and again.skipped_total == 10
    # Written out by hand: steps 0-2 read batches 0-2; from step 3 on 4 later; from 8, 9 later; from 9, 10.
    expected = [0, 1, 2, 7, 8, 9, 10, 11, 17, 19, 20]
    assert [again.batch_index(s) for s in range(11)] == expected
    covered = [b for first, stop in again.batch_ranges(11) for b in range(first, stop)]
    assert covered == expected
    (tmp_path / "skipped_batches.json").write_text('{"entries": [{"at_step": 1}]}')
    with pytest.raises(LedgerError, match="skipped_batches.json: unreadable"):
        SkipLedger(tmp_path / "skipped_batches.json", reserve=10)
    with pytest.raises(LedgerError, match="more than the data set's reserve"):
        (tmp_path / "skipped_batches.json").write_text('{"entries": [{"at_step": 1, "skip": 11}]}')
        SkipLedger(tmp_path / "skipped_batches.json", reserve=10)


def test_retention_keeps_a_checkpoint_old_enough_to_roll_back_to(tmp_path):
    for step in (100, 200, 300, 400, 500):
        d = tmp_path / checkpoint.step_dir_name(step)
        d.mkdir()
        (d / checkpoint.MODEL_FILE).write_text("{}")
        (d / checkpoint.TRAIN_STATE_FILE).write_text("{}")
    checkpoint.prune_checkpoints(tmp_path, 2, rollback_steps=150)
    # Newest two (400, 500), and the newest at or before 501 - 150 = 351: 300.
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [300, 400, 500]
    checkpoint.prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [400, 500]


def test_goodput_moves_undone_steps_to_rollback():
    from llama_plugin.stability.goodput import Goodput

    g = Goodput({"productive": 10.0, "wall": 100.0})
    for step in range(1, 6):
        g.step(step, 1.0, kept=step != 2)
    g.rolled_back(3)
    assert g.seconds["productive"] == 10.0 + 2.0 and g.seconds["rollback"] == 2.0 and g.seconds["skipped_steps"] == 1.0
    assert g.state_dict()["wall"] >= 100.0


def test_a_rollback_interrupted_between_its_ledger_and_its_set_aside_is_finished_on_resume(tmp_path):
    """The ledger says: back to step 4. Step 6 was saved before that entry (the rollback died
    before moving it): set aside. Step 8 was saved after it, on the kept trajectory: kept."""
    import json
    import os

    from llama_plugin.stability.rollback import finish_interrupted_rollback

    root = tmp_path / "checkpoints"
    for step in (4, 6, 8):
        d = root / checkpoint.step_dir_name(step)
        d.mkdir(parents=True)
        (d / checkpoint.MODEL_FILE).write_text("{}")
        (d / checkpoint.TRAIN_STATE_FILE).write_text("{}")
    ledger = tmp_path / "skipped_batches.json"
    ledger.write_text(json.dumps({"entries": [{"at_step": 5, "skip": 4, "checkpoint": "step_00000004"}]}))
    os.utime(root / "step_00000004", (1000, 1000))
    os.utime(root / "step_00000006", (2000, 2000))
    os.utime(ledger, (3000, 3000))
    os.utime(root / "step_00000008", (4000, 4000))
    moved = finish_interrupted_rollback(root, ledger)
    assert [p.name for p in moved] == ["step_00000006.abandoned-0"]
    assert [k for k, _ in checkpoint.complete_checkpoints(root)] == [4, 8]
    assert finish_interrupted_rollback(root, ledger) == []  # nothing left to finish
    ledger.write_text(json.dumps({"entries": [{"at_step": 5, "skip": 4}]}))  # a hand-written ledger
    assert finish_interrupted_rollback(root, ledger) == []
