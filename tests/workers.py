"""Functions that run inside spawned test worlds (importable, so torch.multiprocessing can pickle them)."""

from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf

from llama_plugin import cpu_compat
from llama_plugin.convert import load_hf_into
from llama_plugin.distributed import init_distributed
from llama_plugin.hf import HFWeights, model_config_from_hf
from llama_plugin.model import build_gpt_model, transformer_config
from llama_plugin.train import transformer_overrides
from llama_plugin.train_step import Batch, build_optimizer, train_step, wrap_ddp
from recipes import validate
from recipes.schema import ModelConfig

GLOBAL_BATCH, MICRO_BATCH, SEQ = 8, 2, 32


def fixed_batches(vocab: int, steps: int) -> list[list[Batch]]:
    """Per step, the global batch as micro-batches, identical for every layout.

    Two batches alternate, so a few steps visibly lower the loss (memorization).
    """
    gen = torch.Generator().manual_seed(1234)
    pool = [torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen) for _ in range(2)]
    out = []
    for step in range(steps):
        data = pool[step % 2]
        mask = torch.ones(GLOBAL_BATCH, SEQ)
        mask[0, :5] = 0  # uneven token counts per micro-batch exercise the token weighting
        out.append([
            Batch(data[i:i + MICRO_BATCH, :-1], data[i:i + MICRO_BATCH, 1:], mask[i:i + MICRO_BATCH])
            for i in range(0, GLOBAL_BATCH, MICRO_BATCH)
        ])
    return out


def train_layout(result_path: str, hf_dir: str, layout: dict, steps: int = 6) -> None:
    """Train `steps` optimizer steps in `layout` from the HF weights; rank 0 writes losses/grad norms."""
    from megatron.core import parallel_state

    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[layout.get("dtype", "fp32")]
    model_cfg, _ = model_config_from_hf(hf_dir)
    init_distributed(tp, pp)
    config = transformer_config(
        model_cfg, tensor_parallel=tp, pipeline_parallel=pp, params_dtype=dtype,
        sequence_parallel=layout.get("sequence_parallel", False), perform_initialization=False,
        **transformer_overrides(OmegaConf.create({"recompute": layout.get("recompute", "none"), "tp_comm_overlap": False,
                                                  "first_stage_layers": layout.get("first_stage_layers")})),
    )
    model = build_gpt_model(model_cfg, config)
    load_hf_into(model, model_cfg, HFWeights(hf_dir))
    if layout.get("unmark_sequence_parallel_norms"):
        # The bug the equivalence test must catch: norm grads not summed over the TP group.
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.sequence_parallel = False
    chunks = wrap_ddp(
        [model], config, overlap_grad_reduce=layout.get("overlap_grad_reduce", False),
        use_distributed_optimizer=layout.get("distributed_optimizer", False),
        bucket_size=layout.get("bucket_size"),
    )
    optimizer = build_optimizer(
        chunks, lr=3e-3, weight_decay=0.1, clip_grad=1.0, params_dtype=dtype,
        use_distributed_optimizer=layout.get("distributed_optimizer", False),
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    losses, grad_norms = [], []
    for step_batches in fixed_batches(model_cfg.vocab_size, steps):
        per_rank = len(step_batches) // dp
        mine = step_batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        loss, grad_norm, ok = train_step(chunks, optimizer, mine)
        assert ok
        losses.append(loss)
        grad_norms.append(grad_norm)
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump({
                "losses": losses, "grad_norms": grad_norms, "cpu_compat": cpu_compat.is_active(),
                "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            }, f)


def parity_layout(result_path: str, ckpt_dir: str, tp: int, pp: int, sequences: list, prompt: list, new_tokens: int):
    """Logits of `sequences` and greedy ids after `prompt` from a checkpoint loaded in TP x PP."""
    from llama_plugin.generate import generate_ids, last_stage_logits, load_for_inference

    model, _ = load_for_inference(ckpt_dir, tp, pp)
    with torch.no_grad():
        logits = [last_stage_logits(model, torch.tensor([s])) for s in sequences]
    ids = generate_ids(model, prompt, new_tokens, greedy=True)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:  # a last-stage rank
        torch.save({"logits": [x[0] for x in logits], "ids": ids}, result_path)


def attention_core_parity(result_path: str, hf_dir: str, tp: int, sequence_parallel: bool) -> None:
    """Logits and weight grads of the model with the SDPA core against megatron-core's
    DotProductAttention core, same HF weights, same layout; rank 0 writes the largest differences."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from llama_plugin.generate import last_stage_logits
    from llama_plugin.layers import attention

    model_cfg, _ = model_config_from_hf(hf_dir)
    init_distributed(tp, 1)
    config = transformer_config(model_cfg, tensor_parallel=tp, sequence_parallel=sequence_parallel,
                                perform_initialization=False)
    sdpa, models = attention.SDPAttention, {}
    for name, core in (("sdpa", sdpa), ("megatron", DotProductAttention)):
        attention.SDPAttention = core  # the layer spec looks the core up when it builds
        try:
            models[name] = build_gpt_model(model_cfg, config)
        finally:
            attention.SDPAttention = sdpa
        load_hf_into(models[name], model_cfg, HFWeights(hf_dir))
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 33), generator=gen)
    positions = torch.arange(32).unsqueeze(0).expand(2, -1)
    out = {}
    for name, model in models.items():
        with torch.no_grad():
            logits = last_stage_logits(model, tokens[:, :-1])
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).sum()
        loss.backward()
        out[name] = (logits, {n: p.grad.clone() for n, p in model.named_parameters()},
                     [type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers])
    (la, ga, ca), (lb, gb, cb) = out["sdpa"], out["megatron"]
    diffs = torch.tensor([(la - lb).abs().max().item(), max((ga[n] - gb[n]).abs().max().item() for n in ga),
                          max(g.abs().max().item() for g in gb.values())])
    torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump({"logits_max_abs_diff": diffs[0].item(), "grad_max_abs_diff": diffs[1].item(), "grad_max_abs": diffs[2].item(),
                       "logits_max_abs": la.abs().max().item(), "cores": [ca, cb]}, f)


def plan_measurements(result_path: str, model: dict, layouts: list[dict]) -> None:
    """For each layout: what the real model keeps for backward (per layer: 4 layers minus 2, one
    forward; and the peak of live saved bytes over a real training step) and the real weights,
    gradient buffers and optimizer states of every rank after that step. Each rank appends its rows."""
    from megatron.core import parallel_state

    from llama_plugin.plan.measure import SavedBytes, optimizer_state_bytes, parameter_storages

    for layout in layouts:
        tp, pp = layout.get("tp", 1), layout.get("pp", 1)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[layout["dtype"]]
        init_distributed(tp, pp)
        shape = {**model, **layout.get("model", {})}
        s, b = shape["seq_length"], layout["micro_batch"]

        def build(num_layers):
            m = validate(OmegaConf.create({**shape, "num_layers": num_layers}), ModelConfig)
            config = transformer_config(
                m, tensor_parallel=tp, pipeline_parallel=pp, params_dtype=dtype,
                sequence_parallel=layout.get("sequence_parallel", False),
                bias_activation_fusion=layout.get("fused_swiglu", False),
                **transformer_overrides(OmegaConf.create({"recompute": layout["recompute"], "tp_comm_overlap": False})))
            return m, config, build_gpt_model(m, config)

        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, shape["vocab_size"], (b, s + 1), generator=gen)
        row = {"name": layout["name"], "rank": torch.distributed.get_rank()}
        if pp == 1:
            totals = []
            for n in (2, 4):
                _, _, net = build(n)
                counter = SavedBytes(parameter_storages([net]))
                positions = torch.arange(s).unsqueeze(0).expand(b, -1)
                with counter.active():
                    net(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
                totals.append(counter.total)
            row["layer_bytes"] = (totals[1] - totals[0]) // 2
        m, config, net = build(shape["num_layers"])
        chunks = wrap_ddp([net], config, overlap_grad_reduce=layout.get("overlap_grad_reduce", False),
                          use_distributed_optimizer=layout.get("distributed_optimizer", False),
                          bucket_size=layout.get("bucket_size"))
        optimizer = build_optimizer(chunks, lr=1e-3, weight_decay=0.1, params_dtype=dtype,
                                    use_distributed_optimizer=layout.get("distributed_optimizer", False))
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        batches = [Batch(tokens[:, :-1], tokens[:, 1:], torch.ones(b, s)) for _ in range(layout["micro_batches"])]
        counter = SavedBytes(parameter_storages(chunks))
        with counter.active():
            _, _, ok = train_step(chunks, optimizer, batches)
        assert ok
        buffers = [buf for c in chunks for buf in c.buffers]
        row.update({
            "stage": parallel_state.get_pipeline_model_parallel_rank(), "dp": dp, "dp_rank": dp_rank,
            "peak_saved_bytes": counter.peak,
            "weights": sum(p.numel() * p.element_size() for p in net.parameters()),
            "grad_buffer": sum(buf.grad_data.numel() * buf.grad_data.element_size() for buf in buffers),
            "param_buffer": sum(buf.param_data.numel() * buf.param_data.element_size()
                                for buf in buffers if buf.param_data is not None),
            **optimizer_state_bytes(optimizer, chunks),
        })
        with open(result_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def global_weights(model_cfg, seed: int = 0) -> dict:
    """Full (TP=1, PP=1) tensors of a freshly initialised model, by megatron-core name."""
    init_distributed(1, 1)
    torch.manual_seed(seed)
    net = build_gpt_model(model_cfg, transformer_config(model_cfg))
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def full_weights(model: dict, weights_path: str):
    """(model recipe, full tensors by name, global_tensor(name, layer) for convert.load_global_into)."""
    model_cfg = validate(OmegaConf.create(model), ModelConfig)
    weights = torch.load(weights_path)

    def global_tensor(name, layer):
        if layer is not None:
            return weights[f"decoder.layers.{layer}.{name}"]
        if name == "output_layer.weight" and model_cfg.share_embeddings_and_output_weights:
            return weights["embedding.word_embeddings.weight"]  # the last stage's copy of the tied embedding
        return weights[name]

    return model_cfg, weights, global_tensor


def train_global_layouts(result_path: str, cases: dict, steps: int = 6) -> None:
    """For each case (name -> (model recipe dict, path of its full weights by megatron-core name,
    Adafactor settings or None for AdamW, layouts)),
    train every layout (name -> {tp, pp, sequence_parallel}) in turn in this world from the same
    weights; rank 0 writes "case/layout" -> losses and grad norms. For layer types no HF folder
    holds (LayerNorm, biases, learned positions, parallel layers...)."""
    from megatron.core import parallel_state

    from llama_plugin.convert import load_global_into
    from llama_plugin.model import ACTIVATIONS

    results = {}
    for case, (model, weights_path, adafactor, layouts) in cases.items():
        model_cfg, weights, global_tensor = full_weights(model, weights_path)

        for name, layout in layouts.items():
            tp, pp = layout.get("tp", 1), layout.get("pp", 1)
            init_distributed(tp, pp)
            config = transformer_config(model_cfg, tensor_parallel=tp, pipeline_parallel=pp,
                                        sequence_parallel=layout.get("sequence_parallel", False),
                                        perform_initialization=False)
            net = build_gpt_model(model_cfg, config)
            load_global_into(net, global_tensor, gated=ACTIVATIONS[model_cfg.activation][1])
            distributed = layout.get("distributed_optimizer", False)
            chunks = wrap_ddp([net], config, use_distributed_optimizer=distributed, overlap_grad_reduce=distributed,
                              bucket_size=layout.get("bucket_size"))
            settings = dict(adafactor or {})
            lr = settings.pop("lr", 3e-3)
            optimizer = build_optimizer(chunks, lr=lr, weight_decay=0.1, clip_grad=1.0, params_dtype=torch.float32,
                                        use_distributed_optimizer=distributed,
                                        adafactor=settings if adafactor is not None else None)
            dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
            losses, grad_norms = [], []
            for step_batches in fixed_batches(model_cfg.vocab_size, steps):
                per_rank = len(step_batches) // dp
                loss, grad_norm, ok = train_step(chunks, optimizer, step_batches[dp_rank * per_rank:(dp_rank + 1) * per_rank])
                assert ok
                losses.append(loss)
                grad_norms.append(grad_norm)
            results[f"{case}/{name}"] = {"losses": losses, "grad_norms": grad_norms}
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)


def reshard_checkpoints(result_path: str, cases: dict, ckpt_root: str) -> None:
    """For each case (name -> (model recipe dict, full weights path)): save from TP=2 (+SP), load
    into TP=1 (DP=2) and into PP=2; rank 0 writes, per case and layout, the largest difference
    from the full weights of every parameter it loaded (0.0 is exact)."""
    from pathlib import Path

    from llama_plugin import checkpoint
    from llama_plugin.convert import load_global_into
    from llama_plugin.model import ACTIVATIONS

    out = {}
    for case, (model, weights_path) in cases.items():
        model_cfg, weights, global_tensor = full_weights(model, weights_path)
        tied = model_cfg.share_embeddings_and_output_weights

        init_distributed(2, 1)
        net = build_gpt_model(model_cfg, transformer_config(model_cfg, tensor_parallel=2, sequence_parallel=True,
                                                            perform_initialization=False))
        load_global_into(net, global_tensor, gated=ACTIVATIONS[model_cfg.activation][1])
        ckpt = Path(ckpt_root) / case
        checkpoint.save_checkpoint([net], ckpt, model_cfg, torch.float32, train_state={"step": 1})
        for tp, pp in ((1, 1), (1, 2)):
            init_distributed(tp, pp)
            net = build_gpt_model(model_cfg, transformer_config(model_cfg, tensor_parallel=tp, pipeline_parallel=pp,
                                                                perform_initialization=False))
            for p in net.parameters():
                p.data.fill_(float("nan"))
            checkpoint.load_checkpoint([net], ckpt)
            diffs = torch.tensor([0.0])
            for name, p in net.named_parameters():
                layer = name.split(".")
                glob = name
                if name.startswith("decoder.layers."):
                    glob = f"decoder.layers.{net.decoder.layers[int(layer[2])].layer_number - 1}.{'.'.join(layer[3:])}"
                elif name == "output_layer.weight" and tied:
                    glob = "embedding.word_embeddings.weight"
                d = (p.detach() - weights[glob]).abs().max()
                diffs = torch.maximum(diffs, torch.nan_to_num(d, nan=float("inf")).reshape(1))
            torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
            out[f"{case}/tp{tp}_pp{pp}"] = diffs.item()
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(out, f)
