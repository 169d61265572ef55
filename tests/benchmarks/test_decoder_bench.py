"""bench/decoder_blocks.py --quick end to end on a tiny Llama of SmolLM2's head layout (9 query heads over 3
key/value heads): the training steps as subprocesses, every student against its rebuilt untrained start, the parity
with transformers, and a re-run that reuses everything. (The other bench scripts' quick runs: test_bench_quick.py.)"""
from __future__ import annotations

import json

import pytest

from helpers import make_decoder_teacher, run_script

pytestmark = pytest.mark.slow


def test_decoder_bench_runs_and_reruns(tmp_path, tiny_corpus):
    teacher = make_decoder_teacher(tmp_path / "teacher", hidden=72, heads=9, kv_heads=3)
    # --quick: the budget of a tiny teacher (windows of 32, one epoch, one timing repeat, 3 decoded tokens)
    argv = ["--quick", "--teacher", teacher, "--data-dir", tiny_corpus, "--runs", tmp_path / "runs", "--out",
            tmp_path / "out"]
    first = run_script("bench/decoder_blocks.py", *argv, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "decoder_blocks.json").read_text())
    assert (r["budget"]["seq_len"], r["budget"]["epochs"], r["budget"]["ft_epochs"]) == (32, 1, 1)  # quick's
    assert r["parity"]["relative_difference"] < 1e-6  # our evaluator and plain transformers, same windows
    assert set(r["rows"]) == {"teacher", "kv1", "kv1 untrained", "h6", "h6 untrained", "merged", "merged untrained",
                              "dropped untrained", "merged+ft", "dropped+ft"}
    assert all(s["ran"] for s in r["steps"].values())
    kv1, h6, teacher_row = r["rows"]["kv1"], r["rows"]["h6"], r["rows"]["teacher"]
    assert kv1["kv_cache_bytes_per_token"] * 3 == teacher_row["kv_cache_bytes_per_token"]  # 3 KV heads -> 1
    assert h6["params"] < teacher_row["params"] and "prefill_tokens_per_s" in h6
    assert r["rows"]["dropped untrained"]["layers"] == 2 and r["rows"]["merged+ft"]["layers"] == 2
    # the h6 blocks were started from the teacher's kept heads, rebuilt here from the same probe batch
    assert any("kept heads" in line for line in r["rows"]["h6 untrained"]["sources"])
    assert [t["student"] for t in r["tests"]][:4] == ["kv1", "h6", "merged", "dropped"]
    assert all(0 <= t["nll_t_tokens"]["p"] <= 1 and 0 <= t["agreement_mcnemar"]["p"] <= 1 for t in r["tests"])
    assert "Paired tests" in first.stdout and first.stdout.strip().endswith("decoder_blocks.json")
    again = run_script("bench/decoder_blocks.py", *argv, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reused") == 5 and "not measured again" in again.stderr
