"""Convert between Hugging Face LLaMA folders and megatron-core distributed checkpoints.

    python -m llama_plugin.convert hf-to-mcore --hf DIR --out DIR [--tp N --pp N]
    python -m llama_plugin.convert mcore-to-hf --ckpt DIR --out DIR

hf-to-mcore builds the model in the TP x PP layout (one process per rank: spawned locally, or the
ranks of an enclosing torchrun), so no process ever holds more than its shard plus one HF tensor.
The distributed checkpoint it writes stores global tensors and loads into any layout the shape
allows; --tp/--pp choose the memory per converting process and check that the model fits them.
mcore-to-hf loads the checkpoint into one process (TP=1, PP=1) and writes safetensors.
A round trip HF -> mcore -> HF is bit-exact: tensors are copied in their stored dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from llama_plugin import checkpoint, hf
from llama_plugin.distributed import init_distributed, run_in_world
from llama_plugin.model import build_gpt_model, check_model_shape, tp_split_dim, transformer_config

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _tp_shard(full: torch.Tensor, name: str, gated: bool = True) -> torch.Tensor:
    """This tensor-parallel rank's slice of a global tensor, as megatron-core lays it out."""
    dim = tp_split_dim(name)
    if dim is None:
        return full
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    if gated and name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
        # Each rank holds [its gate rows; its up rows], so the gated halves stay together.
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]])
    return torch.chunk(full, size, dim=dim)[rank]


def load_global_into(model, global_tensor, gated: bool = True, error=ValueError) -> None:
    """Copy full (TP=1) tensors into this rank's model chunk (any TP rank, any PP stage).

    `global_tensor(name, layer)` gives the tensor for a parameter name within global layer `layer`
    ('self_attention.linear_qkv.weight'), or for a model-level name when `layer` is None.
    """
    layers = model.decoder.layers
    for name, param in model.named_parameters():
        m = _LAYER.match(name)
        if m:
            full = global_tensor(m.group(2), layers[int(m.group(1))].layer_number - 1)
        else:
            full = global_tensor(name, None)
        local = _tp_shard(full, name, gated)
        if local.shape != param.shape:
            raise error(f"tensor for '{name}' has shape {tuple(local.shape)}, model needs {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(local)


def load_hf_into(model, model_cfg, weights: hf.HFWeights) -> None:
    """Copy HF weights into this rank's model chunk (any TP rank, any PP stage)."""
    load_global_into(model, lambda name, layer: hf.mcore_global_tensor(name, layer, model_cfg, weights),
                     error=lambda msg: hf.HFFolderError(f"{weights.dir}: {msg}"))


def _hf_to_mcore_rank(hf_dir: str, out_dir: str, tp: int, pp: int) -> None:
    model_cfg, hf_raw = hf.model_config_from_hf(hf_dir)
    weights = hf.HFWeights(hf_dir)
    dtype = weights.get("model.embed_tokens.weight", (model_cfg.vocab_size, model_cfg.hidden_size)).dtype
    init_distributed(tp, pp)
    config = transformer_config(
        model_cfg, tensor_parallel=tp, pipeline_parallel=pp, params_dtype=dtype,
        use_cpu_initialization=True, perform_initialization=False,
    )
    model = build_gpt_model(model_cfg, config)
    load_hf_into(model, model_cfg, weights)
    checkpoint.save_checkpoint(
        [model], out_dir, model_cfg, dtype,
        extra_files={checkpoint.HF_CONFIG_FILE: json.dumps(hf_raw, indent=2) + "\n"},
    )


def hf_to_mcore(hf_dir, out_dir, tp: int = 1, pp: int = 1) -> None:
    model_cfg, _ = hf.model_config_from_hf(hf_dir)
    hf.HFWeights(hf_dir)  # fail on missing weight files before starting processes
    check_model_shape(model_cfg, tp, pp)
    if Path(out_dir).exists():
        raise checkpoint.CheckpointError(f"{out_dir}: already exists; refusing to overwrite")
    run_in_world(tp * pp, _hf_to_mcore_rank, str(hf_dir), str(out_dir), tp, pp)


def mcore_state_dict(ckpt_dir) -> tuple:
    """(full TP=1/PP=1 parameter dict, ModelConfig, dtype) of a checkpoint, in this process."""
    model_cfg, dtype = checkpoint.read_model_record(ckpt_dir)
    init_distributed(1, 1)
    config = transformer_config(model_cfg, params_dtype=dtype, use_cpu_initialization=True, perform_initialization=False)
    model = build_gpt_model(model_cfg, config)
    checkpoint.load_checkpoint([model], ckpt_dir)
    return {n: p.detach() for n, p in model.named_parameters()}, model_cfg, dtype


def mcore_to_hf(ckpt_dir, out_dir) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise checkpoint.CheckpointError(f"{out_dir}: already exists; refusing to overwrite")
    state, model_cfg, dtype = mcore_state_dict(ckpt_dir)
    base_path = Path(ckpt_dir) / checkpoint.HF_CONFIG_FILE
    base = json.loads(base_path.read_text()) if base_path.is_file() else None
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.write_hf_folder(tmp, hf.hf_tensors_from_mcore(state, model_cfg), hf.hf_config_from_model(model_cfg, dtype, base))
    os.replace(tmp, out_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_plugin.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF LlamaForCausalLM folder -> megatron-core distributed checkpoint")
    a.add_argument("--hf", required=True, help="folder with config.json and safetensors")
    a.add_argument("--out", required=True, help="checkpoint directory to create")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to convert with")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks to convert with")
    b = sub.add_parser("mcore-to-hf", help="megatron-core distributed checkpoint -> HF folder")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "hf-to-mcore":
            hf_to_mcore(args.hf, args.out, args.tp, args.pp)
        else:
            mcore_to_hf(args.ckpt, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"command": args.command, "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
