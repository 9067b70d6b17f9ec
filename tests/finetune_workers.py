"""Several fine-tuning runs in one 2-process world (one torchrun launch, one DeepSpeed start-up).

    torchrun --nproc_per_node 2 -m tests.finetune_workers CASES.json

CASES.json: [{"recipe": "tiny_alpaca_cpu", "overrides": ["zero=stage1", ...]}, ...]; each case is
run to completion (or to train.exit_at_step) by llama_plugin.finetune.trainer.run, in order.
"""

import json
import sys

from llama_plugin.finetune.trainer import load_recipe, run
from recipes.finetune_schema import check_finetune


def main(cases_file: str) -> None:
    import torch.distributed as dist

    cases = json.loads(open(cases_file).read())
    for case in cases:
        cfg = load_recipe([case["recipe"], *case["overrides"]])
        check_finetune(cfg, 2)
        run(cfg)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
