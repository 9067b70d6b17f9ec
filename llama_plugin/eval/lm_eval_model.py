"""lm-eval's model class `llama_mcore`: a megatron-core checkpoint of ours served to lm-evaluation-harness.

    python -m llama_plugin.eval.lm_eval_model --model llama_mcore \\
        --model_args ckpt=runs/x/checkpoints/step_00001000,tokenizer=tokenizer.model --tasks hellaswag

(lm-eval's own command line, after this module has registered the class; in Python, import this
module and pass model="llama_mcore" to lm_eval.simple_evaluate.) The checkpoint loads in any layout,
whatever it was saved in: tp=1,pp=1 (default) in this process; tp=N and/or pp=M in N x M spawned
ranks per request batch, as python -m llama_plugin.eval runs them. Requests are encoded as
llama_plugin.eval does (lm-eval's `hf` model's rules, BOS first unless add_bos=false):

    loglikelihood          log P(continuation | context) and whether it is the greedy continuation
    loglikelihood_rolling  the whole string's log-likelihood over lm-eval's disjoint rolling windows
    generate_until         greedy decoding until a stop string, EOS or max_gen_toks
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llama_plugin.eval.loglikelihood import encode_pair, megatron_logits_fn, score_requests


@register_model("llama_mcore")
class LlamaMcore(LM):
    def __init__(self, ckpt: str, tokenizer: str, add_bos: bool = True, batch_tokens: int = 2048,
                 max_gen_toks: int = 256, tp: int = 1, pp: int = 1, **_ignored):
        super().__init__()
        from llama_plugin.checkpoint import read_model_record
        from llama_plugin.finetune.sft_data import load_tokenizer
        from llama_plugin.generate import load_for_inference

        self.ckpt, self.tokenizer_path, self.tp, self.pp = ckpt, tokenizer, int(tp), int(pp)
        if self.tp * self.pp == 1:
            self.model, model_cfg = load_for_inference(ckpt, 1, 1)
        else:  # ranks are spawned per request batch (megatron's parallel state is per process)
            self.model, (model_cfg, _) = None, read_model_record(ckpt)
        self.max_length, self.vocab_size = model_cfg.seq_length, model_cfg.vocab_size
        self.tok = load_tokenizer(tokenizer)
        self.add_bos = add_bos if isinstance(add_bos, bool) else str(add_bos).lower() == "true"
        self.batch_tokens, self.max_gen_toks = int(batch_tokens), int(max_gen_toks)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _score(self, pairs):
        if self.model is None:
            from llama_plugin.eval.backends import megatron_encoded_scores

            lls, greedy, _ = megatron_encoded_scores(self.ckpt, self.tp, self.pp, pairs, self.batch_tokens)
            return lls, [bool(g) for g in greedy]
        lls, greedy, _ = score_requests(pairs, megatron_logits_fn(self.model), self.max_length, self.batch_tokens)
        return lls, greedy

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        bos = self.tok.bos_token_id if self.add_bos else None
        pairs = [encode_pair(self._encode, *r.args, bos) for r in requests]
        return list(zip(*self._score(pairs)))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval import utils

        windows, owner = [], []
        for i, r in enumerate(requests):
            for ctx, pred in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self._encode(r.args[0]), prefix_token=self.tok.bos_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((list(ctx), list(pred)))
                owner.append(i)
        lls, _ = self._score(windows)
        out = [0.0] * len(requests)
        for i, ll in zip(owner, lls):
            out[i] += ll
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        from llama_plugin.eval.decoding import continuation_text, finish_text
        from llama_plugin.generate import generate_ids

        if self.model is None:
            return self._generate_spawned(requests)
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = ([self.tok.bos_token_id] if self.add_bos else []) + self._encode(context)
            prompt = prompt[-(self.max_length - 1):]
            ids = generate_ids(self.model, prompt, int(kwargs.get("max_gen_toks", self.max_gen_toks)), greedy=True,
                               eos_id=self.tok.eos_token_id, max_length=self.max_length,
                               vocab_limit=min(len(self.tok), self.vocab_size))
            out.append(finish_text(continuation_text(self.tok, prompt, ids), tuple(until)))
        return out


    def _generate_spawned(self, requests):
        from llama_plugin.eval.decoding import Request, continuation_text, finish_text, megatron_generate

        batch = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            prompt = ([self.tok.bos_token_id] if self.add_bos else []) + self._encode(context)
            batch.append(Request(tuple(prompt[-(self.max_length - 1):]), int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                                 True, 1.0, 1.0, seed=0, stop=until))
        ids, _ = megatron_generate(self.ckpt, self.tp, self.pp, self.tokenizer_path, batch)
        return [finish_text(continuation_text(self.tok, q.prompt, new), q.stop) for q, new in zip(batch, ids)]


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
