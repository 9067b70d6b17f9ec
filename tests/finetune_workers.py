"""Several fine-tuning runs in one 2-process world (one torchrun launch, one DeepSpeed start-up).

    torchrun --nproc_per_node 2 -m tests.finetune_workers CASES.json

CASES.json: [{"recipe": "tiny_alpaca_cpu", "overrides": ["zero=stage1", ...]}, ...]; each case is
run to completion (or to train.exit_at_step) by llama_plugin.finetune.trainer.run, in order.
A case {"damage": RUN_DIR} flips one byte in the largest file of RUN_DIR's newest checkpoint;
{"tear": RUN_DIR} appends half a line to RUN_DIR/metrics.jsonl (a crash during a write).
"""

import json
import sys

from llama_plugin.finetune.trainer import load_recipe, run
from recipes.finetune_schema import check_finetune


def damage_newest_checkpoint(run_dir: str) -> None:
    from pathlib import Path

    from llama_plugin.finetune.ds_checkpoint import complete

    newest = complete(Path(run_dir) / "checkpoints")[-1][1]
    target = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x20
    target.write_bytes(bytes(data))
    (Path(run_dir) / "damaged.txt").write_text(f"{target.relative_to(newest.parent)}\n")


def main(cases_file: str) -> None:
    import torch.distributed as dist

    cases = json.loads(open(cases_file).read())
    for case in cases:
        if "tear" in case:
            if dist.get_rank() == 0:
                with open(f"{case['tear']}/metrics.jsonl", "a") as f:
                    f.write('{"step": 5, "loss": 6.2')
            dist.barrier()
            continue
        if "damage" in case:
            if dist.get_rank() == 0:
                damage_newest_checkpoint(case["damage"])
            dist.barrier()
            continue
        cfg = load_recipe([case["recipe"], *case["overrides"]])
        check_finetune(cfg, 2)
        run(cfg)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
