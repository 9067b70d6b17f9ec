"""Per-GPU memory of the model states when fine-tuning a recipe's model: full fine-tuning on one
GPU, ZeRO 1/2/3, CPU offload, LoRA. Activations and temporary buffers are not included.

    python -m llama_plugin.finetune.memory <recipe> [--gpus N] [overrides]

Bytes per parameter (P parameters, N GPUs, GB = 1e9 bytes), as the LLaMA fine-tuning notes count
them: full fine-tuning keeps weights, gradients and Adam's two moments, 4 bytes each in fp32, so
16 P (7e9 x 4 x 4 = 112 GB); mixed precision (bf16 weights and gradients, fp32 master + moments)
is also 2 + 2 + 12 = 16 P. ZeRO shards the 12 P optimizer state (stage 1), then the gradients
(stage 2), then the weights (stage 3) over N; offload moves the sharded parts to CPU memory.
LoRA freezes the base, so the base costs only its weights (4 P in fp32: 7e9 x 4 = 28 GB; 2 P in
bf16) and the 16 bytes apply only to the adapter parameters.
"""

from __future__ import annotations

import argparse
import json
import sys

GB = 1e9


def llama_parameters(model) -> int:
    """Parameters of an HF LlamaForCausalLM with the recipe's shape (untied unless the recipe ties)."""
    from llama_plugin.model import ffn_hidden_size, num_query_groups

    d, v, f = model.hidden_size, model.vocab_size, ffn_hidden_size(model)
    head = d // model.num_attention_heads
    kv = num_query_groups(model) * head
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * f + 2 * d  # q, k+v, o, gate/up/down, two RMSNorms
    embeddings = v * d * (1 if model.share_embeddings_and_output_weights else 2)
    return model.num_layers * per_layer + embeddings + d  # + final norm


def lora_parameters(model, lora) -> int:
    """r x (in + out) per adapted projection per layer."""
    from llama_plugin.model import ffn_hidden_size, num_query_groups

    d, f = model.hidden_size, ffn_hidden_size(model)
    kv = num_query_groups(model) * (d // model.num_attention_heads)
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    return model.num_layers * sum(lora.r * sum(shapes[m]) for m in lora.target_modules if m in shapes)


def estimate(P: int, N: int, P_lora: int, lora_base_bytes: int = 4) -> list[dict]:
    """Rows {setup, gpu_gb, cpu_gb, formula}; model states only."""
    rows = [
        ("full fine-tuning, 1 GPU (fp32 weights, grads, Adam m, v)", 16 * P, 0, "16 P"),
        ("ZeRO-1 (optimizer state sharded)", 2 * P + 2 * P + 12 * P / N, 0, "2P + 2P + 12P/N"),
        ("ZeRO-2 (+ gradients sharded)", 2 * P + 14 * P / N, 0, "2P + (2P + 12P)/N"),
        ("ZeRO-3 (+ weights sharded)", 16 * P / N, 0, "16P/N"),
        ("ZeRO-2 + optimizer offload", 2 * P, 14 * P / N, "GPU 2P; CPU (2P + 12P)/N"),
        ("ZeRO-3 + optimizer offload", 4 * P / N, 12 * P / N, "GPU (2P + 2P)/N; CPU 12P/N"),
        ("ZeRO-3 + optimizer + parameter offload", 0, 16 * P / N,
         "GPU ~0 (layers in use); CPU 16P/N"),
        (f"LoRA ({lora_base_bytes}-byte frozen base + adapters)", lora_base_bytes * P + 16 * P_lora, 0,
         f"{lora_base_bytes}P + 16 P_lora"),
        ("LoRA, bf16 frozen base", 2 * P + 16 * P_lora, 0, "2P + 16 P_lora"),
    ]
    return [{"setup": s, "gpu_gb": g / GB, "cpu_gb": c / GB, "formula": f} for s, g, c, f in rows]


def recipe_row(cfg, P: int, P_lora: int, N: int) -> dict:
    """The model states of this recipe's own setup: its precision (bf16: 2-byte weights and
    gradients plus a 4-byte fp32 master copy; fp32: 4-byte weights and gradients, no copy), Adam's
    8 bytes of moments, its ZeRO stage and offload, and LoRA (a frozen base of weights only,
    sharded under ZeRO-3 like every parameter; the 16 or 16 bytes of state on the adapters only)."""
    z, bf16 = cfg.zero, cfg.train.precision == "bf16"
    w = 2 if bf16 else 4
    trained = P_lora if cfg.lora.enabled else P
    weights = w * P if cfg.lora.enabled else w * trained
    grads, optim = w * trained, (8 + (4 if bf16 else 0)) * trained
    shard = {"weights": z.stage >= 3, "grads": z.stage >= 2, "optim": z.stage >= 1}
    gpu = cpu = 0.0
    for part, size in (("weights", weights), ("grads", grads), ("optim", optim)):
        size = size / N if shard[part] else size
        # optimizer offload moves the optimizer state, and from stage 2 the gradient shards its step
        # reads, to CPU memory (ZeRO-Offload); parameter offload moves the weights (stage 3)
        on_cpu = ((part == "optim" and z.offload_optimizer) or (part == "grads" and z.offload_optimizer and z.stage >= 2)
                  or (part == "weights" and z.offload_param))
        if on_cpu:
            cpu += size
        else:
            gpu += size
    setup = (f"this recipe: {cfg.train.precision}, ZeRO-{z.stage}"
             + (" + optimizer offload" if z.offload_optimizer else "") + (" + parameter offload" if z.offload_param else "")
             + (f", LoRA r={cfg.lora.r}" if cfg.lora.enabled else ""))
    trained_name = "P_lora" if cfg.lora.enabled else "P"
    formula = f"{w}P weights + {w}{trained_name} grads + {8 + (4 if bf16 else 0)}{trained_name} optimizer"
    return {"setup": setup, "gpu_gb": gpu / GB, "cpu_gb": cpu / GB, "formula": formula}


def report(cfg, gpus: int) -> dict:
    from omegaconf import OmegaConf

    P = llama_parameters(cfg.model)
    lora = cfg.lora if cfg.lora.enabled else OmegaConf.create({"r": 8, "target_modules": list(cfg.lora.target_modules)})
    P_lora = lora_parameters(cfg.model, lora)
    nominal = round(P / 1e9) * 10**9
    return {
        "recipe": cfg.name, "model": cfg.model.name, "parameters": P, "nominal_parameters": nominal,
        "lora_parameters": P_lora, "lora_r": lora.r, "gpus": gpus, "unit": "GB = 1e9 bytes; model states only",
        "rows": estimate(P, gpus, P_lora),
        "rows_nominal": estimate(nominal, gpus, P_lora),
        "recipe_row": recipe_row(cfg, P, P_lora, gpus),
    }


def main(argv=None) -> int:
    from recipes import RecipeError, compose
    from recipes.finetune_schema import FinetuneConfig

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs N (default 8)")
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.gpus < 1:
            raise RecipeError(f"--gpus: must be >= 1 (got {args.gpus})")
        cfg = compose(args.recipe, overrides, FinetuneConfig)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = report(cfg, args.gpus)
    if not args.json:
        print(f"{cfg.model.name}: P = {out['parameters']:,} parameters (nominal {out['nominal_parameters']:.0e}); "
              f"LoRA r={out['lora_r']} adapters P_lora = {out['lora_parameters']:,}; N = {args.gpus} GPUs; "
              "GB = 1e9 bytes; model states only (no activations)")
        print(f"{'setup':58s} {'formula':34s} {'GPU GB':>9s} {'CPU GB':>9s} {'(P nominal) GPU GB':>19s}")
        for row, nom in zip(out["rows"], out["rows_nominal"]):
            print(f"{row['setup']:58s} {row['formula']:34s} {row['gpu_gb']:9.1f} {row['cpu_gb']:9.1f} "
                  f"{nom['gpu_gb']:19.1f}")
        row = out["recipe_row"]
        print(f"{row['setup']:58s} {row['formula']:34s} {row['gpu_gb']:9.1f} {row['cpu_gb']:9.1f}")
    print(json.dumps(out, indent=None if not args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
