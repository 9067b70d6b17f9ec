"""Facts about a model recipe, computed from the model megatron-core would build.

    python -m llama_plugin.describe model=llama_7b [model.num_layers=... ...]

Prints JSON. The parameter count comes from building the GPTModel on the meta device (shapes
without memory), so it is exactly what training would allocate, for any size. It is counted on the
local modules also for `model.transformer_impl=te`: TransformerEngine allocates real memory even
under the meta device, and its modules hold the same tensors (norm weights inside the fused linears).
"""

from __future__ import annotations

import json
import sys

import torch

from llama_plugin import flops
from llama_plugin.distributed import init_distributed
from llama_plugin.model import ModelConfigError, build_gpt_model, ffn_hidden_size, head_dim, num_query_groups, transformer_config
from recipes import RecipeError, compose
from recipes.schema import DescribeConfig


def count_parameters(model_cfg) -> int:
    """Exact parameter count of the full (TP=1, PP=1) model, without allocating weights."""
    init_distributed(1, 1)
    config = transformer_config(model_cfg, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        model = build_gpt_model(model_cfg, config)
    assert all(p.is_meta for p in model.parameters()), "a parameter was allocated for real"
    return sum(p.numel() for p in model.parameters())


def describe(model_cfg) -> dict:
    n = count_parameters(model_cfg)
    return {
        "name": model_cfg.name,
        "num_parameters": n,
        "num_layers": model_cfg.num_layers,
        "hidden_size": model_cfg.hidden_size,
        "ffn_hidden_size": ffn_hidden_size(model_cfg),
        "num_attention_heads": model_cfg.num_attention_heads,
        "num_query_groups": num_query_groups(model_cfg),
        "head_dim": head_dim(model_cfg),
        "vocab_size": model_cfg.vocab_size,
        "seq_length": model_cfg.seq_length,
        "norm_epsilon": model_cfg.norm_epsilon,
        "rotary_base": model_cfg.rotary_base,
        "sliding_window": model_cfg.sliding_window,
        **{k: model_cfg[k] for k in ("normalization", "activation", "position_embedding", "bias", "parallel_layers")},
        "share_embeddings_and_output_weights": model_cfg.share_embeddings_and_output_weights,
        "flops_per_token": flops.flops_per_token(n, model_cfg),
        "flops_formula": flops.FORMULA,
        "counted_on": "local modules (the same tensors as transformer_impl=te)",
    }


def main(argv=None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__)
        return 0
    try:
        cfg = compose("describe", overrides, DescribeConfig)
        print(json.dumps(describe(cfg.model), indent=2))
    except (RecipeError, ModelConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
