"""bench/plans.py --runtime llama.cpp: every method's speed is measured in llama.cpp (the planned student's re-timing,
the rivals' "meets as measured", the final speed-ups), beside PyTorch's; --methods leaves methods out."""
from __future__ import annotations

import json

import pytest

from helpers import make_decoder_teacher, small_map, small_bench_args
from utils.cli.run import run_main


def test_every_method_is_timed_in_llama_cpp(tiny_corpus, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
    from bench import plans

    folder = make_decoder_teacher(tmp_path / "teacher", ffn=512, tokenizer="bpe")  # what a GGUF carries
    small_map(folder, tiny_corpus, tmp_path / "map")
    argv = ["--teacher", str(folder), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name", "b",
            "--map", str(tmp_path / "map"), "--targets", "1.05", "--kv-targets", "none", "--seq-len", "16",
            "--batch-size", "8", "--device", "cpu", "--epochs", "1", "--max-steps-per-epoch", "1", "--latency-reps",
            "3", "--latency-batch", "1", "--latency-threads", "1", "--max-train-sentences", "32", "--ft-epochs", "0",
            "--no-untrained", "--calibration-sentences", "8", "--speed-margin", "0", "--runtime", "llama.cpp",
            "--gguf-type", "f32", "--methods", "planned,ShortGPT"]
    assert run_main(plans.main, plans.build_parser(), argv) == 0
    res = json.loads((tmp_path / "b" / "plans.json").read_text())
    assert res["runtime"] == "llama.cpp" and [r["method"] for r in res["rows"]] == ["planned", "ShortGPT"]
    for row in res["rows"]:  # each student against the teacher's file, in llama.cpp, PyTorch's speed-ups beside
        lc = row["llama_cpp"]
        assert (lc["gguf_type"], lc["threads"], lc["reps"], lc["seq"]) == ("f32", 1, 3, 16)
        assert lc["prefill_speedup"] > 0 and lc["decode_speedup"] > 0 and row["speedup"] > 0
    planned, short = res["rows"][0]["why"], res["rows"][1]["why"]
    assert any("in llama.cpp, f32 GGUF files" in line for line in planned), planned
    at = short.index("the fewest drops that meet 1.05x as measured (in llama.cpp):")  # each count timed, said
    assert short[-1].endswith(": meets") and all(" dropped: measured " in line for line in short[at + 1:]), short
    md = (tmp_path / "b" / "plans.md").read_text()
    assert "| llama.cpp prefill / decode speed-up | PyTorch prefill / decode speed-up |" in md
    assert "llama.cpp: f32 GGUF files, 1 thread(s)" in md and (tmp_path / "b" / "pareto.png").is_file()


@pytest.mark.parametrize("methods, says", [("planned,LLM-Pruner", "--methods takes planned, uniform, ShortGPT, SLEB"),
                                           ("ShortGPT,SLEB", "--methods must include planned")])
def test_methods_name_known_ones_and_planned(methods, says, capsys):
    from bench import plans

    with pytest.raises(SystemExit):
        plans.build_parser().parse_args(["--map", "m", "--methods", methods])
    assert says in capsys.readouterr().err


def test_methods_left_out_are_not_built(tiny_llama, tiny_corpus, tmp_path):
    """A decoder with --methods planned,uniform: those two only (no layer-removal students, nor an encoder's
    untrained baselines in their place)."""
    from bench import plans

    small_map(tiny_llama, tiny_corpus, tmp_path / "map")
    argv = [*small_bench_args(tiny_llama, tiny_corpus, tmp_path), "--targets", "1.05", "--kv-targets", "none",
            "--speed-margin", "0", "--methods", "planned,uniform"]
    assert run_main(plans.main, plans.build_parser(), argv) == 0
    res = json.loads((tmp_path / "b" / "plans.json").read_text())
    methods = [r["method"] for r in res["rows"]]  # uniform: where one meets 1.05x as measured
    assert methods[0] == "planned" and set(methods) <= {"planned", "uniform"} and "llama_cpp" not in res["rows"][0]
