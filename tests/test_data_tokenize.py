"""data_prep's tokenizer export, parallel tokenization and mixture: outputs checked against
SentencePiece, against the single-process tokenize_jsonl byte for byte, after a real kill -9, and
against hand computations."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import zstandard
from omegaconf import OmegaConf

from data_prep.__main__ import main as data_prep_main
from data_prep.hf_tokenizer import export_hf_tokenizer
from data_prep.mixture import (MixtureError, blend_weights, dataset_size, effective_epochs, implied_source_tokens,
                               mixture_report)
from data_prep.tokenize_parallel import InputError, tokenize_parallel
from data_prep.tokenizer import train_tokenizer
from recipes import compose
from recipes.schema import RecipeConfig

REPO = Path(__file__).resolve().parent.parent

# Text a tokenizer must not mangle: leading/multiple spaces, newlines, tabs and code indentation,
# digits, characters the Botchan tokenizer never saw (emoji, CJK, math: byte fallback), empty text.
VARIED = [
    "Hello world", " leading space", "two  spaces   three", "line1\nline2\n\n", "\tdef f(x):\n        return x + 1\n",
    "1234567 and 3.14159", "emoji 😀 and 漢字 and ∑", "", " ", "  ", "\n", "Botchan said: \"I won't!\"", "end  ",
    "   indented code\n\t\ttabs", "mixed 12ab34 ½ ① ٣",
]


def files_equal(a, b):
    return all(Path(str(a) + s).read_bytes() == Path(str(b) + s).read_bytes() for s in (".bin", ".idx"))


@pytest.fixture(scope="module")
def corpus(demo_data):
    """(jsonl, tokenizer.model, the tokenize_jsonl output prefix) of the demo book."""
    return demo_data / "jsonl" / "books.jsonl", demo_data / "tokenizer.model", demo_data / "books_text_document"


# ---------------------------------------------------------------- tokenizer


def test_digits_split_and_byte_fallback(corpus):
    sp = spm.SentencePieceProcessor(model_file=str(corpus[1]))
    assert sp.encode("In 1894 he paid 350 yen", out_type=str)[1:] != []
    digits = [p for p in sp.encode("In 1894 he paid 350 yen", out_type=str) if any(c.isdigit() for c in p)]
    assert digits == ["1", "8", "9", "4", "3", "5", "0"]  # every number split into single digits
    assert sp.encode("→", out_type=str) == ["▁", "<0xE2>", "<0x86>", "<0x92>"]  # U+2192 never seen: its UTF-8 bytes
    assert sp.decode(sp.encode("emoji 😀 and 漢字 and ∑")) == "emoji 😀 and 漢字 and ∑"
    assert sp.vocab_size() == 1024 and (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)


def test_tokenizer_defaults_to_llama_vocab_and_names_the_file_when_it_cannot(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"books.jsonl.*Vocabulary size too high \(32000\)"):
        train_tokenizer([corpus[0]], tmp_path / "tok")  # the default: LLaMA's 32,000 pieces, too many for one book
    assert list(tmp_path.iterdir()) == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:3: not a UTF-8 JSON object"):
        train_tokenizer([bad], tmp_path / "tok", vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_tokenizer_learns_from_long_documents_and_source_files(corpus, tmp_path):
    """SentencePiece skips every training "sentence" over 4,192 bytes: a 20 KB document and a source
    file given whole leave no trace (checked here with sentencepiece itself); train_tokenizer feeds
    them line by line, long lines cut at spaces, and learns their words."""
    from data_prep.tokenizer import training_sentences

    book = [json.loads(line)["text"] for line in corpus[0].read_text().splitlines()]
    long_doc = " ".join(["The quokkaberries ripened slowly on the hill."] * 450)  # one 20 KB line
    source = "\n".join(f"def frobnicate_{i}(widget):\n    return widget.frobnicate()\n" for i in range(150))
    assert len(long_doc.encode()) > 20_000 and len(source.encode()) > 8_000
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*book, long_doc, source]))
    cut = list(training_sentences(long_doc))
    assert len(cut) == 5 and max(len(c.encode()) for c in cut) <= 4192 and " ".join(cut) == long_doc
    assert list(training_sentences("ab\n" + "é" * 3000, limit=4192)) == ["ab", "é" * 2096, "é" * 904]

    def pieces(model_file):
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        return {sp.id_to_piece(i) for i in range(sp.vocab_size())}

    learned = pieces(train_tokenizer([docs], tmp_path / "tok", vocab_size=1100))
    assert any("quokkaberries" in p for p in learned) and any("frobnicate" in p for p in learned)
    whole = tmp_path / "whole"  # the old way: every document one sentence
    spm.SentencePieceTrainer.train(sentence_iterator=iter([*book, long_doc, source]), model_prefix=str(whole),
                                   model_type="bpe", vocab_size=1100, byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   num_threads=1, minloglevel=2)
    assert not any("quokka" in p or "frobnic" in p for p in pieces(f"{whole}.model"))


def test_hf_tokenizer_ids_equal_sentencepiece(corpus, tmp_path):
    from transformers import AutoTokenizer, LlamaTokenizer

    folder = export_hf_tokenizer(corpus[1], tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    sp = spm.SentencePieceProcessor(model_file=str(corpus[1]))
    book = [json.loads(line)["text"] for line in corpus[0].read_text().splitlines()]
    code = [(REPO / "data_prep" / "tokenize_parallel.py").read_text()]
    auto = AutoTokenizer.from_pretrained(folder)
    for text in VARIED + book + code:
        assert auto(text)["input_ids"] == [1] + sp.encode(text), repr(text)  # BOS + SentencePiece's ids
        assert auto.decode(auto(text)["input_ids"], skip_special_tokens=True) == text
    assert auto("2024")["input_ids"] == [1, sp.piece_to_id("▁"), *(sp.piece_to_id(d) for d in "2024")]

    # transformers 5's LlamaTokenizer rebuilds a Metaspace pre-tokenizer that skips SentencePiece's
    # dummy prefix when the text already starts with a space; everything else matches.
    llama = LlamaTokenizer.from_pretrained(folder)
    for text in VARIED + book + code:
        if not text.startswith(" "):
            assert llama(text)["input_ids"] == [1] + sp.encode(text), repr(text)
    assert llama(" leading space")["input_ids"] == [1] + sp.encode(" leading space")[1:]

    # Exported into an HF model folder (config.json of model_type llama), AutoTokenizer still loads
    # tokenizer.json as written.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1024}))
    export_hf_tokenizer(corpus[1], model_dir)
    auto = AutoTokenizer.from_pretrained(model_dir)
    assert [auto(t)["input_ids"] for t in VARIED] == [[1] + sp.encode(t) for t in VARIED]


# ---------------------------------------------------------------- parallel tokenization


def test_parallel_output_is_megatron_dataset_of_ids_plus_eos(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    jsonl, model, _ = corpus
    stats = tokenize_parallel([jsonl], model, tmp_path / "books", workers=2, shard_bytes=20_000)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    ds = IndexedDataset(str(tmp_path / "books"))
    assert len(ds) == len(texts) == stats["documents"] == 522
    assert stats["shards"] == -(-jsonl.stat().st_size // 20_000) and stats["reused_shards"] == 0
    assert ds.index.dtype == np.uint16
    for i, text in enumerate(texts):
        assert ds[i].tolist() == sp.encode(text) + [2]
    assert stats["tokens"] == sum(len(sp.encode(t)) + 1 for t in texts)
    assert not (tmp_path / "books.shards").exists()


def test_identical_bytes_for_any_worker_count_and_the_baseline(corpus, tmp_path):
    jsonl, model, baseline = corpus  # baseline: tokenize_jsonl, one process, one document at a time
    for workers, shard_bytes in [(1, 1 << 30), (1, 4096), (2, 4096), (2, 50_000), (3, 7777)]:
        out = tmp_path / f"w{workers}_{shard_bytes}"
        tokenize_parallel([jsonl], model, out, workers=workers, shard_bytes=shard_bytes)
        assert files_equal(out, baseline), (workers, shard_bytes)

    # The same documents in three files, two of them compressed, equal the one file.
    lines = jsonl.read_bytes().splitlines(keepends=True)
    parts = [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.jsonl.zst"]
    parts[0].write_bytes(b"".join(lines[:200]))
    parts[1].write_bytes(gzip.compress(b"".join(lines[200:400])))
    parts[2].write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[400:])))
    tokenize_parallel(parts, model, tmp_path / "parts", workers=2, shard_bytes=10_000)
    assert files_equal(tmp_path / "parts", baseline)


def test_datatrove_tokenization_tasks_are_byte_identical_for_any_task_count(corpus, tmp_path):
    """The pipeline's tokenization stages (prepare, tokenize in N datatrove tasks, merge) over two
    files of one source: the same bytes as the one-process baseline for 1 and 3 tasks; the default
    shard planning cuts a small input into several shards, so 3 tasks all have work."""
    from data_prep.clean import run_local
    from data_prep.tokenize_tasks import tokenize_stages

    jsonl, model, baseline = corpus
    lines = jsonl.read_bytes().splitlines(keepends=True)
    source = tmp_path / "clean"
    source.mkdir()
    (source / "00000.jsonl").write_bytes(b"".join(lines[:300]))
    (source / "00001.jsonl").write_bytes(b"".join(lines[300:]))
    for tasks in (1, 3):
        stages = tokenize_stages(source, model, tmp_path / f"t{tasks}", tasks, shard_bytes=20_000)
        logs = [tmp_path / "logs" / str(tasks) / st.name for st in stages]
        run_local(stages, logs, workers=2)
        assert files_equal(tmp_path / f"t{tasks}", baseline), tasks
        counts = json.loads((tmp_path / f"t{tasks}.tokenize.json").read_text())
        assert counts["documents"] == len(lines) and counts["shards"] > 3
        stats = json.loads((logs[1] / "stats.json").read_text())
        assert sum(1 for _ in (logs[1] / "completions").iterdir()) == tasks and stats


def wait_for_lock_release(lock_path, timeout=30):
    import fcntl

    deadline = time.time() + timeout
    with open(lock_path) as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.time() < deadline, "the killed run's workers still hold the lock"
                time.sleep(0.01)


def test_killed_run_resumes_to_identical_output(corpus, tmp_path):
    jsonl, model, _ = corpus
    big = tmp_path / "big.jsonl"
    big.write_bytes(jsonl.read_bytes() * 12)  # ~3 MB, 97 shards of 32 KiB
    shards = -(-big.stat().st_size // (32 << 10))
    out = tmp_path / "out" / "books"
    cmd = [sys.executable, "-m", "data_prep", "tokenize", "--input", str(big), "--tokenizer", str(model),
           "--out-prefix", str(out), "--workers", "2", "--shard-bytes", str(32 << 10)]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shard_dir = Path(str(out) + ".shards")
    deadline = time.time() + 60
    while len(list(shard_dir.glob("*.len"))) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-way
    proc.wait()
    wait_for_lock_release(Path(str(out) + ".lock"))  # workers hold it until they are gone
    done = len(list(shard_dir.glob("*.len")))
    assert 4 <= done < shards, "the run was not killed mid-way"
    assert not Path(str(out) + ".bin").exists() and not Path(str(out) + ".idx").exists()

    stats = tokenize_parallel([big], model, out, workers=2, shard_bytes=32 << 10, log=lambda m: None)
    assert stats["shards"] == shards == 97 and stats["reused_shards"] >= done  # a dying worker may still finish one rename
    tokenize_parallel([big], model, tmp_path / "uninterrupted", workers=1, shard_bytes=1 << 30)
    assert files_equal(out, tmp_path / "uninterrupted")
    assert not shard_dir.exists()


def test_changed_input_discards_shards_of_the_old_plan(corpus, tmp_path):
    jsonl, model, baseline = corpus
    data = tmp_path / "books.jsonl"
    data.write_bytes(jsonl.read_bytes()[:50_000].rsplit(b"\n", 1)[0] + b"\n")
    shard_dir = tmp_path / "out.shards"
    tokenize_parallel([data], model, tmp_path / "out", shard_bytes=8192)
    # A leftover shard dir of that input, as a killed run would leave it, then the input changes.
    shard_dir.mkdir()
    (shard_dir / "plan.json").write_text("{}")
    (shard_dir / "000000.bin").write_bytes(b"\x00" * 8)
    (shard_dir / "000000.len").write_bytes(np.array([4], dtype=np.int32).tobytes())
    data.write_bytes(jsonl.read_bytes())
    notes = []
    stats = tokenize_parallel([data], model, tmp_path / "out", shard_bytes=8192, log=notes.append)
    assert stats["reused_shards"] == 0 and "starting over" in notes[0]
    assert files_equal(tmp_path / "out", baseline)


BAD_INPUT = [  # (file name, bytes, the message must match)
    ("broken.jsonl", b'{"text": "a"}\n' * 700 + b'{"text": "b"\n' + b'{"text": "c"}\n' * 10, r"broken.jsonl:701: not a"),
    ("no_text.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"no_text.jsonl:2: not a"),
    ("number.jsonl", b'{"text": 5}\n', r"number.jsonl:1: not a"),
    ("latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"latin1.jsonl:2: not a UTF-8"),
    ("truncated.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 1000)[:60], r"truncated.jsonl.gz: not a readable gz archive"),
    ("garbage.jsonl.gz", b"this is not gzip", r"garbage.jsonl.gz: not a readable gz archive"),
    ("garbage.jsonl.zst", b"this is not zstd either", r"garbage.jsonl.zst: not a readable zst archive"),
    ("truncated.jsonl.zst", b"".join(zstandard.ZstdCompressor().compress(b'{"text": "%d"}\n' % i) for i in range(50))[:-3],
     r"truncated.jsonl.zst: not a readable zst archive \(the last zstd frame is cut short\)"),
    ("broken.jsonl.zst", zstandard.ZstdCompressor().compress(b'{"text": "a"}\n{oops\n'), r"broken.jsonl.zst:2: not a"),
]


@pytest.mark.parametrize("name,content,message", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_names_file_and_line_and_leaves_no_output(corpus, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    for workers in (1, 2):
        with pytest.raises(InputError, match=message):
            tokenize_parallel([corpus[0], tmp_path / name], corpus[1], tmp_path / "out", workers=workers,
                              shard_bytes=4096)
        assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()
        assert not list((tmp_path / "out.shards").glob("*.tmp*"))  # complete shards may stay for a rerun
        assert not (tmp_path / "out.lock").exists()


def test_one_run_per_prefix_at_a_time(corpus, tmp_path):
    import fcntl

    with open(tmp_path / "out.lock", "w") as held:  # as a running tokenize holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another tokenize run is writing this prefix"):
            tokenize_parallel([corpus[0]], corpus[1], tmp_path / "out")
    tokenize_parallel([corpus[0]], corpus[1], tmp_path / "out")
    assert files_equal(tmp_path / "out", corpus[2]) and not (tmp_path / "out.lock").exists()


def test_missing_input_and_cli_error(corpus, tmp_path, capsys):
    with pytest.raises(InputError, match=r"nope.jsonl: no such input file"):
        tokenize_parallel([corpus[0], tmp_path / "nope.jsonl"], corpus[1], tmp_path / "out")
    rc = data_prep_main(["tokenize", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer", str(corpus[1]),
                         "--out-prefix", str(tmp_path / "out")])
    assert rc == 2 and "nope.jsonl: no such input file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- mixture

PAPER = {  # LLaMA table 1: sampling share, epochs
    "commoncrawl": (0.670, 1.10), "c4": (0.150, 1.06), "github": (0.045, 0.64), "wikipedia": (0.045, 2.45),
    "books": (0.045, 2.23), "arxiv": (0.025, 1.06), "stackexchange": (0.020, 1.03),
}


def test_llama_mixture_blend_weights_are_the_paper_shares():
    from megatron.core.datasets.utils import normalize

    sources = compose("llama_65b_pretrain", [], RecipeConfig).data.sources
    assert {n: (s.weight, s.epochs) for n, s in sources.items()} == PAPER
    weights = blend_weights({n: s.weight for n, s in sources.items()})
    assert weights == pytest.approx({n: share for n, (share, _) in PAPER.items()}, abs=1e-15)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert list(weights.values()) == pytest.approx(normalize([s.weight for s in sources.values()]), abs=1e-15)
    # Unnormalized weights become shares: 3 : 1 -> 0.75, 0.25.
    assert blend_weights({"a": 3.0, "b": 1.0}) == {"a": 0.75, "b": 0.25}
    with pytest.raises(MixtureError, match="data.sources.b.weight"):
        blend_weights({"a": 1.0, "b": 0.0})


def test_paper_epochs_from_the_sizes_they_imply():
    # Hand computation: share x 1.4T / epochs tokens per source, e.g. CommonCrawl 0.67 x 1.4e12 / 1.10.
    implied = {n: implied_source_tokens(share, ep, 1.4e12) for n, (share, ep) in PAPER.items()}
    assert implied["commoncrawl"] == pytest.approx(852_727_272_727.27, rel=1e-12)
    assert implied["c4"] == pytest.approx(198_113_207_547.17, rel=1e-12)
    assert implied["github"] == pytest.approx(98_437_500_000.0, rel=1e-12)
    assert implied["wikipedia"] == pytest.approx(25_714_285_714.29, rel=1e-12)
    assert implied["books"] == pytest.approx(28_251_121_076.23, rel=1e-12)
    assert implied["arxiv"] == pytest.approx(33_018_867_924.53, rel=1e-12)
    assert implied["stackexchange"] == pytest.approx(27_184_466_019.42, rel=1e-12)
    for n, (share, ep) in PAPER.items():
        assert effective_epochs(share, 1.4e12, round(implied[n])) == pytest.approx(ep, rel=1e-9)
        # 7B/13B: 1.0T tokens over the same data read each source 1.0/1.4 as often.
        assert effective_epochs(share, 1.0e12, round(implied[n])) == pytest.approx(ep / 1.4, rel=1e-9)


def test_mixture_report_from_idx_files(corpus, tmp_path, capsys):
    _, model, books = corpus
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": p.read_text()}) + "\n" for p in sorted((REPO / "data_prep").glob("*.py"))))
    tokenize_parallel([code], model, tmp_path / "code_text_document")
    code_docs, code_tokens = dataset_size(tmp_path / "code_text_document")
    assert (code_docs, code_tokens) == (len(code.read_text().splitlines()),
                                        int(np.fromfile(str(tmp_path / "code_text_document") + ".bin", np.uint16).size))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    book_texts = [json.loads(line)["text"] for line in corpus[0].read_text().splitlines()]
    book_tokens = sum(len(ids) + 1 for ids in sp.encode(book_texts))  # + EOS per document
    assert dataset_size(books) == (522, book_tokens)
    (tmp_path / "cut.idx").write_bytes(Path(str(books) + ".idx").read_bytes())
    (tmp_path / "cut.bin").write_bytes(Path(str(books) + ".bin").read_bytes()[:-2])
    with pytest.raises(MixtureError, match=rf"cut.bin: missing or not the size its .idx implies \({book_tokens:,} tokens\)"):
        dataset_size(tmp_path / "cut")

    sources = OmegaConf.create({"books": {"prefix": str(books), "weight": 3.0, "epochs": 2.0},
                                "code": {"prefix": str(tmp_path / "code_text_document"), "weight": 1.0, "epochs": None}})
    rows = mixture_report(sources, 100_000)
    # books (~91k tokens): 0.75 x 100,000 / tokens ~ 0.82 epochs (below its reference 2.0: no warning)
    assert (rows[0].share, rows[0].tokens, rows[0].epochs, rows[0].warning) == (0.75, book_tokens, 75_000 / book_tokens, None)
    assert rows[1].epochs == 25_000 / code_tokens and rows[1].reference_epochs is None and rows[1].warning is None
    rows = mixture_report(sources, 400_000)  # books: 300,000 / ~91k tokens ~ 3.29 epochs > 2.0
    assert rows[0].epochs == 300_000 / book_tokens and f"{300_000 / book_tokens:.2f} epochs > the reference 2.00" in rows[0].warning

    # The CLI on a training recipe: the budget is steps x global batch x sequence length.
    rc = data_prep_main(["mix", "llama_7b_pretrain", *(f"data.sources.{n}.prefix={books}" for n in PAPER)])
    out = capsys.readouterr().out
    budget = 238_419 * 2048 * 2048
    assert rc == 0 and f"token budget: {budget:,}" in out
    assert out.count("WARNING") == 7 and f"{0.67 * budget / book_tokens:.3f}" in out
    rc = data_prep_main(["mix", "tiny_cpu", f"data.sources.books.prefix={tmp_path / 'missing'}"])
    assert rc == 2 and "missing.idx: no such file" in capsys.readouterr().err
