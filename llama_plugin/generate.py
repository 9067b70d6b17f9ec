"""Sample from a megatron-core LLaMA checkpoint, in any TP/PP layout its shape allows.

    python -m llama_plugin.generate --ckpt DIR (--prompt TEXT --tokenizer MODEL | --prompt-ids 1,2,3)
        --max-new-tokens N [--greedy | --temperature T --top-p P --seed S] [--tp N --pp N]

Prints one JSON line: prompt ids, generated ids (and text with a tokenizer). Every step runs the
whole sequence through megatron-core's forward-only schedule (no KV cache): simple, exact in any
layout, and fast enough for checkpoints one inspects by hand. Local processes are spawned for
TP x PP > 1 unless already under torchrun.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from llama_plugin import checkpoint
from llama_plugin.distributed import device, init_distributed, run_in_world
from llama_plugin.model import build_gpt_model, transformer_config


def last_stage_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [batch, seq, vocab] for `tokens` on the last pipeline stage, else None.

    Collective over the model-parallel group; every rank passes the same tokens.
    """
    tokens = tokens.to(device())
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, -1)

    def forward_step(data_iterator, chunk):
        logits = chunk(tokens, positions, None, runtime_gather_output=True)
        return logits, lambda output, non_loss_data=True: output

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[model],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
        collect_non_loss_data=True,
    )
    return outputs[0].float().cpu() if parallel_state.is_pipeline_last_stage() else None


def pick_next(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy argmax, or nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    if greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # the top token always stays
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=gen)
    return int(order[choice])


def generate_ids(model, prompt: list[int], max_new_tokens: int, *, greedy=True, temperature=1.0,
                 top_p=1.0, seed=0, eos_id: int | None = None, max_length: int | None = None,
                 vocab_limit: int | None = None, should_stop=None, pad_multiple: int = 1) -> list[int]:
    """New token ids after `prompt`; collective over the model-parallel group.

    `vocab_limit`: sample only ids below it (a model vocabulary padded past the tokenizer's).
    `should_stop(new_ids) -> bool`: end early (a stop string); every rank must decide alike.
    `pad_multiple`: the sequence is right-padded to a multiple of it (the tensor-parallel size under
    sequence parallelism); a causal model's logits before the padding do not change.
    """
    gen = torch.Generator().manual_seed(seed)
    tokens = list(prompt)
    last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
    for _ in range(max_new_tokens):
        if max_length is not None and len(tokens) >= max_length:
            break
        width = -(-len(tokens) // pad_multiple) * pad_multiple
        with torch.no_grad():
            logits = last_stage_logits(model, torch.tensor([tokens + [0] * (width - len(tokens))]))
        nxt = torch.tensor([-1], device=device())
        if logits is not None:
            nxt[0] = pick_next(logits[0, len(tokens) - 1, :vocab_limit].cpu(), greedy, temperature, top_p, gen)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(nxt, src=last_rank, group=parallel_state.get_pipeline_model_parallel_group())
        tokens.append(int(nxt[0]))
        if eos_id is not None and tokens[-1] == eos_id:
            break
        if should_stop is not None and should_stop(tokens[len(prompt):]):
            break
    return tokens[len(prompt):]


def load_for_inference(ckpt_dir, tp: int = 1, pp: int = 1):
    """Initialize the layout and load a checkpoint into this rank's model (eval mode)."""
    model_cfg, dtype = checkpoint.read_model_record(ckpt_dir)
    init_distributed(tp, pp)
    config = transformer_config(model_cfg, tensor_parallel=tp, pipeline_parallel=pp, params_dtype=dtype,
                                perform_initialization=False)
    model = build_gpt_model(model_cfg, config)
    checkpoint.load_checkpoint([model], ckpt_dir)
    return model.eval(), model_cfg


def _run(args, prompt: list[int], eos_id: int | None, vocab_limit: int | None) -> None:
    model, model_cfg = load_for_inference(args.ckpt, args.tp, args.pp)
    ids = generate_ids(
        model, prompt, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, eos_id=eos_id, max_length=model_cfg.seq_length,
        vocab_limit=vocab_limit,
    )
    if dist.get_rank() == 0:
        result = {"prompt_ids": prompt, "generated_ids": ids}
        if args.tokenizer:
            import sentencepiece as spm

            result["text"] = spm.SentencePieceProcessor(model_file=args.tokenizer).decode(ids)
        print(json.dumps(result), flush=True)


def _prompt(args, vocab_size: int) -> tuple[list[int], int | None, int | None]:
    """(prompt ids, eos id, tokenizer vocab size): the text encoded with a BOS as LLaMA does, or the
    given ids, checked."""
    if args.tokenizer:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
        if sp.vocab_size() > vocab_size:
            raise ValueError(f"--tokenizer: {sp.vocab_size()} pieces, model vocab_size is {vocab_size}")
        return [sp.bos_id()] + sp.encode(args.prompt), sp.eos_id(), sp.vocab_size()
    try:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids: not comma-separated integers: {args.prompt_ids!r}") from None
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if not prompt or bad:
        raise ValueError(f"--prompt-ids: need ids in [0, {vocab_size}); got {bad or 'none'}")
    return prompt, None, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_plugin.generate", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="megatron-core checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs --tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks")
    args = p.parse_args(argv)
    if args.prompt is not None and not args.tokenizer:
        p.error("--prompt needs --tokenizer")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be > 0 and --top-p in (0, 1]")
    try:
        model_cfg, _ = checkpoint.read_model_record(args.ckpt)
        prompt, eos_id, vocab_limit = _prompt(args, model_cfg.vocab_size)
        run_in_world(args.tp * args.pp, _run, args, prompt, eos_id, vocab_limit)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
