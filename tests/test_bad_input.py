"""Bad input fails early with a message that names the field or file."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_plugin.checkpoint import CheckpointError, read_model_record
from llama_plugin.convert import hf_to_mcore
from llama_plugin.hf import HFFolderError
from llama_plugin.model import ModelConfigError, check_model_shape
from recipes import compose
from recipes.schema import DescribeConfig


def tiny(*overrides):
    return compose("describe", ["model=tiny", *overrides], DescribeConfig).model


@pytest.mark.parametrize("overrides,tp,pp,field", [
    (["model.num_attention_heads=3", "model.hidden_size=63"], 2, 1, "model.num_attention_heads"),
    (["model.num_layers=3"], 1, 2, "model.num_layers"),
    (["model.hidden_size=66"], 1, 1, "model.hidden_size"),
    (["model.num_query_groups=3"], 1, 1, "model.num_query_groups"),
    (["model.vocab_size=511"], 2, 1, "model.vocab_size"),
])
def test_shape_that_does_not_fit_the_layout(overrides, tp, pp, field):
    with pytest.raises(ModelConfigError, match=field.replace(".", r"\.")):
        check_model_shape(tiny(*overrides), tp, pp)


@pytest.fixture
def hf_copy(hf_tiny, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(hf_tiny[0], dst)
    return dst


def test_hf_folder_without_config(hf_copy, tmp_path):
    (hf_copy / "config.json").unlink()
    with pytest.raises(HFFolderError, match="config.json"):
        hf_to_mcore(hf_copy, tmp_path / "out")


def test_hf_folder_without_weights(hf_copy, tmp_path):
    (hf_copy / "model.safetensors").unlink()
    with pytest.raises(HFFolderError, match="model.safetensors"):
        hf_to_mcore(hf_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_folder_missing_a_tensor(hf_copy, tmp_path):
    tensors = load_file(hf_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, hf_copy / "model.safetensors")
    with pytest.raises(HFFolderError, match="model.layers.1.mlp.up_proj.weight"):
        hf_to_mcore(hf_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_folder_with_mismatched_shape(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["intermediate_size"] = 256  # the weights say 192
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFFolderError, match=r"gate_proj.weight.*\(192, 64\).*\(256, 64\)"):
        hf_to_mcore(hf_copy, tmp_path / "out")


def test_hf_folder_with_unsupported_settings(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["attention_bias"] = True
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFFolderError, match="attention_bias"):
        hf_to_mcore(hf_copy, tmp_path / "out")


def test_hf_to_mcore_layout_that_does_not_fit(hf_tiny, tmp_path):
    with pytest.raises(ModelConfigError, match="model.num_attention_heads"):
        hf_to_mcore(hf_tiny[0], tmp_path / "out", tp=3)


def test_checkpoint_directory_checks(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        read_model_record(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="llama_model.json"):
        read_model_record(tmp_path)
    (tmp_path / "llama_model.json").write_text("{}")
    with pytest.raises(CheckpointError, match="metadata.json"):
        read_model_record(tmp_path)
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(CheckpointError, match="unreadable model record"):
        read_model_record(tmp_path)


def test_refuses_to_overwrite_a_checkpoint(hf_tiny, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        hf_to_mcore(hf_tiny[0], tmp_path / "out")


def test_transformer_engine_requested_where_it_does_not_import(tmp_path):
    """model.transformer_impl=te without TransformerEngine: one line naming the field, exit 2,
    before anything is written."""
    import subprocess
    import sys

    from llama_plugin.layers.spec import te_importable

    assert not te_importable()  # this test is about a machine without TE (CI's)
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "llama_plugin.train", "tiny_cpu", "model.transformer_impl=te",
                        f"train.run_dir={run_dir}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.transformer_impl: 'te' needs TransformerEngine" in errors[0], r.stderr
    assert not run_dir.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("log", ["pretraining", "finetuning"])
def test_a_torn_last_metrics_line_does_not_break_the_resume(log, tmp_path):
    """A crash mid-append leaves half a JSON line; the resume drops it with the replayed rows."""
    from omegaconf import OmegaConf

    from llama_plugin.finetune.trainer import JsonlLog
    from llama_plugin.metrics_log import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "tr')
    if log == "pretraining":
        MetricsLog(tmp_path, OmegaConf.create({"wandb_mode": "disabled"}), {"name": "x"}, 2, enabled=True)
    else:
        JsonlLog(path, 2, enabled=True)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
