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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of a tiny model (and the model), written by save_checkpoint in a world of one."""
    init_distributed(1, 1)
    model_cfg = OmegaConf.create(dict(name="t", num_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_query_groups=None, ffn_hidden_size=128, ffn_multiple_of=256,
                                      vocab_size=256, seq_length=32, norm_epsilon=1e-6, rotary_base=10000.0,
                                      init_method_std=0.02, share_embeddings_and_output_weights=False,
                                      transformer_impl="local"))
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


def test_checkpoint_without_manifest_is_accepted_as_older_format(copy):
    (copy / manifest.MANIFEST).unlink()
    assert manifest.verify(copy) is None and manifest.read_manifest(copy) is None


def test_set_aside_keeps_the_damaged_checkpoint_out_of_the_way(copy):
    aside = checkpoint.set_aside(copy)
    assert aside.name == "step_00000001.corrupt-1" and aside.is_dir() and not copy.exists()
    assert checkpoint.complete_checkpoints(copy.parent) == []
    checkpoint.prune_checkpoints(copy.parent, 1)
    assert aside.is_dir()  # pruning never deletes it
