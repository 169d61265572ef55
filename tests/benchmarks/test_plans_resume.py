"""bench/plans.py after a stop: every target's methods and plans are read back from methods.json (no re-timing, no
calibration), so the students it had begun are the ones it heals; other settings choose anew."""
from __future__ import annotations

import json

from helpers import small_map, small_bench_args
from utils.cli.run import run_main


def test_a_rerun_reads_the_methods_it_chose_and_other_settings_choose_anew(tiny_llama, tiny_corpus, tmp_path,
                                                                         monkeypatch):
    from bench import plans

    small_map(tiny_llama, tiny_corpus, tmp_path / "map")
    argv = [*small_bench_args(tiny_llama, tiny_corpus, tmp_path), "--targets", "none", "--kv-targets", "0.5",
            "--calibration-sentences", "8", "--test-sentences", "16"]
    assert run_main(plans.main, plans.build_parser(), argv) == 0
    first = json.loads((tmp_path / "b" / "plans.json").read_text())
    kept = json.loads((tmp_path / "b" / "methods.json").read_text())
    assert [m["method"] for m in next(iter(kept["targets"].values()))] == ["planned", "uniform", "ShortGPT", "SLEB"]

    chose, candidates = [], plans.Bench.candidates

    def counted(self, target):
        chose.append(target.name)
        return candidates(self, target)
    monkeypatch.setattr(plans.Bench, "candidates", counted)
    assert run_main(plans.main, plans.build_parser(), argv) == 0
    again = json.loads((tmp_path / "b" / "plans.json").read_text())
    assert chose == []  # no re-timing, no calibration: the kept plans
    assert [(r["method"], r["plan"], r["why"]) for r in again["rows"]] == \
        [(r["method"], r["plan"], r["why"]) for r in first["rows"]]
    assert json.loads((tmp_path / "b" / "methods.json").read_text()) == kept
    # another calibration: ShortGPT's and SLEB's orders may differ, so every method is chosen anew
    assert run_main(plans.main, plans.build_parser(), [*argv[:-4], "--calibration-sentences", "12", *argv[-2:]]) == 0
    assert chose == [t for t in kept["targets"]]
    assert json.loads((tmp_path / "b" / "methods.json").read_text())["key"] != kept["key"]
