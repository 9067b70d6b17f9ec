"""Benchmarks scored on the model being trained (train.eval_tasks): the LLaMA paper's Figure 2.

The requests are built once; each data-parallel group scores its share (every DP-th request) in a
forward-only pass of the training model (all pipeline stages and tensor-parallel ranks take part);
the log-likelihoods are summed over the world, so every rank gets all of them and rank 0 logs
eval/<task>/<metric> (acc, acc_norm, llama_acc) with the training metrics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from llama_plugin.eval.backends import encoded_pairs
from llama_plugin.eval.loglikelihood import score_requests
from llama_plugin.eval.scoring import requests, task_metrics
from llama_plugin.eval.tasks import olmo_items


class InLoopEval:
    def __init__(self, cfg, chunks, batch_tokens: int = 2048):
        from llama_plugin.finetune.sft_data import load_tokenizer

        t = cfg.train
        if len(chunks) != 1:
            raise ValueError("train.eval_tasks: not supported with a virtual (interleaved) pipeline")
        self.model, self.seq, self.batch_tokens = chunks[0], cfg.model.seq_length, batch_tokens
        self.pad_multiple = cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1
        self.items = {task: olmo_items(task)[:t.eval_tasks_limit] for task in t.eval_tasks}
        self.pairs = requests([i for items in self.items.values() for i in items])
        encoded = encoded_pairs(load_tokenizer(cfg.data.tokenizer_model), self.pairs, add_bos=True)
        dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        self.mine = list(range(dp_rank, len(self.pairs), dp))
        self.encoded = [encoded[i] for i in self.mine]

    def __call__(self) -> dict:
        """{eval/<task>/<metric>: value, ...} on every rank (collective over the world)."""
        from llama_plugin.distributed import device
        from llama_plugin.generate import last_stage_logits

        lls, _, _ = score_requests(self.encoded, lambda tokens: last_stage_logits(self.model, tokens), self.seq,
                                   self.batch_tokens, pad_multiple=self.pad_multiple)
        full = torch.zeros(len(self.pairs), dtype=torch.float64, device=device())
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            full[self.mine] = torch.tensor(lls, dtype=torch.float64, device=full.device)
        dist.all_reduce(full)
        ll = dict(zip(self.pairs, full.cpu().tolist()))
        out = {}
        for task, items in self.items.items():
            metrics, _ = task_metrics(items, ll)
            out.update({f"eval/{task}/{name}": m["value"] for name, m in metrics.items()})
        return out
