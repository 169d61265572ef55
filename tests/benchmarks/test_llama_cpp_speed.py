"""bench/llama_cpp_speed.py: the teacher and saved students as GGUF files in llama.cpp, their speed at every storage
type and thread count, and llama.cpp's perplexity against ours on the same windows."""
from __future__ import annotations

import json
import sys

import pytest

from helpers import make_decoder_teacher
from models import load_teacher
from models.compress import clone_model, drop_every_second
from models.hf import weights_hash
from utils.cli.run import run_main
from utils.training.students import save_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(teacher folder, {name: student folder}): a tiny Llama with a byte-level BPE tokenizer (what a GGUF carries)
    whose rows split into q8_0 blocks, and two students of it (its copy, every second layer dropped)."""
    tmp = tmp_path_factory.mktemp("llama_cpp_bench")
    folder = make_decoder_teacher(tmp / "teacher", tokenizer="bpe", hidden=64, heads=4, kv_heads=2, ffn=128)
    teacher, _ = load_teacher(str(folder))
    meta = {"teacher": str(folder), "teacher_hash": weights_hash(teacher)}
    students = {"same": tmp / "same", "half": tmp / "half"}
    save_model(clone_model(teacher), students["same"], meta)
    save_model(clone_model(drop_every_second(teacher)[0]), students["half"], meta)
    return folder, students


def run(argv: list[str]) -> int:
    from bench import llama_cpp_speed

    parser = llama_cpp_speed.build_parser()
    return run_main(lambda a: llama_cpp_speed.main(a, parser), parser, [str(x) for x in argv])


def test_every_model_type_and_thread_count_is_measured(saved, tiny_corpus, tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
    teacher, students = saved
    assert run(["--teacher", teacher, "--data-dir", tiny_corpus, "--seq-len", "16", "--reps", "1", "--windows", "3",
                "--threads", "1,2", "--gguf-types", "f16,q8_0", "--models", *[f"{n}={d}" for n, d in students.items()],
                "--out", tmp_path, "--run-name", "r", "--gguf-dir", tmp_path / "gguf"]) == 0
    res = json.loads((tmp_path / "r" / "llama_cpp.json").read_text())
    names, types = ["teacher", "same", "half"], ["f16", "q8_0"]
    assert sorted((r["model"], r["gguf_type"], r["threads"]) for r in res["speed"]) == sorted(
        (n, t, k) for n in names for t in types for k in (1, 2))
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_speedup"] > 0 for r in res["speed"])
    mb = {k: f["mb"] for k, f in res["files"].items()}
    assert all(mb[f"{n}.q8_0"] < mb[f"{n}.f16"] for n in names) and mb["half.f16"] < mb["teacher.f16"]
    assert (tmp_path / "gguf" / "half.q8_0.gguf").is_file()
    ppl = {(p["model"], p["gguf_type"]): p for p in res["perplexity"]}
    assert sorted(ppl) == sorted((n, t) for n in names for t in types) and res["windows"] == 3
    assert all(p["tokens"] == 3 * 15 for p in ppl.values())  # the same windows for every model
    assert all(ppl[n, "f16"]["relative_difference"] < 0.01 for n in names)
    assert ppl["same", "f16"]["ours"] == ppl["teacher", "f16"]["ours"] != ppl["half", "f16"]["ours"]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| half | q8_0 |")]
    assert len(rows) == 1 and rows[0].count("x)") == 4  # prefill and decode speed-ups at each thread count


@pytest.mark.parametrize("models, types, expected", [
    (["teacher=x"], "f16", "the name 'teacher' is the teacher's"),
    (["a=x", "a=y"], "f16", "every NAME must be different"),
    (["a"], "f16", "--models takes NAME=DIR, got 'a'"),
    (["a=x"], "f16,q4_k", "--gguf-types takes f32, f16, q8_0, got 'q4_k'"),
])
def test_argument_mistakes_are_refused_before_anything_loads(models, types, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(["--teacher", tmp_path / "none", "--models", *models, "--gguf-types", types, "--out", tmp_path])
    assert e.value.code == 2 and expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_without_llama_cpp_python_the_bench_is_refused_in_one_line(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    teacher, students = saved
    assert run(["--teacher", teacher, "--models", f"same={students['same']}", "--out", tmp_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("error: this bench measures models in llama.cpp itself: llama-cpp-python is not installed "
                        "(pip install llama-cpp-python==0.3.36)")
    assert list(tmp_path.iterdir()) == []  # refused before the teacher loads
