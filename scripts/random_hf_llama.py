"""Write a randomly initialised Hugging Face LlamaForCausalLM folder for a model preset.

    python scripts/random_hf_llama.py --out DIR [model=tiny model.num_layers=4 ...]

For trying the converters and generation without downloading weights.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    import transformers

    from llama_plugin.hf import hf_config_from_model
    from recipes import compose
    from recipes.schema import DescribeConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args, overrides = p.parse_known_args()
    model = compose("describe", overrides, DescribeConfig).model
    config = transformers.LlamaConfig(**hf_config_from_model(model, torch.float32))
    torch.manual_seed(args.seed)
    transformers.LlamaForCausalLM(config).save_pretrained(args.out)
    print(f"random {model.name} LLaMA in HF format: {args.out}")


if __name__ == "__main__":
    main()
