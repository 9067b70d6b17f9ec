"""log P(continuation | context) for many (context, continuation) pairs, from an HF folder or a
megatron-core checkpoint in any TP/PP layout.

Requests are encoded as lm-eval's HF model does (`_encode_pair`): trailing spaces of the context
move to the continuation; the continuation's tokens are those of encode(context + continuation)
after the first len(encode(context)); BOS first when `add_bos` (LLaMA was trained with one on every
sequence; lm-eval's `add_bos_token`). Contexts are cut from the left to fit the model's length; a
continuation longer than the whole window is scored on its last tokens (counted in the speed
figures as continuations_cut).
Requests run longest first in batches of about `batch_tokens` tokens, right-padded (the models are
causal, so padding after a request changes none of its logits), and each result is returned in
request order.
"""

from __future__ import annotations

import time

import torch


def encode_pair(encode, context: str, continuation: str, bos_id: int | None) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    prefix = [bos_id] if bos_id is not None else []
    return prefix + ctx, whole[len(ctx):]


def batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Request indices, longest first, grouped so that rows x longest row <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            out.append(current)
            current = []
        current.append(i)
    return out + [current] if current else out


def score_requests(pairs: list[tuple[list[int], list[int]]], logits_fn, max_length: int,
                   batch_tokens: int = 2048, pad_multiple: int = 1) -> tuple[list[float], list[bool], dict]:
    """(sum of continuation log-probabilities, whether the continuation is the greedy one) per pair,
    and speed figures. `logits_fn(tokens [B, S] long) -> [B, S, V] float logits`, or None on a rank
    that holds no logits (a megatron rank before the last pipeline stage). Rows are padded to a
    multiple of `pad_multiple` (tensor-parallel size under sequence parallelism)."""
    inputs = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("a request with an empty continuation")
        tokens = (ctx + cont)[-(max_length + 1):][:-1]  # the last token is only predicted
        # a continuation longer than the window keeps its last len(tokens) tokens (lm-eval's
        # window, made safe): the ones cut off have no context to be scored in
        inputs.append((tokens, min(len(cont), len(tokens))))
    lls, greedy = [0.0] * len(pairs), [False] * len(pairs)
    start, tokens_done = time.perf_counter(), 0
    for batch in batches([len(t) for t, _ in inputs], batch_tokens):
        width = -(-len(inputs[batch[0]][0]) // pad_multiple) * pad_multiple  # sequence parallel splits it
        rows = torch.zeros(len(batch), width, dtype=torch.long)
        for r, i in enumerate(batch):
            rows[r, :len(inputs[i][0])] = torch.tensor(inputs[i][0])
        with torch.no_grad():
            logits = logits_fn(rows)
        if logits is None:  # not the last pipeline stage: it took part in the forward; no scores here
            continue
        for r, i in enumerate(batch):
            tokens, n = inputs[i]
            cont = torch.tensor(pairs[i][1][-n:])
            # only the positions that predict the continuation are normalized
            scored = torch.log_softmax(logits[r, len(tokens) - n:len(tokens)].float(), dim=-1)
            lls[i] = float(scored.gather(-1, cont.unsqueeze(-1)).sum())
            greedy[i] = bool((scored.argmax(-1) == cont).all())
            tokens_done += len(tokens)
    seconds = time.perf_counter() - start
    cut = sum(n < len(cont) for (_, n), (_, cont) in zip(inputs, pairs))
    return lls, greedy, {"requests": len(pairs), "tokens": tokens_done, "seconds": seconds, "continuations_cut": cut,
                         "tokens_per_s": tokens_done / seconds if seconds else None}


def hf_logits_fn(folder, dtype: torch.dtype):
    """logits of a transformers LlamaForCausalLM (and its max length)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens).logits

    return logits, model.config.max_position_embeddings, model.config.vocab_size


def megatron_logits_fn(model):
    """logits of a loaded megatron-core model on the last pipeline stage (None elsewhere);
    collective over the model-parallel group."""
    from llama_plugin.generate import last_stage_logits

    return lambda tokens: last_stage_logits(model, tokens)
