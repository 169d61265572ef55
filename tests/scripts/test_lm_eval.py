"""eval_merged_12.py --lm-eval: lm-evaluation-harness tasks on teacher and student side by side (local task files the
tests write; nothing from the Hub), and the one-line refusals (a masked-LM teacher, an unknown task)."""
from __future__ import annotations

import json
import sys

import pytest

import eval_merged_12
from helpers import (assert_clean_failure, data_args, in_process, last_line, restored_logging, run_in_process,
                     run_script, write_lm_eval_tasks)

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def student(tiny_llama, tmp_path_factory):
    """A saved student of the tiny Llama: layer 3 dropped (what eval_merged_12 --model reads)."""
    from models import LayerSpec, load_teacher, weights_hash
    from models.compress import compose, init_merged_layer
    from utils.training.students import save_model

    teacher, _ = load_teacher(tiny_llama)
    dropped = LayerSpec(0, 0, 0, [3], "dropped", attention="none")
    model = compose(teacher, layers={3: (init_merged_layer(teacher.config, dropped, teacher.layers[3],
                                                           mode="first")[0], dropped)})
    return save_model(model, tmp_path_factory.mktemp("student") / "model",
                      {"teacher": str(tiny_llama), "teacher_hash": weights_hash(teacher), "sources": []})


def _argv(teacher, corpus, model, out) -> list[str]:
    return [*map(str, data_args(teacher, corpus)), "--model", str(model), "--out", str(out), "--seq-len", "16",
            "--batch-size", "8"]


def _refused(argv: list[str], capsys, code: int, *needles: str) -> None:
    got, err = in_process("eval_merged_12", argv, capsys)
    line = last_line(err)
    assert got == code and "Traceback" not in err and ": error: " in line, err[-3000:]
    for n in needles:
        assert n in line, (n, line)


def test_lm_eval_tasks_side_by_side_in_the_output_and_results_json(tiny_llama, tiny_corpus, student, tmp_path,
                                                                     capsys):
    tasks = write_lm_eval_tasks(tmp_path / "tasks")
    argv = _argv(tiny_llama, tiny_corpus, student, tmp_path / "ev") + [
        "--lm-eval", "tiny_text,tiny_mc", "--lm-eval-include", str(tasks), "--lm-eval-limit", "4",
        "--lm-eval-batch-size", "2"]
    with restored_logging():
        assert run_in_process(eval_merged_12, argv) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert "student_perplexity" in res["metrics"]  # the usual comparison is still there
    lm = res["lm_eval"]
    assert lm["tasks"] == ["tiny_text", "tiny_mc"] and lm["limit"] == 4 and lm["batch_size"] == 2
    assert lm["samples"] == {"tiny_text": 4, "tiny_mc": 4}
    rows = {(r["task"], r["metric"]): r for r in lm["metrics"]}
    assert set(rows) == {("tiny_text", "word_perplexity"), ("tiny_text", "byte_perplexity"),
                         ("tiny_text", "bits_per_byte"), ("tiny_mc", "acc"), ("tiny_mc", "acc_norm")}
    ppl = rows["tiny_text", "word_perplexity"]
    assert ppl["student"] != ppl["teacher"] and ppl["difference"] == pytest.approx(ppl["student"] - ppl["teacher"])
    assert rows["tiny_mc", "acc"]["teacher_stderr"] > 0 and ppl["teacher_stderr"] is None  # lm-eval gives none
    assert "| lm-eval task | metric | teacher | student | difference | teacher stderr | student stderr |" in out
    assert (f"| tiny_text | word_perplexity | {ppl['teacher']:.4f} | {ppl['student']:.4f} | "
            f"{ppl['difference']:.4f} |  |  |") in out


def test_a_masked_lm_teacher_is_refused_in_one_line(tiny_teacher, tiny_corpus, tmp_path, capsys):
    _refused(_argv(tiny_teacher, tiny_corpus, tmp_path / "no_model", tmp_path / "ev") + ["--lm-eval", "piqa"],
             capsys, 2, "--lm-eval: lm-eval's tasks need a causal LM")
    assert not (tmp_path / "ev" / "results.json").exists()


@pytest.mark.slow
def test_an_unknown_task_is_refused_in_one_line_naming_it(tiny_llama, tiny_corpus, tmp_path):
    """As a user sees it (a subprocess; lm-eval indexes its ~15,000 own tasks to know the name is none of them)."""
    tasks = write_lm_eval_tasks(tmp_path / "tasks")
    r = run_script("eval_merged_12.py", *_argv(tiny_llama, tiny_corpus, tmp_path / "no_model", tmp_path / "ev"),
                   "--lm-eval", "tiny_mc,no_such_task", "--lm-eval-include", tasks)
    line = assert_clean_failure(r, 2, "lm-eval has no task 'no_such_task'", "--lm-eval-include")
    assert "'tiny_mc'" not in line and not (tmp_path / "ev" / "results.json").exists()


def test_lm_eval_options_without_tasks_are_refused(tiny_llama, tiny_corpus, tmp_path, capsys):
    _refused(_argv(tiny_llama, tiny_corpus, tmp_path / "no_model", tmp_path / "ev") + ["--lm-eval-limit", "3"],
             capsys, 2, "--lm-eval-limit need --lm-eval TASKS")


def test_without_lm_eval_one_line_says_how_to_install_it(tiny_llama, tiny_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    code, err = in_process("eval_merged_12", _argv(tiny_llama, tiny_corpus, tmp_path / "no_model", tmp_path / "ev")
                           + ["--lm-eval", "piqa"], capsys)
    assert code == 1 and "Traceback" not in err and last_line(err).startswith("error: lm-evaluation-harness is not "
                                                                               "installed"), err[-3000:]
    assert last_line(err).endswith("pip install lm-eval")
