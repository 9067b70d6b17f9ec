"""The two model backends of `python -m llama_plugin.eval`: an HF folder in this process, or a
megatron-core checkpoint in its TP x PP layout (processes spawned unless under torchrun; the last
stage's first tensor-parallel rank hands the scores back through a file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from llama_plugin.eval.tasks import EvalError


def model_kind(path: Path) -> str:
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    from llama_plugin.checkpoint import CheckpointError, read_model_record

    try:
        read_model_record(path)
    except CheckpointError as e:
        raise EvalError(f"--model: {path} is neither an HF folder (config.json + *.safetensors) nor a "
                        f"megatron checkpoint ({e})") from None
    return "megatron"


def load_tokenizer(args, kind: str):
    from llama_plugin.finetune.sft_data import load_tokenizer as sp_tokenizer

    if args.tokenizer:
        return sp_tokenizer(args.tokenizer)
    if kind == "hf" and ((args.model / "tokenizer.model").is_file() or (args.model / "tokenizer.json").is_file()):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(args.model))
    raise EvalError(f"--tokenizer: needed ({args.model} holds no tokenizer)")


def encoded_pairs(tokenizer, pairs: list[tuple[str, str]], add_bos: bool):
    from llama_plugin.eval.loglikelihood import encode_pair

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    return [encode_pair(encode, x, c, tokenizer.bos_token_id if add_bos else None) for x, c in pairs]


def hf_scores(args, pairs):
    import torch

    from llama_plugin.eval.loglikelihood import hf_model, score_shared_contexts

    model = hf_model(args.model, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    encoded = encoded_pairs(load_tokenizer(args, "hf"), pairs, not args.no_bos)
    return score_shared_contexts(encoded, model, model.config.max_position_embeddings, args.batch_tokens)


def _megatron_worker(ckpt, tp: int, pp: int, encoded, batch_tokens: int, out_file: str) -> None:
    """Every rank: load the checkpoint in the layout, run every request; the last stage's first
    tensor-parallel rank writes the results."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from llama_plugin.eval.loglikelihood import megatron_logits_fn, score_requests
    from llama_plugin.generate import load_for_inference

    model, model_cfg = load_for_inference(ckpt, tp, pp)
    lls, greedy, speed = score_requests(encoded, megatron_logits_fn(model), model_cfg.seq_length, batch_tokens)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        tmp = out_file + ".tmp"
        Path(tmp).write_text(json.dumps({"lls": lls, "greedy": greedy, "speed": speed}))
        os.replace(tmp, out_file)
    dist.barrier()


def megatron_encoded_scores(ckpt, tp: int, pp: int, encoded, batch_tokens: int):
    """(log-likelihoods, greedy flags, speed) of encoded (context, continuation) id pairs from a
    megatron-core checkpoint in a TP x PP layout (spawned ranks unless under torchrun)."""
    from llama_plugin.distributed import run_in_world

    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "scores.json")
        run_in_world(tp * pp, _megatron_worker, str(ckpt), tp, pp, encoded, batch_tokens, out_file)
        got = json.loads(Path(out_file).read_text())
    return got["lls"], got["greedy"], got["speed"]


def megatron_scores(args, pairs):
    encoded = encoded_pairs(load_tokenizer(args, "megatron"), pairs, not args.no_bos)
    return megatron_encoded_scores(args.model, args.tp, args.pp, encoded, args.batch_tokens)


def generate_texts(args, kind: str, items: list, samples: int, greedy: bool, temperature: float,
                   top_p: float, max_new_tokens) -> tuple[list[list[str]], dict]:
    """`samples` generations per item (text before the item's first stop string), from either backend.
    Sample s of the i-th item is seeded with (args.seed, i, s): it does not depend on --limit or on
    the other tasks. `max_new_tokens(item) -> int`."""
    import torch

    from llama_plugin.eval.decoding import Request, continuation_text, finish_text, hf_generate, megatron_generate

    tok = load_tokenizer(args, kind)
    bos = [] if args.no_bos else [tok.bos_token_id]
    requests = []
    for i, item in enumerate(items):
        prompt = tuple(bos + tok.encode(item.prompt, add_special_tokens=False))
        requests += [Request(prompt, max_new_tokens(item), greedy, temperature, top_p,
                             seed=args.seed + 1_000_003 * i + s, stop=item.stop) for s in range(samples)]
    if kind == "hf":
        ids, speed = hf_generate(args.model, torch.bfloat16 if args.dtype == "bf16" else torch.float32, requests,
                                 tok, vocab_limit=len(tok))
    else:
        ids, speed = megatron_generate(args.model, args.tp, args.pp, str(args.tokenizer), requests)
    texts = [finish_text(continuation_text(tok, r.prompt, new), r.stop) for r, new in zip(requests, ids)]
    return [texts[i * samples:(i + 1) * samples] for i in range(len(items))], speed
