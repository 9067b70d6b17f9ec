"""The LLaMA data recipe: raw text -> cleaned JSONL -> SentencePiece BPE tokenizer -> megatron-core
indexed datasets (.bin/.idx per source) that the training recipes blend.

    clean.py, sources/   the seven sources' cleaners and corpus-wide dedups as datatrove stages
    tokenizer.py         SentencePiece BPE with LLaMA's settings; hf_tokenizer.py its HF folder
    tokenize_parallel.py JSONL -> .bin/.idx in N processes (tokenize_tasks.py: as datatrove tasks)
    mixture.py           blend weights and epochs per source for a token budget
    pipeline.py          all of it in one command, locally or as dependent Slurm jobs
    corpus.py, samples.py  the demo book and the real raw samples the tests use
"""
