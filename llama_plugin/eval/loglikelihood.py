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


def score_shared_contexts(pairs: list[tuple[list[int], list[int]]], model, max_length: int,
                          batch_tokens: int = 2048) -> tuple[list[float], list[bool], dict]:
    """As score_requests, for an HF causal LM, with every context computed once: the requests
    that share a context (a multiple-choice item's choices) are packed into one row, the context
    then each continuation, with a block mask (a continuation sees the context and itself, never
    another continuation) and position ids that restart after the context for each one. The
    log-probabilities are those of separate rows (the same attention, in another order of sums).
    Requests that do not fit the window unpacked go through score_requests."""
    groups: dict[tuple, list[int]] = {}
    rest = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError("a request with an empty continuation")
        if ctx and len(ctx) + len(cont) - 1 <= max_length:
            groups.setdefault(tuple(ctx), []).append(i)
        else:
            rest.append(i)
    rows = []  # (context, [request indices]) each fitting max_length
    for ctx, members in groups.items():
        row, length = [], len(ctx)
        for i in members:
            if row and length + len(pairs[i][1]) - 1 > max_length:
                rows.append((list(ctx), row))
                row, length = [], len(ctx)
            row.append(i)
            length += len(pairs[i][1]) - 1
        rows.append((list(ctx), row))
    lengths = [len(ctx) + sum(len(pairs[i][1]) - 1 for i in members) for ctx, members in rows]
    lls, greedy = [0.0] * len(pairs), [False] * len(pairs)
    start, tokens_done = time.perf_counter(), 0
    for batch in batches(lengths, batch_tokens):
        width = lengths[batch[0]]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(len(batch), 1, 1)  # padding sees itself
        where = []  # (row, request, scored positions)
        for r, b in enumerate(batch):
            ctx, members = rows[b]
            n_ctx = len(ctx)
            ids[r, :n_ctx] = torch.tensor(ctx)
            positions[r, :n_ctx] = torch.arange(n_ctx)
            allowed[r, :n_ctx, :n_ctx] = torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool))
            s = n_ctx
            for i in members:
                seg = pairs[i][1][:-1]
                n = len(seg)
                if n:
                    ids[r, s:s + n] = torch.tensor(seg)
                    positions[r, s:s + n] = torch.arange(n_ctx, n_ctx + n)
                    allowed[r, s:s + n, :n_ctx] = True
                    allowed[r, s:s + n, s:s + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
                where.append((r, i, [n_ctx - 1, *range(s, s + n)]))
                s += n
            tokens_done += s
        mask = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill_(~allowed, torch.finfo(model.dtype).min)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask.unsqueeze(1), position_ids=positions).logits
        for r, i, at in where:
            cont = torch.tensor(pairs[i][1])
            scored = torch.log_softmax(logits[r, at].float(), dim=-1)
            lls[i] = float(scored.gather(-1, cont.unsqueeze(-1)).sum())
            greedy[i] = bool((scored.argmax(-1) == cont).all())
    speed_rest = {"tokens": 0, "continuations_cut": 0}
    if rest:
        more, more_greedy, speed_rest = score_requests([pairs[i] for i in rest], lambda t: model(input_ids=t).logits,
                                                       max_length, batch_tokens)
        for i, ll, g in zip(rest, more, more_greedy):
            lls[i], greedy[i] = ll, g
    seconds = time.perf_counter() - start
    tokens = tokens_done + speed_rest["tokens"]
    return lls, greedy, {"requests": len(pairs), "tokens": tokens, "seconds": seconds,
                         "continuations_cut": speed_rest["continuations_cut"], "packed_rows": len(rows),
                         "tokens_per_s": tokens / seconds if seconds else None}


def hf_model(folder, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


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
