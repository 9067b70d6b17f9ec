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


# --------------------------------------------------------------------------------------------
# One table of bad inputs over the command lines: recipes and overrides, checkpoints, run
# directories, data files, cluster settings. Each row runs the real CLI entry point (in-process:
# the same main() that `python -m ...` calls) and must give exit code 2, exactly one `error:` line
# naming the field or file, no traceback, and leave every file in its directory as it was.

def _train(*args):
    from llama_plugin.train import main

    return main(["tiny_cpu", *args])


def _train_config(*args):
    from llama_plugin.train import main

    return main(list(args))


def _launch(*args):
    from slurm.launch import main

    return main([*args, "--dry-run"])


def _finetune(*args):
    from llama_plugin.finetune.trainer import main

    return main(["tiny_lora_cpu", *args])


def _convert(*args):
    from llama_plugin.convert import main

    return main(list(args))


def _describe(*args):
    from llama_plugin.describe import main

    return main(list(args))


def _stop(*args):
    from slurm.stop import main

    return main(list(args))


def _fake_checkpoint(root, step, resume_fields):
    """What check_resume reads of a training checkpoint: its model record and train_state.json."""
    from llama_plugin.checkpoint import MODEL_FILE, TRAIN_STATE_FILE, step_dir_name

    d = root / "checkpoints" / step_dir_name(step)
    d.mkdir(parents=True)
    (d / MODEL_FILE).write_text("{}")
    (d / TRAIN_STATE_FILE).write_text(json.dumps({"step": step, "resume_fields": resume_fields}))


def _setup_resume_mismatch(key, value):
    def setup(w):
        from llama_plugin.train import resume_fields
        from recipes import compose as compose_recipe
        from recipes.schema import RecipeConfig
        from llama_plugin.layout import resolve

        cfg, _ = resolve(compose_recipe("tiny_cpu", [f"train.run_dir={w / 'run'}"], RecipeConfig), 2)
        fields = resume_fields(cfg)
        fields[key] = value
        _fake_checkpoint(w / "run", 100, fields)
        return [f"train.run_dir={w / 'run'}"]
    return setup


def _data_without_bin(w):
    shutil.copytree(w / "demo", w / "data")
    (w / "data" / "books_text_document.bin").unlink()
    return [f"data.sources.books.prefix={w / 'data' / 'books_text_document'}"]


def _garbled_ledger(w):
    (w / "run").mkdir()
    (w / "run" / "skipped_batches.json").write_text('{"entries": [{"at_step": "x"}]}')
    return [f"train.run_dir={w / 'run'}"]


def _saved_config(w, extra):
    (w / "recipe.yaml").write_text("name: x\ntrain:\n  steps: 3\n")
    return ["--config", str(w / "recipe.yaml"), *extra]


def _existing_out(w):
    from tests.conftest import make_hf_llama

    make_hf_llama(w / "hf")
    (w / "out").mkdir()
    (w / "out" / "keep.txt").write_text("precious")
    return ["hf-to-mcore", "--hf", str(w / "hf"), "--out", str(w / "out")]


def _hf_without_config(w):
    (w / "hf").mkdir()
    (w / "hf" / "model.safetensors").write_bytes(b"not really")
    return ["hf-to-mcore", "--hf", str(w / "hf"), "--out", str(w / "out")]


def _not_a_checkpoint(w):
    (w / "ckpt").mkdir()
    (w / "ckpt" / "metadata.json").write_text("{}")
    return ["mcore-to-hf", "--ckpt", str(w / "ckpt"), "--out", str(w / "hf_out")]


def _load_other_shape(w):
    from llama_plugin.checkpoint import MODEL_FILE

    d = w / "other"
    d.mkdir()
    record = {"model": dict(name="o", num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=1024,
                            seq_length=128), "params_dtype": "float32"}
    (d / MODEL_FILE).write_text(json.dumps(record))
    (d / "metadata.json").write_text("{}")
    return [f"train.load={d}"]


T, L = _train, _launch
BAD_INPUTS = [
    # recipes and overrides
    ("unknown key", T, ["train.stepz=5"], "stepz"),
    ("added key", T, ["+train.extra=1"], "train.extra"),
    ("wrong type", T, ["train.steps=abc"], "train.steps"),
    ("zero steps", T, ["train.steps=0"], "train.steps: must be > 0"),
    ("precision", T, ["train.precision=fp16"], "train.precision"),
    ("decay style", T, ["optimizer.decay_style=exp"], "optimizer.decay_style"),
    ("beta2", T, ["optimizer.beta2=1.5"], "optimizer.beta2"),
    ("warm-up longer than the run", T, ["optimizer.warmup_steps=1000"], "optimizer.warmup_steps"),
    ("min lr ratio", T, ["optimizer.min_lr_ratio=2"], "optimizer.min_lr_ratio"),
    ("global batch", T, ["train.global_batch_size=15"], "train.global_batch_size"),
    ("tensor parallel size", T, ["parallel.tensor=3"], "parallel.tensor"),
    ("overlap without distopt", T, ["parallel.overlap_param_gather=true"], "parallel.overlap_param_gather"),
    ("layers over stages", T, ["parallel=cpu_single", "parallel.pipeline=2", "model.num_layers=3"], "model.num_layers"),
    ("TE without TE", T, ["model.transformer_impl=te"], "model.transformer_impl"),
    ("gpus_per_node=0 (train)", T, ["cluster.gpus_per_node=0"], "cluster.gpus_per_node"),
    ("exit_at_step past the end", T, ["train.exit_at_step=500"], "train.exit_at_step"),
    ("spike window", T, ["stability.spike_window=0"], "stability.spike_window"),
    ("spike ratio", T, ["stability.spike_ratio=0.5"], "stability.spike_ratio"),
    ("no spike rule", T, ["stability.spike_ratio=null", "stability.spike_std_factor=null"], "stability.spike_std_factor"),
    ("straggler factor", T, ["stability.straggler_factor=1"], "stability.straggler_factor"),
    ("hang timeout", T, ["stability.hang_timeout_s=-1"], "stability.hang_timeout_s"),
    ("fault on a missing rank", T, ["faults.nan_grad_rank=5"], "faults.nan_grad_rank"),
    ("fault at step 0", T, ["faults.hang_at_step=0"], "faults.hang_at_step"),
    ("unknown recipe", _train_config, ["tiny_cpux"], "tiny_cpux"),
    ("saved recipe missing", _train_config, ["--config", "/nonexistent/recipe.yaml"], "/nonexistent/recipe.yaml"),
    ("saved recipe, unknown override", _train_config, lambda w: _saved_config(w, ["train.nope=1"]), "train.nope"),
    # data files
    ("tokenizer missing", T, ["data.tokenizer_model=/nonexistent/tokenizer.model"], "data.tokenizer_model"),
    ("dataset .bin missing", T, _data_without_bin, "books_text_document.bin"),
    ("vocab smaller than the tokenizer's", T, ["model.vocab_size=512"], "model.vocab_size"),
    ("split", T, ["data.split=90,10"], "data.split"),
    ("source weight", T, ["data.sources.books.weight=0"], "data.sources.books.weight"),
    # run directories and checkpoints
    ("resume with another weight decay", T, _setup_resume_mismatch("optimizer.weight_decay", 0.0), "optimizer.weight_decay"),
    ("resume with another global batch", T, _setup_resume_mismatch("train.global_batch_size", 32), "train.global_batch_size"),
    ("resume with another seed", T, _setup_resume_mismatch("train.seed", 7), "train.seed"),
    ("train.load is no checkpoint", T, lambda w: [f"train.load={w}"], "llama_model.json"),
    ("train.load of another shape", T, _load_other_shape, "model.hidden_size"),
    ("garbled skip ledger", T, _garbled_ledger, "skipped_batches.json"),
    ("convert onto an existing directory", _convert, _existing_out, "already exists"),
    ("convert an HF folder without config", _convert, _hf_without_config, "config.json"),
    ("convert a directory that is no checkpoint", _convert, _not_a_checkpoint, "llama_model.json"),
    # cluster and Slurm
    ("gpus_per_node=0 (launch)", L, ["tiny_cpu", "cluster.gpus_per_node=0"], "cluster.gpus_per_node"),
    ("signal lead past the time limit", L, ["tiny_cpu", "cluster.signal_lead_s=4000"], "cluster.signal_lead_s"),
    ("time limit", L, ["tiny_cpu", "cluster.time_limit=soon"], "cluster.time_limit"),
    ("env overriding the script", L, ["tiny_cpu", "+cluster.env.RUN_DIR=/x"], "cluster.env.RUN_DIR"),
    ("env overriding Slurm", L, ["tiny_cpu", "+cluster.env.SLURM_JOB_ID=1"], "cluster.env.SLURM_JOB_ID"),
    ("max restarts", L, ["tiny_cpu", "cluster.max_restarts=-1"], "cluster.max_restarts"),
    ("TP across nodes", L, ["tiny_cpu", "cluster=local_2nodes"], "parallel.tensor"),
    ("faults in the 65B recipe", L, ["llama_65b_pretrain", "faults.nan_grad_at_step=3"], "faults:"),
    ("stop without jobs", _stop, lambda w: [str(w)], "slurm/jobs"),
    # the other command lines
    ("fine-tune unknown key", _finetune, ["train.stepz=1"], "stepz"),
    ("describe wrong type", _describe, ["model=tiny", "model.hidden_size=big"], "model.hidden_size"),
]


@pytest.mark.parametrize("name,cli,args,expect", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_table(name, cli, args, expect, demo_data, tmp_path, monkeypatch, capsys):
    import hashlib

    monkeypatch.setenv("DEMO_DATA", str(demo_data))
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 gives the layout checks
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "w"
    work.mkdir()
    (work / "demo").symlink_to(demo_data)
    argv = args(work) if callable(args) else list(args)
    if cli in (_train, _finetune) and not any(a.startswith("train.run_dir=") for a in argv):
        argv.append(f"train.run_dir={work / 'run'}")

    def snapshot():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(work.rglob("*"))
                if p.is_file() and "demo" not in p.relative_to(work).parts}

    before = snapshot()
    code = cli(*argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (code, err[-2000:])
    assert len(errors) == 1 and expect in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert snapshot() == before  # nothing written, nothing overwritten


def test_the_table_has_forty_rows():
    assert len(BAD_INPUTS) >= 40


def test_a_node_without_cuda_in_a_gpu_job_fails_at_start_naming_it(demo_data, tmp_path):
    """slurm/render.py exports LLAMA_REQUIRE_CUDA=1 in jobs that ask for GPUs; without CUDA a rank
    refuses to become a gloo/CPU rank (which would hang the job until the collectives time out)."""
    import os
    import subprocess
    import sys

    from llama_plugin.run_files import node_name

    env = dict(os.environ, DEMO_DATA=str(demo_data), LLAMA_REQUIRE_CUDA="1")
    r = subprocess.run([sys.executable, "-m", "llama_plugin.train", "tiny_cpu", "parallel=cpu_single",
                        f"train.run_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {node_name()}: the job asked for GPUs (cluster.gres) but CUDA is not available here (driver, "
        f"CUDA_VISIBLE_DEVICES or a CPU build of torch); refusing to train on the CPU")


def test_collectives_outlast_the_hang_watchdog():
    """NCCL's own watchdog aborts a collective after the process-group timeout, with no stacks and
    no requeue.json: the timeout must exceed stability.hang_timeout_s (1800 s in every recipe)."""
    from llama_plugin.distributed import process_group_timeout_minutes

    for hang_s in (60, 1800, 3600, 7200):
        assert process_group_timeout_minutes(hang_s) * 60 >= hang_s + 600


def test_fused_adam_keeps_its_step_in_its_groups_and_is_not_given_one_per_parameter():
    """Where TransformerEngine imports, megatron's optimizer is TE's FusedAdam, whose state_dict()
    fails on a per-parameter 'step'; torch's Adam keeps it there and needs it restored."""
    from llama_plugin.checkpoint import _set_adam_steps

    p = torch.nn.Parameter(torch.zeros(2))
    fused = type("FusedAdam", (torch.optim.Optimizer,), {"__module__": "transformer_engine.pytorch.optimizers.fused_adam"})(
        [p], {"lr": 1.0})
    plain = torch.optim.Adam([p])
    for inner in (fused, plain):
        inner.state[p] = {"exp_avg": torch.zeros(2)}
    _set_adam_steps(type("W", (), {"optimizer": fused})(), [7])
    _set_adam_steps(type("W", (), {"optimizer": plain})(), [7])
    assert "step" not in fused.state[p] and float(plain.state[p]["step"]) == 7.0
