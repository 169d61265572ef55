"""eval_merged_12.py --eval-text NAME=PATH (repeatable): every named text in the printed table and results.json, for a
decoder and for a masked LM; a bad spec is one error line naming the flag (exit 2)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import eval_merged_12
from helpers import data_args, in_process, make_sentences, run_in_process


def _saved_student(teacher_dir, folder):
    """A student checkpoint: the teacher with every weight moved a little."""
    from models import load_teacher, weights_hash
    from utils.training.students import save_model

    teacher, _ = load_teacher(teacher_dir)
    h = weights_hash(teacher)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return save_model(teacher, folder, {"teacher": str(teacher_dir), "teacher_hash": h, "sources": []})


@pytest.fixture(scope="module")
def two_texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_texts")
    (root / "prose").mkdir()
    (root / "prose" / "a.txt").write_text("\n".join(make_sentences(30, 7)) + "\n")
    (root / "chat.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in make_sentences(12, 9)))
    return root


@pytest.mark.parametrize("teacher", ["tiny_llama", "tiny_teacher"])
def test_two_texts_in_the_table_and_results(teacher, two_texts, tiny_corpus, tmp_path, capsys, request):
    t = request.getfixturevalue(teacher)
    model = _saved_student(t, tmp_path / "model")
    assert run_in_process(eval_merged_12, [*map(str, data_args(t, tiny_corpus)), "--seq-len", "16", "--model",
                                           str(model), "--out", str(tmp_path / "ev"),
                                           "--eval-text", f"prose={two_texts / 'prose'}",
                                           "--eval_text", f"chat={two_texts / 'chat.jsonl'}"]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert list(res["texts"]) == ["prose", "chat"]
    assert res["texts"]["chat"]["documents"] == 12
    key = "predicted_tokens" if teacher == "tiny_llama" else "sentences"
    assert all(res["texts"][n]["metrics"][key] > 0 for n in ("prose", "chat"))
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| prose |", "| chat |"))]
    assert len(rows) == 2
    if teacher == "tiny_llama" and hasattr(os, "getloadavg"):  # a decoder's speeds, with the load they were timed at
        assert res["metrics"]["timing_cpus"] >= 1 and res["metrics"]["timing_load_1min_max"] >= 0
        assert "| speeds timed at | load average " in out


def test_without_the_flag_nothing_changes(tiny_teacher, tiny_corpus, tmp_path, capsys):
    model = _saved_student(tiny_teacher, tmp_path / "model")
    code, err = in_process("eval_merged_12", [*map(str, data_args(tiny_teacher, tiny_corpus)), "--model", str(model),
                                              "--out", str(tmp_path / "ev")], capsys)
    assert code == 0, err
    assert "texts" not in json.loads((tmp_path / "ev" / "results.json").read_text())
    assert not (tmp_path / "ev" / "tb").exists()


@pytest.mark.parametrize("spec, message", [("prose=", "names no path"), ("prose", "expected NAME=PATH"),
                                           ("prose={root}/missing", "neither a file nor a folder"),
                                           ("2nd={root}/prose", "not a simple identifier"),
                                           ("empty={root}/empty", "holds no text")])
def test_a_bad_spec_is_one_error_line(spec, message, two_texts, tiny_teacher, tiny_corpus, tmp_path, capsys):
    (two_texts / "empty").mkdir(exist_ok=True)
    code, err = in_process("eval_merged_12", [*map(str, data_args(tiny_teacher, tiny_corpus)), "--out",
                                              str(tmp_path / "ev"), "--eval-text", spec.format(root=two_texts)],
                           capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "--eval-text" in errors[0] and message in errors[0]
    assert "Traceback" not in err


def test_a_name_given_twice_is_refused(two_texts, tiny_teacher, tiny_corpus, tmp_path, capsys):
    code, err = in_process("eval_merged_12", [*map(str, data_args(tiny_teacher, tiny_corpus)), "--out",
                                              str(tmp_path / "ev"), "--eval-text", f"a={two_texts / 'prose'}",
                                              "--eval-text", f"a={two_texts / 'chat.jsonl'}"], capsys)
    assert code == 2 and "--eval-text: the name 'a' is given twice" in err.strip().splitlines()[-1]


def test_plan_student_scores_the_planned_student_on_each_text(two_texts, tiny_llama, tiny_corpus, tmp_path, capsys):
    import plan_student
    from utils import api

    data = api.DataConfig(data_dir=str(tiny_corpus), seq_len=16, batch_size=8)
    api.sensitivity_map(api.SessionConfig(teacher=str(tiny_llama), device="cpu", data=data),
                        config=api.MapConfig(options=("kv", "drop"), max_train_sentences=32, eval_sentences=16,
                                             valid_batches=1, latency_reps=2, latency_batch=1),
                        train=api.TrainConfig(epochs=1, max_steps_per_epoch=1), out=tmp_path / "map")
    argv = [*map(str, data_args(tiny_llama, tiny_corpus)), "--seq-len", "16", "--batch-size", "8", "--out",
            str(tmp_path), "--run-name", "p", "--map", str(tmp_path / "map"), "--target-kv-cache", "1/2",
            "--ft-epochs", "0", "--max-steps-per-epoch", "1", "--max-train-sentences", "32",
            "--eval-text", f"prose={two_texts / 'prose'}", "--eval-text", f"chat={two_texts / 'chat.jsonl'}"]
    assert run_in_process(plan_student, argv) == 0
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert list(res["texts"]) == ["prose", "chat"] and res["texts"]["prose"]["metrics"]["student_perplexity"] > 0
    assert "perplexity_ratio" in res["metrics"] and (tmp_path / "p" / "tb").is_dir()
    out = capsys.readouterr().out
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith(("| test |", "| prose |", "| chat |"))
            ] == ["| test", "| prose", "| chat"]


@pytest.mark.parametrize("module", ["eval_merge_layer", "plan_student", "bench.plans", "bench.paired_decoders"])
def test_every_evaluating_script_takes_named_texts(module, two_texts):
    import importlib

    from utils.evaluation.texts import EvalText

    parser = importlib.import_module(module).build_parser()
    required = {"plan_student": ["--target-params", "1e6"], "bench.plans": ["--map", "m"],
                "bench.paired_decoders": ["--models", "a=b", "--reference", "a"]}.get(module, [])
    args = parser.parse_args(required + ["--eval-text", f"prose={two_texts / 'prose'}",
                                         "--eval-text", f"chat={two_texts / 'chat.jsonl'}"])
    assert args.eval_text == [EvalText("prose", str(two_texts / "prose")),
                              EvalText("chat", str(two_texts / "chat.jsonl"))]
    assert parser.parse_args(required).eval_text == []
