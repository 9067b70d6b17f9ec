"""The fine-tuning loop: an HF LLaMA (optionally with LoRA) trained by a DeepSpeed engine.

Loss: token-level cross entropy summed over every response token of the global batch and divided by
their number (counted from the data, identically on every rank), so micro-batching, gradient
accumulation and data parallelism do not change it; each micro-batch's share is scaled by
gradient_accumulation x world to undo DeepSpeed's averaging.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from llama_plugin.finetune import ds_checkpoint, schedule
from llama_plugin.finetune.ds_config import deepspeed_config, gradient_accumulation_steps
from llama_plugin.finetune.sft_data import IGNORE_INDEX, SftDataError, SftDataset, collate, read_sources
from llama_plugin.metrics_log import truncate_jsonl_after
from llama_plugin.run_files import FINISHED_MARKER, STOP_FILE, StopRequest, redact_secrets
from recipes import RecipeError, compose, load_file
from recipes.finetune_schema import FinetuneConfig, check_finetune

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Fields a resume must share with the checkpoint: what the samples are and their order, the
# schedule, the optimizer's update rule, the model being trained and its precision. Besides these,
# base_model and data.tokenizer_model are compared by content (fingerprint below).
RESUME_FIELDS = (
    "data.train_file", "data.format", "data.mixture", "data.max_length", "data.shuffle", "data.template",
    "data.system_prompt", "data.oasst_languages", "data.oasst_top_k",
    "train.global_batch_size", "train.seed", "train.epochs", "train.max_steps", "train.precision",
    "optimizer.lr", "optimizer.warmup_ratio", "optimizer.warmup_steps", "optimizer.schedule", "optimizer.weight_decay",
    "optimizer.beta1", "optimizer.beta2", "optimizer.eps", "optimizer.clip_grad",
    "lora.enabled", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "zero.stage")


def default_extensions_dir() -> None:
    """DeepSpeed compiles ops (shared-memory comm, CPU Adam) on first use; keep them across runs."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llama_mcore" / "torch_extensions"))


def load_recipe(argv: list[str]):
    if argv and argv[0] == "--config":  # a composed recipe saved by slurm.launch
        if len(argv) < 2:
            raise RecipeError("--config needs a file")
        return load_file(argv[1], argv[2:], FinetuneConfig)
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        raise RecipeError("usage: python -m llama_plugin.finetune <recipe> [overrides] (recipes: alpaca_7b, "
                          "lora_7b, chat_7b, vicuna_7b, koala_7b, oasst_7b, llama_i_7b, tiny_alpaca_cpu, "
                          "tiny_lora_cpu, tiny_chat_cpu, tiny_mixture_cpu)")
    return compose(argv[0], argv[1:], FinetuneConfig)


def check_base_model(cfg) -> None:
    """The recipe's model shape must be the base folder's (it drives the memory estimate)."""
    from llama_plugin.hf import model_config_from_hf
    from llama_plugin.model import ffn_hidden_size, num_query_groups

    hf_cfg, _ = model_config_from_hf(cfg.base_model)
    pairs = {
        "num_layers": (cfg.model.num_layers, hf_cfg.num_layers),
        "hidden_size": (cfg.model.hidden_size, hf_cfg.hidden_size),
        "num_attention_heads": (cfg.model.num_attention_heads, hf_cfg.num_attention_heads),
        "num_query_groups": (num_query_groups(cfg.model), num_query_groups(hf_cfg)),
        "ffn_hidden_size": (ffn_hidden_size(cfg.model), ffn_hidden_size(hf_cfg)),
        "vocab_size": (cfg.model.vocab_size, hf_cfg.vocab_size),
    }
    for key, (recipe, folder) in pairs.items():
        if recipe != folder:
            raise RecipeError(f"model.{key}: the recipe has {recipe} but {cfg.base_model}/config.json has {folder}")


def check_resume(cfg) -> None:
    now = None
    for _, ckpt in reversed(ds_checkpoint.complete(Path(cfg.train.run_dir) / "checkpoints")):
        try:  # a torn newest checkpoint is set aside when training starts; compare with the next
            saved = json.loads((ckpt / ds_checkpoint.TRAIN_STATE).read_text())["resume_fields"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError):
            continue
        now = now or resume_fields(cfg)
        for key, value in saved.items():
            if now.get(key) != value:
                raise RecipeError(f"{key}: {now.get(key)!r} differs from {value!r} in {ckpt}; an exact resume "
                                  "needs the same value (or use a new train.run_dir)")
        return


def resume_fields(cfg) -> dict:
    out = {}
    for key in RESUME_FIELDS:
        v = OmegaConf.select(cfg, key)
        out[key] = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
    out["base_model (content)"] = fingerprint_hf_folder(cfg.base_model)
    out["data.tokenizer_model (content)"] = hashlib.sha256(Path(cfg.data.tokenizer_model).read_bytes()).hexdigest()
    return out


def fingerprint_hf_folder(folder) -> str:
    """sha256 over config.json and, per weight file, its name, size, safetensors header (names,
    dtypes, shapes) and its first and last MiB: a swapped or retrained base model changes it,
    without reading 13 GB at every start."""
    h = hashlib.sha256()
    folder = Path(folder)
    h.update((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header, size) + 2**20))
            fh.seek(max(0, size - 2**20))
            h.update(fh.read())
    return h.hexdigest()


_ZERO3_INIT = []  # keeps transformers' HfDeepSpeedConfig alive: it is held by a weak reference


def build_model(cfg, dtype, ds_cfg: dict):
    """The base model; for full fine-tuning under ZeRO-3 it is built and loaded already sharded
    (deepspeed.zero.Init through transformers), so no process ever holds all of it."""
    from transformers import LlamaForCausalLM

    if cfg.zero.stage == 3 and not cfg.lora.enabled:
        from transformers.integrations import HfDeepSpeedConfig

        _ZERO3_INIT[:] = [HfDeepSpeedConfig(ds_cfg)]
    else:
        _ZERO3_INIT.clear()
    model = LlamaForCausalLM.from_pretrained(cfg.base_model, dtype=dtype)
    if cfg.train.gradient_checkpointing:
        # non-reentrant: works with frozen embeddings (LoRA) and ZeRO-3's parameter hooks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        from llama_plugin.finetune.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    return model


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on RMSNorm gains); frozen parameters left out."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def ndim(p):  # a parameter built under zero.Init is an empty placeholder; ds_shape is its real shape
        return len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim

    return [{"params": [p for p in trainable if ndim(p) >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if ndim(p) < 2], "weight_decay": 0.0}]


def response_tokens(samples: list[dict]) -> int:
    """Tokens that carry loss (labels shifted by one, as the model predicts the next token)."""
    return sum(int(np.count_nonzero(np.asarray(s["labels"][1:]) != IGNORE_INDEX)) for s in samples)


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over response tokens of -log p(next token), in fp32."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                             reduction="sum")


class JsonlLog:
    """metrics.jsonl on rank 0; a resumed run first drops the rows after its checkpoint's step."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            truncate_jsonl_after(path, resume_step)  # a line torn by a crash is dropped

    def log(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def run(cfg, sources=None) -> dict:
    """Train; `sources` are the data files main() has already read (read here when None)."""
    stop = StopRequest(Path(cfg.train.run_dir) / STOP_FILE)
    default_extensions_dir()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    t, o = cfg.train, cfg.optimizer
    dtype = DTYPES[t.precision]
    run_dir = Path(t.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)

    data = SftDataset(cfg.data, sources)
    if len(data.tokenizer) > cfg.model.vocab_size:
        raise RecipeError(f"data.tokenizer_model: {len(data.tokenizer)} tokens but the model has {cfg.model.vocab_size}")
    plan = schedule.BatchPlan([len(s.records) for s in data.sources], [s.per_epoch for s in data.sources],
                              t.global_batch_size, t.seed, cfg.data.shuffle)
    per_epoch = plan.steps_per_epoch
    if per_epoch == 0:
        raise RecipeError(f"train.global_batch_size: {t.global_batch_size} exceeds the {plan.epoch_samples} samples "
                          "of an epoch")
    total = schedule.total_steps(cfg, plan.epoch_samples)
    fields = resume_fields(cfg)

    torch.manual_seed(t.seed)  # LoRA's initial A: the same on every rank
    ds_cfg = deepspeed_config(cfg, world)
    model = build_model(cfg, dtype, ds_cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, o.weight_decay),
                                           config=ds_cfg)
    torch.manual_seed(t.seed + 1000 + rank)  # dropout (LoRA) differs per rank

    start = 0
    newest = ds_checkpoint.newest_verified(ckpt_root)
    if newest is not None:
        start = ds_checkpoint.load(engine, newest)["step"]
    log = JsonlLog(run_dir / "metrics.jsonl", start, enabled=rank == 0)
    if rank == 0:
        resolved = redact_secrets(OmegaConf.to_container(cfg))
        resolved["derived"] = {"world_size": world, "total_steps": total, "steps_per_epoch": per_epoch,
                               "warmup_steps": schedule.warmup_steps(total, o),
                               "gradient_accumulation_steps": gradient_accumulation_steps(cfg, world),
                               "records": len(data), "deepspeed_config": ds_cfg,
                               "sources": [{"name": s.name, "format": s.format, "records": len(s.records),
                                            "per_epoch": s.per_epoch} for s in data.sources],
                               "resumed_from_step": start}
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
        os.replace(tmp, run_dir / "config.yaml")

    gas = gradient_accumulation_steps(cfg, world)
    device = engine.device
    engine.train()
    stop_at = min(total, t.exit_at_step) if t.exit_at_step else total
    step, loss_value, stopped = start, None, False
    while step < stop_at:
        t0 = time.perf_counter()
        indices = plan.indices(step)
        n_tokens = max(1, response_tokens([data[i] for i in indices]))
        lr = schedule.lr_at(step, o, total)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        local_sum = torch.zeros((), dtype=torch.float64)
        plain_norm = None
        for micro in schedule.rank_micro_batches(indices, rank, world, t.micro_batch_size):
            batch = {k: v.to(device) for k, v in collate([data[i] for i in micro]).items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            token_sum = summed_token_loss(logits, batch["labels"])
            engine.backward(token_sum * (gas * world / n_tokens))
            if engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
                plain_norm = _grad_norm(engine.module)  # stage 0 does not report it; grads are reduced here
            engine.step()
            local_sum += token_sum.detach().double().cpu()
        dist.all_reduce(local_sum)
        loss_value = float(local_sum) / n_tokens
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else plain_norm
        step += 1
        if step % t.log_interval == 0 or step == stop_at:
            row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                   "clipped": bool(o.clip_grad > 0 and grad_norm is not None and grad_norm > o.clip_grad),
                   "response_tokens": n_tokens, "step_time_s": time.perf_counter() - t0}
            if len(data.sources) > 1:
                row["samples_per_source"] = dict(zip((s.name for s in data.sources), plan.source_counts(step - 1)))
            log.log(row)
            if rank == 0:
                print(f"[finetune] step {step}/{total} loss {loss_value:.6f} lr {lr:.3e} grad_norm {grad_norm}",
                      flush=True)
        stop_now = stop.agreed(device)
        if step % t.save_interval == 0 or step == stop_at or stop_now:
            ds_checkpoint.save(engine, ckpt_root, step, {"step": step, "resume_fields": fields},
                               t.keep_checkpoints)
        if stop_now and step < stop_at:
            stopped = True
            break
    export = None
    if step >= total:
        from llama_plugin.finetune.export import export_hf

        export = export_hf(engine, cfg, dtype)
    summary = {"run_dir": str(run_dir), "step": step, "total_steps": total, "finished": step >= total, "stopped": stopped,
               "loss": loss_value, "export_dir": str(export) if export else None, "engine": engine_facts(engine)}
    if rank == 0:
        tmp = run_dir / "run_state.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, run_dir / "run_state.json")
        if stopped and stop.stop_file:
            stop.stop_file.unlink(missing_ok=True)  # served; a resumed run must not stop at once
        if summary["finished"]:
            marker = run_dir / (FINISHED_MARKER + ".tmp")
            marker.write_text(json.dumps({"step": step, "export_dir": summary["export_dir"]}) + "\n")
            os.replace(marker, run_dir / FINISHED_MARKER)
    dist.barrier()
    return summary


def _grad_norm(module) -> float:
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def engine_facts(engine) -> dict:
    """What DeepSpeed actually set up (stage, optimizer wrapper, offload, how much of the model this
    rank holds), for run_state.json."""
    zero3 = engine.zero_optimization_stage() == 3
    params = list(engine.module.parameters())
    return {
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer": type(engine.optimizer).__name__,
        "basic_optimizer": type(engine.basic_optimizer).__name__,
        "offload_optimizer": bool(engine.zero_cpu_offload()),
        "offload_param": engine.zero_offload_param() is not None,
        "parameter_elements": sum(p.ds_numel if zero3 else p.numel() for p in params),
        "rank0_parameter_elements": sum(p.ds_tensor.numel() if zero3 else p.numel() for p in params),
        "trainable_elements": sum(p.ds_numel if zero3 else p.numel() for p in params if p.requires_grad),
        "loaded_sharded": bool(_ZERO3_INIT),  # built and loaded under deepspeed.zero.Init
    }


def _ensure_launcher_env() -> None:
    """`python -m llama_plugin.finetune` without a launcher: a world of one on this machine."""
    if "RANK" not in os.environ:
        from llama_plugin.distributed import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment too)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return out


def main(argv=None) -> int:
    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        from llama_plugin import finetune

        print(finetune.__doc__)
        return 0
    rank0 = int(os.environ.get("RANK", 0)) == 0
    try:
        cfg = load_recipe(argv)
        check_finetune(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        check_base_model(cfg)
        check_resume(cfg)
        sources = read_sources(cfg.data)  # a malformed record stops the run here, before any process starts
    except (RecipeError, SftDataError, ValueError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    _ensure_launcher_env()
    try:
        summary = run(cfg, sources)
    except (RecipeError, SftDataError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank0:
        print(json.dumps(summary), flush=True)
    return 0
