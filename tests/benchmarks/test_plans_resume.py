"""bench/plans.py after a stop: every target's methods and plans are read back from methods.json (no re-timing, no
calibration), so the students it had begun are the ones it heals; other settings choose anew."""
from __future__ import annotations

import json

from utils.cli.run import run_main


def test_a_rerun_reads_the_methods_it_chose_and_other_settings_choose_anew(tiny_llama, tiny_corpus, tmp_path,
                                                                         monkeypatch):
    from bench import plans
    from utils import api

    data = api.DataConfig(data_dir=str(tiny_corpus), seq_len=16, batch_size=8)
    api.sensitivity_map(api.SessionConfig(teacher=str(tiny_llama), device="cpu", data=data),
                        config=api.MapConfig(options=("kv", "drop"), max_train_sentences=32, eval_sentences=16,
                                             valid_batches=1, latency_reps=2, latency_batch=1),
                        train=api.TrainConfig(epochs=1, max_steps_per_epoch=1), out=tmp_path / "map")
    argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name", "b",
            "--map", str(tmp_path / "map"), "--targets", "none", "--kv-targets", "0.5", "--seq-len", "16",
            "--batch-size", "8", "--device", "cpu", "--epochs", "1", "--max-steps-per-epoch", "1", "--latency-reps",
            "2", "--latency-batch", "1", "--max-train-sentences", "32", "--ft-epochs", "0", "--no-untrained",
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
