"""The LLaMA data recipe: raw text -> cleaned JSONL -> SentencePiece BPE tokenizer -> megatron-core
indexed datasets (.bin/.idx per source) that the training recipes blend.

This first version holds what the CPU demo needs (a real English corpus available offline, the
tokenizer with LLaMA's settings, tokenization); the per-source cleaners, dedup and mixture tools
are the data_prep issue.
"""
