"""Our SentencePiece BPE model as a Hugging Face tokenizer folder.

The folder holds tokenizer.model (the SentencePiece file itself), tokenizer.json (a `tokenizers`
pipeline equivalent to SentencePiece: prepend '▁', spaces -> '▁', BPE with byte fallback, BOS
added), tokenizer_config.json and special_tokens_map.json.

`AutoTokenizer.from_pretrained(folder)` loads tokenizer.json as written and gives SentencePiece's
ids (+ BOS) for any text. `LlamaTokenizer.from_pretrained(folder)` (transformers 5) rebuilds its
own pre-tokenizer (Metaspace), which does not add the dummy prefix to text that already starts
with a space: for such text (" x", "  ") its ids differ from SentencePiece's; all other text matches.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def bpe_merges(sp: spm.SentencePieceProcessor) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and BPE merge list equivalent to a SentencePiece BPE model.

    SentencePiece merges the adjacent pair whose concatenation is the highest-scoring piece; a
    merge list ranked by the merged piece's score reproduces that. Each normal piece contributes
    every split into two pieces of the vocabulary.
    """
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = [i for i in range(sp.get_piece_size())
              if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))]
    merges = []
    for i in sorted(normal, key=lambda i: (-sp.get_score(i), i)):
        piece = sp.id_to_piece(i)
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]])))
    return vocab, merges


def build_hf_tokenizer(sp: spm.SentencePieceProcessor) -> Tokenizer:
    """A `tokenizers` pipeline that encodes like `sp` (normalization rule 'identity', dummy prefix)."""
    vocab, merges = bpe_merges(sp)
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    specials = [sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()) if i >= 0]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = sp.id_to_piece(sp.bos_id())
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, sp.bos_id())])
    return tok


def export_hf_tokenizer(tokenizer_model: Path, out_dir: Path, model_max_length: int = 2048) -> Path:
    """Write the four files into `out_dir`. A new folder appears complete (built beside it and
    renamed); into an existing one (e.g. an HF model folder) the files are renamed in one by one,
    tokenizer_config.json last; other files there are left alone."""
    tokenizer_model = Path(tokenizer_model)
    if not tokenizer_model.is_file():
        raise FileNotFoundError(f"{tokenizer_model}: no such SentencePiece model")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise ValueError(f"{tokenizer_model}: the model has no BOS or EOS piece")
    unk, bos, eos = (sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()))
    config = {
        # The generic fast class loads tokenizer.json unchanged (LlamaTokenizer would rebuild it).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": bos, "eos_token": eos, "unk_token": unk,
        "clean_up_tokenization_spaces": False,
        "legacy": True,  # LlamaTokenizer: Metaspace prepend scheme "always" (see the module docstring)
        "model_max_length": model_max_length,
        "padding_side": "left",
    }
    special_map = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.export-") as tmp:
        tmp = Path(tmp)
        shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        build_hf_tokenizer(sp).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
        if not out_dir.exists():
            os.rename(tmp, out_dir)  # the folder appears complete
            tmp.mkdir()  # for TemporaryDirectory's cleanup
        else:  # e.g. an HF model folder: file by file, the config (which makes it a tokenizer) last
            (out_dir / "tokenizer_config.json").unlink(missing_ok=True)
            for name in FILES:
                os.replace(tmp / name, out_dir / name)
    return out_dir
