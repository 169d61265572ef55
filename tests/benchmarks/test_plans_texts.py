"""bench/plans.py --eval-text: every student scored on each named text, with the paired tests per target."""
from __future__ import annotations

import json

from utils.cli.run import run_main
from helpers import make_sentences, small_map, small_bench_args


def test_the_bench_scores_every_student_on_each_text(tiny_llama, tiny_corpus, tmp_path):
    from bench import plans

    small_map(tiny_llama, tiny_corpus, tmp_path / "map")
    (tmp_path / "prose.txt").write_text("\n".join(make_sentences(40, 11)))
    (tmp_path / "test_again.txt").write_text((tiny_corpus / "test.txt").read_text())
    argv = [*small_bench_args(tiny_llama, tiny_corpus, tmp_path), "--targets", "none", "--kv-targets", "0.5",
            "--calibration-sentences", "8", "--eval-text", f"prose={tmp_path / 'prose.txt'}",
            "--eval-text", f"again={tmp_path / 'test_again.txt'}"]
    assert run_main(plans.main, plans.build_parser(), argv) == 0
    res = json.loads((tmp_path / "b" / "plans.json").read_text())
    assert list(res["texts"]) == ["prose", "again"]
    again, prose = res["texts"]["again"], res["texts"]["prose"]
    for row in res["rows"]:  # the test split again: the test split's numbers; another text: its own
        assert again["metrics"][row["plan"]] == row["metrics"]
        assert prose["metrics"][row["plan"]]["student_perplexity"] != row["metrics"]["student_perplexity"]
    assert again["tests"] == res["tests"] and len(prose["tests"]) == len(res["tests"]) > 0
    assert prose["tests"][0]["nll_sign"]["a_lower"] + prose["tests"][0]["nll_sign"]["a_higher"] + \
        prose["tests"][0]["nll_sign"]["ties"] == prose["items"]
    md = (tmp_path / "b" / "plans.md").read_text()
    assert "## Text prose (" in md and md.count("| KV 0.5 | planned |") == 3
    # --eval-text-items 2: each named text on its first two windows only, the test split as before
    argv[argv.index("b")] = "c"
    assert run_main(plans.main, plans.build_parser(), [*argv, "--eval-text-items", "2"]) == 0
    two = json.loads((tmp_path / "c" / "plans.json").read_text())
    assert [r["metrics"] for r in two["rows"]] == [r["metrics"] for r in res["rows"]]
    assert two["texts"]["prose"]["items_limit"] == 2 and 0 < two["texts"]["prose"]["items"] < prose["items"]


def test_calibration_too_small_for_a_mixture_names_its_flag(tiny_llama, tiny_corpus, tmp_path, capsys):
    """With a training mixture the calibration sentences' tokens are shared among the sources: too few of them end in
    one line naming --calibration-sentences, not a bare data error."""
    from bench import plans

    small_map(tiny_llama, tiny_corpus, tmp_path / "map", options=("drop",))
    (tmp_path / "prose").mkdir()
    (tmp_path / "prose" / "a.txt").write_text("\n".join(make_sentences(60, 5)))
    argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name", "b",
            "--map", str(tmp_path / "map"), "--targets", "1.2", "--kv-targets", "none", "--seq-len", "16",
            "--batch-size", "8", "--device", "cpu", "--latency-reps", "2", "--latency-batch", "1",
            "--max-train-sentences", "32", "--ft-epochs", "0", "--no-untrained", "--calibration-sentences", "1",
            "--train-text", f"prose={tmp_path / 'prose'}"]
    assert run_main(plans.main, plans.build_parser(), argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --calibration-sentences 1: ") and "use more" in err[-1]
