"""Benchmarks scored on the model being trained (train.eval_tasks): the LLaMA paper's Figure 2.

Multiple choice: the requests are built once; each data-parallel group scores its share (every
DP-th request) in a forward-only pass of the training model (all pipeline stages and
tensor-parallel ranks take part); the log-likelihoods are summed over the world, so every rank gets
all of them and rank 0 logs eval/<task>/<metric> (acc, acc_norm, llama_acc) with the training
metrics. NaturalQuestions and TriviaQA (0-shot, the paper's prompt): each data-parallel group
decodes its share of the questions greedily (train.eval_tasks_max_new_tokens, until a line break) and the exact
matches are summed over the world: eval/<task>/exact_match. GSM8K and HumanEval sample long
answers: they are for `python -m llama_plugin.eval` on checkpoints, and refused here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from llama_plugin.eval.backends import encoded_pairs
from llama_plugin.eval.loglikelihood import score_requests
from llama_plugin.eval.scoring import requests, task_metrics
from llama_plugin.eval.generation_tasks import IN_LOOP_GENERATIVE
from llama_plugin.eval.tasks import task_items


class InLoopEval:
    def __init__(self, cfg, chunks, batch_tokens: int = 2048):
        from llama_plugin.finetune.sft_data import load_tokenizer

        t = cfg.train
        if len(chunks) != 1:
            raise ValueError("train.eval_tasks: not supported with a virtual (interleaved) pipeline")
        self.model, self.seq, self.batch_tokens = chunks[0], cfg.model.seq_length, batch_tokens
        self.pad_multiple = cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1
        from llama_plugin.eval.generation_tasks import GENERATION_TASKS, generation_items

        for task in t.eval_tasks:
            if task in GENERATION_TASKS and task not in IN_LOOP_GENERATIVE:
                raise ValueError(f"train.eval_tasks: {task} is evaluated on checkpoints (python -m llama_plugin.eval), "
                                 f"not in the loop; generative tasks here: {', '.join(IN_LOOP_GENERATIVE)}")
        self.items = {task: task_items(task)[:t.eval_tasks_limit] for task in t.eval_tasks
                      if task not in IN_LOOP_GENERATIVE}
        self.questions = {task: generation_items(task, 0)[:t.eval_tasks_limit] for task in t.eval_tasks
                          if task in IN_LOOP_GENERATIVE}
        self.pairs = requests([i for items in self.items.values() for i in items])
        self.tok = load_tokenizer(cfg.data.tokenizer_model)
        self.max_new_tokens = t.eval_tasks_max_new_tokens
        self.vocab_limit = min(len(self.tok), cfg.model.vocab_size)
        encoded = encoded_pairs(self.tok, self.pairs, add_bos=True)
        dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        self.dp_rank, self.dp = dp_rank, dp
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
        for task, questions in self.questions.items():
            out[f"eval/{task}/exact_match"] = self.exact_match(questions)
        return out

    def exact_match(self, questions) -> float:
        """Greedy answers to this data-parallel group's share of the questions; the share of exact
        matches over all of them (collective over the world)."""
        from llama_plugin.distributed import device
        from llama_plugin.eval.decoding import continuation_text, finish_text, fit_prompt, stopped
        from llama_plugin.eval.generative import exact_match, qa_answer
        from llama_plugin.generate import generate_ids

        hits = torch.zeros(len(questions), dtype=torch.float64, device=device())
        budget = self.max_new_tokens
        for i in range(self.dp_rank, len(questions), self.dp):
            q = questions[i]
            prompt = fit_prompt([self.tok.bos_token_id] + self.tok.encode(q.prompt, add_special_tokens=False),
                                budget, self.seq)
            ids = generate_ids(self.model, prompt, budget, greedy=True, eos_id=self.tok.eos_token_id,
                               max_length=self.seq, vocab_limit=self.vocab_limit, pad_multiple=self.pad_multiple,
                               should_stop=lambda new, p=prompt, q=q: stopped(continuation_text(self.tok, p, new), q.stop))
            if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_last_stage():
                answer = qa_answer(finish_text(continuation_text(self.tok, prompt, ids), q.stop))
                hits[i] = exact_match(answer, list(q.references))
        dist.all_reduce(hits)
        return float(hits.sum()) / len(questions)
