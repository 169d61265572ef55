"""Combined options (fewer heads and a narrower FFN in one unit) in the map and the planner, and bench/plans.py:
planned vs uniform students at equal speed-up with paired tests, on the tiny teacher."""
from __future__ import annotations

import json
import logging
from pathlib import Path
import math
import os

import pytest
import torch

import sensitivity_map
from bench import plans
from utils.cli.run import run_main
from utils.planning.planner import choose_plan
from utils.planning.sensitivity import Option, default_options
from utils.storage.checkpoint import load_checkpoint, read_meta
from utils.training.students import load_model
from utils.training.units import spec_from_meta

FAST = ["--device", "cpu", "--batch-size", "16", "--epochs", "1", "--max-steps-per-epoch", "3", "--latency-reps", "2",
        "--eval-sentences", "32", "--valid-batches", "1"]
HEAD = 3 * (32 * 8 + 8) + 8 * 32  # one head of the tiny teacher (hidden 32, 4 heads of 8): q, k, v rows, out columns
NEURON = (32 + 1) + 32  # one FFN neuron: input row + bias, output column


@pytest.fixture(scope="module")
def combined_map(tiny_teacher, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmap")
    argv = ["--teacher", str(tiny_teacher), "--data-dir", str(tiny_corpus), "--out", str(out), "--run-name", "m",
            "--cache-dir", str(out / "cache"), "--options", "heads,merge,combined", "--heads-set", "2"] + FAST
    assert run_main(sensitivity_map.main, sensitivity_map.build_parser(), argv) == 0
    return out / "m"


def test_default_options_combine_heads_and_ffn():
    class Cfg:
        num_attention_heads, head_dim, intermediate_size = 12, 64, 3072

    opts = {o.name: o for o in default_options(Cfg)}
    assert opts["heads 4 ffn 1536"] == Option("heads 4 ffn 1536", "layer", 4, 64, 1536)
    assert opts["heads 2 ffn 768"] == Option("heads 2 ffn 768", "layer", 2, 64, 768)
    assert opts["merge heads 6 ffn 1536"] == Option("merge heads 6 ffn 1536", "merge", 6, 64, 1536)
    assert opts["merge heads 6 ffn 1536"].covers(3) == [3, 4] and opts["heads 2 ffn 768"].covers(3) == [3]
    assert [o.name for o in default_options(Cfg, kinds=("combined",))] == [
        "heads 4 ffn 1536", "heads 2 ffn 768", "merge heads 6 ffn 1536"]


def test_map_with_combined_options(combined_map):
    smap = json.loads((combined_map / "sensitivity.json").read_text())
    names = [o["name"] for o in smap["options"]]
    assert names == ["heads 2", "merge next", "heads 1 ffn 32", "heads 1 ffn 16", "merge heads 2 ffn 32"]
    by = {(e["layer"], e["option"]): e for e in smap["entries"]}
    assert set(by) == {(i, n) for i in (0, 1) for n in names if not (n.startswith("merge") and i == 1)}
    # one unit: 3 of 4 heads and half / three quarters of the 64 FFN neurons gone
    assert by[0, "heads 1 ffn 32"]["params_saved"] == 3 * HEAD + 32 * NEURON
    assert by[1, "heads 1 ffn 16"]["params_saved"] == 3 * HEAD + 48 * NEURON
    whole_layer = by[0, "merge next"]["params_saved"]  # a merged pair of the teacher's shape removes one layer
    assert by[0, "merge heads 2 ffn 32"]["params_saved"] == whole_layer + 2 * HEAD + 32 * NEURON
    assert by[0, "merge heads 2 ffn 32"]["covers"] == [0, 1]
    for e in smap["entries"]:
        assert math.isfinite(e["kl_teacher_student"]) and e["unit_ms"] > 0
    # the units were trained with the combined shape and load back as such
    _, meta, _ = load_checkpoint(combined_map / "units" / "heads_1_ffn_16" / "layer_1" / "best")
    spec = spec_from_meta(meta)
    assert (meta["kind"], spec.num_heads, spec.intermediate_size, spec.origin) == ("layer", 1, 16, [1])


def _map(n: int = 4) -> dict:
    """Synthetic: single options save 2-3 ms of a 10 ms layer; only combined units save enough for 2x and more."""
    entries = []
    for i in range(n):
        for name, kind, cost, ms in (("heads 2", "block", 0.01, 2.0), ("ffn", "ffn", 0.02, 3.0),
                                     ("heads 2 ffn", "layer", 0.05, 5.5), ("merge heads ffn", "merge", 0.2, 16.0)):
            if kind == "merge" and i + 1 >= n:
                continue
            entries.append({"layer": i, "option": name, "kind": kind, "covers": [i, i + 1] if kind == "merge" else [i],
                            "kl_teacher_student": cost + 0.001 * i, "latency_saved_ms": ms, "params_saved": 100})
    return {"layers": n, "timing": {"encoder_ms": 10.0 * n}, "teacher_params": 10_000, "entries": entries,
            "options": []}


def test_the_maps_prediction_of_a_plan_of_units_it_never_measured_is_none():
    """A rival made of dropped layers, benched on a map without the drop option (an FFN-only map): the row's map
    prediction is None, not a crash after every student was built and scored (it was, on the Qwen FFN map)."""
    from utils.planning.baselines import drop_choices
    from utils.planning.planner import Target
    from utils.planning.sensitivity import Option

    smap = _map()
    ffn = Option(name="ffn", kind="ffn", num_heads=4, head_dim=8, ffn=16)
    assert plans._predicted(smap, {0: ffn, 1: ffn}, Target(speedup=1.2)) == pytest.approx(40 / 34)
    assert plans._predicted(smap, drop_choices([2, 0, 1], 2), Target(speedup=1.2)) is None


@pytest.mark.parametrize("speedup", [2.0, 3.0])
def test_planner_reaches_deep_budgets_only_with_combined_units(speedup):
    smap = _map()
    plan = choose_plan(smap, target_speedup=speedup)
    chosen = [e for e in smap["entries"] if plan.choices.get(e["layer"]) == e["option"]]
    assert 40.0 - sum(e["latency_saved_ms"] for e in chosen) <= 40.0 / speedup + 1e-9
    assert any(e["kind"] in ("layer", "merge") for e in chosen)
    covered = [j for e in chosen for j in e["covers"]]
    assert len(covered) == len(set(covered))
    single = {**smap, "entries": [e for e in smap["entries"] if e["option"] in ("heads 2", "ffn")]}
    with pytest.raises(ValueError, match="cannot be met"):
        choose_plan(single, target_speedup=speedup)


def test_mcnemar_by_hand():
    r = plans.mcnemar([True, True, False, False, True], [False, False, False, True, True])
    assert (r["only_a"], r["only_b"]) == (2, 1) and r["p"] == 1.0 and r["z"] == pytest.approx(1 / math.sqrt(3))
    r = plans.mcnemar([True] * 6 + [False] * 4, [False] * 6 + [False] * 4)
    assert (r["only_a"], r["only_b"]) == (6, 0) and r["p"] == pytest.approx(2 / 64) and r["z"] == pytest.approx(6 ** .5)
    assert plans.mcnemar([True], [True])["p"] == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        plans.mcnemar([True], [])


def test_uniform_plans():
    merge = Option("merge next", "merge", 4, 8, 64)
    assert sorted(plans.uniform(merge, 6)) == [0, 2, 4] and sorted(plans.uniform(merge, 5)) == [0, 2]
    assert sorted(plans.uniform(Option("heads 2", "block", 2, 8, 64), 3)) == [0, 1, 2]


def test_the_uniform_student_is_the_cheapest_that_meets_the_target_as_measured(monkeypatch):
    from types import SimpleNamespace
    from dataclasses import asdict

    from utils.evaluation.speed import Timing
    from utils.planning.planner import Target

    opts = [Option(f"heads {h}", "block", h, 8, 64) for h in (3, 2, 1)]  # cheapest first
    smap = {"layers": 2, "options": [asdict(o) for o in opts], "timing": {"encoder_ms": 20.0},
            "entries": [{"layer": i, "option": o.name, "latency_saved_ms": 2.0 * (4 - o.num_heads),
                         "kl_teacher_student": 0.1 * (4 - o.num_heads)} for i in range(2) for o in opts]}
    b = plans.Bench(SimpleNamespace(cost="kl", retime_rounds=5, speed_margin=0.03),
                    SimpleNamespace(teacher=SimpleNamespace(TASK="mlm")), smap, None, Timing())
    measured = {"heads 3": [1.1], "heads 2": [1.3], "heads 1": [2.0]}  # the map says heads 3 saves enough for 1.2x
    timed = []

    def measure(c, speed):
        timed.append(c[0].name)
        runs = measured[c[0].name]
        return runs[min(timed.count(c[0].name), len(runs)) - 1]
    monkeypatch.setattr(b, "measured_speedup", measure)
    [u] = b._uniform(Target(speedup=1.2))
    assert {o.name for o in u["choices"].values()} == {"heads 2"} and "short as measured: heads 3" in u["why"][0]
    assert timed == ["heads 3", "heads 2", "heads 2"]  # the one kept timed twice
    assert b._uniform(Target(speedup=2.5)) == []
    # within the 3% margin (1.22x for 1.2x), or over it once and under when timed again: not met
    measured.update({"heads 3": [1.22], "heads 2": [1.3, 1.2]})
    timed.clear()
    [u] = b._uniform(Target(speedup=1.2))
    assert {o.name for o in u["choices"].values()} == {"heads 1"} and timed[:3] == ["heads 3", "heads 2", "heads 2"]
    b.args.retime_rounds = 0  # no timing: the map's cheapest that meets it
    assert {o.name for o in b._uniform(Target(speedup=1.2))[0]["choices"].values()} == {"heads 3"}


def test_bench_targets_parse_ratios_and_none():
    p = plans.build_parser()
    a = p.parse_args(["--map", "m", "--targets", "none", "--kv-targets", "1/3,0.5"])
    assert a.targets == [] and a.kv_targets == [1 / 3, 0.5]
    assert p.parse_args(["--map", "m"]).kv_targets is None  # the default: 1/3 for a decoder
    with pytest.raises(SystemExit):
        p.parse_args(["--map", "m", "--kv-targets", "2/3,1"])


def test_bench_planned_vs_uniform(tiny_teacher, tiny_corpus, combined_map, tmp_path):
    smap = json.loads((combined_map / "sensitivity.json").read_text())
    # deterministic latencies (the tiny model's real ones are noise): 10 ms per layer, savings by how much is cut
    smap["timing"].update(encoder_ms=20.0, layer_ms=[10.0, 10.0])
    saved = {"heads 2": 2.0, "merge next": 10.0, "heads 1 ffn 32": 5.0, "heads 1 ffn 16": 6.0,
             "merge heads 2 ffn 32": 14.0}
    for e in smap["entries"]:
        e["latency_saved_ms"] = saved[e["option"]] + (0.5 if e["layer"] == 0 else 0.0)
    (tmp_path / "map.json").write_text(json.dumps(smap))
    argv = ["--teacher", str(tiny_teacher), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name",
            "b", "--cache-dir", str(tmp_path / "cache"), "--map", str(tmp_path / "map.json"), "--targets", "1.2,3",
            "--ft-epochs", "1", "--test-sentences", "24", "--no-untrained", "--retime-rounds", "0"] + FAST
    assert run_main(plans.main, plans.build_parser(), argv) == 0
    res = json.loads((tmp_path / "b" / "plans.json").read_text())
    by = {(r["target"], r["method"]): r for r in res["rows"]}
    t12, t3 = "prefill_speedup1.2", "prefill_speedup3"
    # 1.2x needs 3.33 ms: planned and uniform exist, kept top heads (2 x 2 ms) and dropped layers qualify
    assert {m for t, m in by if t == t12} == {"planned", "uniform", "untrained: kept top heads",
                                              "untrained: dropped layers"}
    # 3x needs 13.33 ms: only the combined merge reaches it (no kept-heads or dropped-layers baseline does)
    assert {m for t, m in by if t == t3} == {"planned", "uniform"}
    assert by[t3, "planned"]["plan"] == "0+1: merge heads 2 ffn 32"
    for r in res["rows"]:
        assert r["predicted"] >= float(r["target"].removeprefix("prefill_speedup")) - 1e-9
        assert 0 <= r["metrics"]["agreement_top1"] <= 1 and r["speedup"] > 0 and r["params"] > 0
    assert by[t12, "untrained: dropped layers"]["plan"] == "untrained 0+1: merge next"
    tests = [t for t in res["tests"] if t["target"] == t12]
    assert {t["against"] for t in tests} <= {"uniform", "untrained: kept top heads", "untrained: dropped layers"}
    assert tests and all(0 <= t["top1"]["p"] <= 1 and t["top1"]["only_a"] + t["top1"]["only_b"] <= 24 for t in tests)
    # the paired counts agree with the accuracies: (only planned - only other) / n = top-1 difference
    for t in tests:
        a = by[t12, "planned"]["metrics"]["student_top1"]
        b = by[t12, t["against"]]["metrics"]["student_top1"]
        assert (t["top1"]["only_a"] - t["top1"]["only_b"]) / res["test_items"] == pytest.approx(a - b)
    model, meta = load_model(next((tmp_path / "b").glob("model_*/model/best")))
    assert model.num_parameters() in {r["params"] for r in res["rows"]}
    assert (tmp_path / "b" / "pareto.png").stat().st_size > 1000
    assert "| 3x | planned |" in (tmp_path / "b" / "plans.md").read_text()


# ---- decoders: the map's options, budgets, re-timing and the layer-removal baselines ----
def test_decoder_options_follow_the_teacher(tiny_llama):
    from models import load_teacher

    teacher, _ = load_teacher(tiny_llama)  # 6 query heads over 2 KV heads of 8, FFN 64
    opts = {o.name: o for o in default_options(teacher.config, task=teacher.TASK)}
    assert list(opts) == ["kv 1", "heads 4", "heads 2", "linear", "ffn 48", "ffn 32", "ffn 16", "no attention",
                          "no attention ffn 32", "drop", "merge next"]
    assert (opts["kv 1"].attention, opts["kv 1"].num_kv_heads) == ("gqa", 1)
    assert (opts["heads 2"].attention, opts["heads 2"].num_kv_heads) == ("mha", None)  # one query head per group
    spec = opts["drop"].spec(3, teacher.config)
    assert (spec.attention, spec.intermediate_size, spec.kind) == ("none", 0, "dropped")
    assert opts["linear"].spec(0, teacher.config).intermediate_size == 64  # a block keeps the layer's FFN


def _decoder_map(tiny_llama, tiny_corpus, tmp_path) -> Path:
    from utils import api

    out = tmp_path / "map"
    api.sensitivity_map(api.SessionConfig(teacher=str(tiny_llama), device="cpu",
                                          data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16, batch_size=8)),
                        config=api.MapConfig(options=("kv", "ffn", "drop"), max_train_sentences=48, eval_sentences=16,
                                             valid_batches=1, latency_reps=3, latency_batch=1),
                        train=api.TrainConfig(epochs=1, max_steps_per_epoch=2), out=out)
    return out


def test_a_map_times_on_the_threads_asked_and_records_them(tiny_llama):
    """MapConfig.latency_threads (--latency-threads): the map's timings run on those threads, and say so."""
    from models import load_teacher
    from utils.planning.sensitivity import reach_map
    from utils.planning.students import MapConfig

    teacher, _ = load_teacher(tiny_llama)
    before = torch.get_num_threads()
    asked = 2 if before == 1 else 1
    timing = MapConfig(latency_reps=2, latency_batch=1, latency_threads=asked).timing(8)
    options = default_options(teacher.config, None, ("ffn",), task="causal")
    smap = reach_map(teacher, options, [0, 1], timing=timing)
    assert smap["timing"]["threads"] == asked and smap["timing"]["seq"] == 8 and smap["timing"]["reps"] == 2
    assert torch.get_num_threads() == before
    assert "timing" not in reach_map(teacher, options, [0, 1])  # sizes only, nothing timed


def test_decoder_map_has_prefill_decode_and_kv_savings(tiny_llama, tiny_corpus, tmp_path):
    smap = json.loads((_decoder_map(tiny_llama, tiny_corpus, tmp_path) / "sensitivity.json").read_text())
    assert smap["task"] == "causal" and {"decode_ms", "decode_layer_ms", "decode_unit_ms"} <= set(smap["timing"])
    assert smap["timing"]["threads"] == torch.get_num_threads()  # what its speed-ups hold for
    cells = {(e["layer"], e["option"]): e for e in smap["entries"]}
    assert len(cells) == 4 * 5  # kv 1, ffn x 3, drop on every layer
    from models import load_teacher

    teacher, _ = load_teacher(tiny_llama)
    drop = cells[(2, "drop")]  # the whole layer: its 2 KV heads of 8, keys and values in fp16, and all its weights
    assert drop["kv_bytes_saved"] == 2 * 2 * 2 * 8
    assert drop["params_saved"] == sum(p.numel() for p in teacher.layers[2].parameters())
    assert cells[(2, "kv 1")]["kv_bytes_saved"] == 2 * 2 * 8 and cells[(2, "ffn 32")]["kv_bytes_saved"] == 0
    assert all({"perplexity_ratio", "kl_teacher_student", "agreement_top1", "decode_saved_ms"} <= set(e)
               for e in smap["entries"])
    plan = choose_plan(smap, target_kv_cache=0.5)
    kept = 1 - sum(cells[(i, o)]["kv_bytes_saved"] for i, o in plan.choices.items()) / smap[
        "teacher_kv_bytes_per_token"]
    assert kept <= 0.5 and plan.choices
    with pytest.raises(ValueError, match="cannot be met"):
        choose_plan({**smap, "entries": [e for e in smap["entries"] if e["option"] == "kv 1"]}, target_kv_cache=0.4)


def test_planner_retimes_a_decode_plan_and_exports(tiny_llama, tiny_corpus, tmp_path):
    """A decode target is re-timed and exported. 1.05x, not more: the tiny map's reach is timed, and under a loaded
    machine it measured as low as 1.09x (a 1.2x target then failed the reach check — a flaky test)."""
    from utils import api

    mp = _decoder_map(tiny_llama, tiny_corpus, tmp_path)
    done = api.plan_student(api.SessionConfig(teacher=str(tiny_llama), device="cpu",
                                              data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16,
                                                                  batch_size=8)),
                            target_speedup=1.05, speed="decode", map=mp,
                            config=api.MapConfig(max_train_sentences=48, eval_sentences=16, valid_batches=1,
                                                 latency_reps=5, latency_batch=1),
                            finetune=api.PlanFinetune(epochs=1, test_sentences=16),
                            train=api.TrainConfig(epochs=1, max_steps_per_epoch=2), out=tmp_path / "plan",
                            export=api.ExportConfig(hf_dir=str(tmp_path / "hf")))
    log = (tmp_path / "plan" / "plan.log").read_text()
    assert "re-timing 1: planned for 1.050x" in log
    res = done.results
    assert res["retiming"] and res["retiming"][-1]["measured_speedup"] > 0
    assert {"decode_measured_speedup", "measured_speedup", "student_kv_bytes_per_token"} <= set(res)
    assert res["target_met_measured"] == (res["decode_measured_speedup"] >= 1.05)
    assert "student_perplexity" in res["metrics"] and (tmp_path / "hf" / "config.json").is_file()
    assert res["test_windows"] > 0 and "test_sentences" not in res  # token windows, named so (issue 32.6)
    # a finished heal is loaded, never continued: its resume point (optimizer state) is not kept
    healed = tmp_path / "plan" / "model"
    assert (healed / "best").is_dir() and (healed / "last").is_dir() and not (healed / "resume").exists()
    # units the map trained with this setup are loaded from its units/ folder, not trained again
    trained = [x for x in read_meta(tmp_path / "plan" / "model" / "best")["sources"] if "trained by the map" in x]
    assert not (tmp_path / "plan" / "units").exists() and len(trained) == sum(
        1 for name in done.plan.choices.values() if name != "drop")


def _kv_student(tiny_llama, tiny_corpus, mp: Path, out: Path, finetune):
    """plan_student for half the KV cache from the map ``mp``, its units loaded from the map, ``finetune`` healing."""
    from utils import api

    return api.plan_student(api.SessionConfig(teacher=str(tiny_llama), device="cpu",
                                              data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16,
                                                                  batch_size=8)),
                            target_kv_cache=0.5, map=mp,
                            config=api.MapConfig(max_train_sentences=48, eval_sentences=16, valid_batches=1,
                                                 latency_reps=2, latency_batch=1),
                            finetune=finetune, train=api.TrainConfig(epochs=1, max_steps_per_epoch=2), out=out)


def test_a_planned_student_built_alike_is_loaded_and_one_built_otherwise_is_rebuilt(tiny_llama, tiny_corpus, tmp_path):
    """plan_student run again (a stopped job requeued) loads the student it finished; other settings build anew."""
    from utils import api

    mp = _decoder_map(tiny_llama, tiny_corpus, tmp_path)

    def plan(lr: float):
        return _kv_student(tiny_llama, tiny_corpus, mp, tmp_path / "plan",
                           api.PlanFinetune(epochs=1, lr=lr, test_sentences=16))

    def run_id() -> str:
        return read_meta(tmp_path / "plan" / "model" / "best")["run"]["run_id"]

    first = plan(2e-4)
    built = run_id()
    again = plan(2e-4)
    assert run_id() == built and again.results["metrics"] == first.results["metrics"]
    plan(1e-3)
    assert run_id() != built and read_meta(tmp_path / "plan" / "model" / "best")["build"]["heal"]["lr"] == 1e-3


def test_a_planned_students_heal_reads_the_teachers_top_k_cache(tiny_llama, tiny_corpus, tmp_path):
    """PlanFinetune(teacher_topk=K) (--teacher-topk): the heal's KL from the top-k cache of its training windows under
    topk_dir, recorded in the student's build (another K builds anew); a K beyond the vocabulary is refused first."""
    from utils import api

    mp = _decoder_map(tiny_llama, tiny_corpus, tmp_path)
    cache = tmp_path / "topk"
    _kv_student(tiny_llama, tiny_corpus, mp, tmp_path / "plan",
                api.PlanFinetune(epochs=1, test_sentences=16, teacher_topk=8, topk_dir=str(cache)))
    meta = read_meta(tmp_path / "plan" / "model" / "best")
    assert meta["build"]["heal"]["teacher_topk"] == 8 and meta["teacher_topk"] == 8
    assert sorted(p.name for p in cache.glob("*/top*.npy")) == ["top8_t1_ids.npy", "top8_t1_logp.npy"]
    with pytest.raises(api.SettingError, match="`teacher_topk` must be a whole number from 1 to"):
        _kv_student(tiny_llama, tiny_corpus, mp, tmp_path / "other",
                    api.PlanFinetune(epochs=1, test_sentences=16, teacher_topk=10 ** 6, topk_dir=str(cache)))
    assert not (tmp_path / "other").exists()


def test_the_heal_reads_its_own_training_sentences(tiny_llama, tiny_corpus, tmp_path, caplog):
    """--ft-train-sentences: the fine-tune reads the first N training sentences (the units: the map's first 48);
    asking for the units' own count is the default's student, loaded, not built again."""
    from utils import api

    mp = _decoder_map(tiny_llama, tiny_corpus, tmp_path)

    def plan(sentences: int | None):
        return _kv_student(tiny_llama, tiny_corpus, mp, tmp_path / "plan",
                           api.PlanFinetune(epochs=1, test_sentences=16, train_sentences=sentences))

    def heal() -> tuple[str, str]:
        record = json.loads((tmp_path / "plan" / "model" / "run.json").read_text())
        return record["run_id"], record["setup"]["data_hash"]

    units = {json.loads(f.read_text())["setup"]["data_hash"] for f in (mp / "units").rglob("run.json")}
    assert len(units) == 1  # every unit of the map trained on its first 48 sentences
    plan(None)
    first, data = heal()
    assert {data} == units
    plan(48)
    assert heal() == (first, data)  # the same text: the student built by default is this one
    with caplog.at_level(logging.INFO, logger="simplifying_transformers"):
        plan(192)
    run, data = heal()
    assert run != first and data not in units
    assert "fine-tune on the first 192 training sentences" in caplog.text


def test_layer_removal_baselines(tiny_llama, tiny_corpus):
    from models import load_teacher
    from utils.data.batches import TokenWindows, make_loader
    from utils.planning.baselines import (block_influence, calibration_nll, drop_choices, dropped, fewest_drops,
                                          kv_fraction, shortgpt_order, sleb_order)

    teacher, tok = load_teacher(tiny_llama)
    windows = TokenWindows((tiny_corpus / "train.txt").read_text().splitlines()[:40], tok, 16)
    loader, _ = make_loader(windows, tok, 8, shuffle=False)
    cpu = torch.device("cpu")
    bi = block_influence(teacher, loader, device=cpu)
    order, values = shortgpt_order(teacher, loader, device=cpu)
    assert len(bi) == 4 and values == bi and [bi[i] for i in order] == sorted(bi)
    sleb, trace = sleb_order(teacher, loader, device=cpu, steps=2)
    assert len(set(sleb)) == 2 and len(trace) == 2
    # the first step's choice is the layer whose removal alone costs least
    alone = {i: calibration_nll(dropped(teacher, [i]), loader, device=cpu) for i in range(4)}
    assert sleb[0] == min(alone, key=alone.get)
    assert kv_fraction(teacher, drop_choices(order, 1)) == pytest.approx(0.75)
    assert fewest_drops(order, lambda c: kv_fraction(teacher, c) <= 0.5) == 2
    with torch.no_grad():  # dropped layers pass their input on: the view equals running the kept layers alone
        ids = next(iter(loader))["input_ids"]
        view = dropped(teacher, [1, 2])
        ctx = teacher.context(None, ids.shape[1])
        h = teacher.embed(ids)
        for i in (0, 3):
            h = teacher.layers[i](h, ctx)
        assert torch.allclose(view(ids).last_hidden_state, h, atol=1e-6)


@pytest.mark.slow
def test_decoder_bench_against_layer_removal_baselines(tiny_llama, tiny_corpus, tmp_path):
    """The decoder bench end to end on a tiny Llama: planned, uniform, ShortGPT and SLEB students at a prefill target
    and a KV-cache target, healed alike, their untrained versions, paired tests over the same test tokens."""
    mp = _decoder_map(tiny_llama, tiny_corpus, tmp_path)
    argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name", "b",
            "--map", str(mp), "--targets", "1.2", "--kv-targets", "0.5", "--seq-len", "16", "--batch-size", "8",
            "--device", "cpu", "--epochs", "1", "--max-steps-per-epoch", "2", "--latency-reps", "3",
            "--latency-batch", "1", "--max-train-sentences", "48", "--eval-sentences", "16", "--valid-batches", "1",
            "--ft-epochs", "1", "--ft-max-steps", "1", "--test-sentences", "24", "--calibration-sentences", "16"]
    assert run_main(plans.main, plans.build_parser(), argv) == 0
    res = json.loads((tmp_path / "b" / "plans.json").read_text())
    assert res["causal"] and res["targets"] == ["prefill_speedup1.2", "kv_cache0.5"]
    assert (res["budget"]["lr"], res["budget"]["keep_start"], res["budget"]["ft_keep_start"]) == (1e-3, True, False)
    kv = {r["method"]: r for r in res["rows"] if r["target"] == "kv_cache0.5"}
    assert {"planned", "ShortGPT", "SLEB", "planned, untrained", "ShortGPT, untrained"} <= set(kv)
    for r in kv.values():  # every student keeps at most half the teacher's KV cache
        assert r["kv_bytes"] <= 0.5 * res["teacher_kv_bytes"] and r["metrics"]["student_perplexity"] > 1
    assert kv["ShortGPT"]["plan"].count("drop") == 2  # 2 of 4 layers: the fewest that keep half the KV cache
    tests = [t for t in res["tests"] if t["target"] == "kv_cache0.5"]
    assert {(t["planned"], t["against"]) for t in tests} >= {("planned", "ShortGPT"), ("planned", "SLEB"),
                                                              ("planned, untrained", "SLEB, untrained")}
    n = res["test_items"]
    assert all(t["agreement"]["only_a"] + t["agreement"]["only_b"] <= n and 0 <= t["nll_t"]["p"] <= 1
               and t["nll_sign"]["a_lower"] + t["nll_sign"]["a_higher"] + t["nll_sign"]["ties"] == n for t in tests)
    assert "| KV 0.5 | planned |" in (tmp_path / "b" / "plans.md").read_text()
    assert (tmp_path / "b" / "pareto.png").stat().st_size > 1000
    # the units the map trained with this same setup are loaded, not trained again
    assert not list((tmp_path / "b").glob("model_*/units"))
    sources = [x for d in (tmp_path / "b").glob("model_*/model/best") for x in read_meta(d)["sources"]]
    assert any("trained by the map" in x for x in sources), sources
    # the fine-tunes stop at --ft-max-steps; the units kept the map's --max-steps-per-epoch
    runs = [json.loads(f.read_text()) for f in (tmp_path / "b").glob("model_*/model/run.json")]
    assert runs and all(r["setup"]["max_steps_per_epoch"] == 1 for r in runs)
    # run again (a stopped bench requeued): every student it built is loaded, none trained again
    ids = {d: read_meta(d).get("run") for d in (tmp_path / "b").glob("model_*/model/best")}
    assert run_main(plans.main, plans.build_parser(), argv) == 0
    assert {d: read_meta(d).get("run") for d in ids} == ids
    # students that only drop layers train no unit: their record names no map, so a bench from another map reuses them
    drops = [m for m in map(read_meta, ids) if set(m["plan"].values()) == {"drop"}]
    assert drops and all(m["build"]["map_units"] is None and m["build"]["units"] is None for m in drops)
    again = json.loads((tmp_path / "b" / "plans.json").read_text())
    assert [r["metrics"] for r in again["rows"] if r["target"] == "kv_cache0.5"] == [
        r["metrics"] for r in res["rows"] if r["target"] == "kv_cache0.5"]


def test_plan_only_stops_before_training(tiny_llama, tiny_corpus, tmp_path, capsys):
    import plan_student

    mp = _decoder_map(tiny_llama, tiny_corpus, tmp_path)
    argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name", "p",
            "--map", str(mp), "--target-kv-cache", "1/2", "--plan-only", "--seq-len", "16", "--batch-size", "8",
            "--device", "cpu"]
    assert run_main(plan_student.main, plan_student.build_parser(), argv) == 0
    done = json.loads((tmp_path / "p" / "plan.json").read_text())
    smap = json.loads((mp / "sensitivity.json").read_text())
    assert done["plan_only"] and done["plan"] and done["map_saved"] >= smap["teacher_kv_bytes_per_token"] / 2
    assert "budget: KV cache <=" in capsys.readouterr().out and sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "plan.json", "plan.log"]
    assert run_main(plan_student.main, plan_student.build_parser(),
                    argv + ["--export-hf", str(tmp_path / "hf")]) == 2  # nothing to export
    assert ("--plan-only makes no model to export: leave out --export-hf, --export-onnx and --export-gguf"
            in capsys.readouterr().err)


def test_plan_only_speed_plan_is_retimed_with_the_margin_and_rounds_asked(tiny_llama, tiny_corpus, tmp_path):
    import plan_student

    mp = _decoder_map(tiny_llama, tiny_corpus, tmp_path)
    smap = json.loads((mp / "sensitivity.json").read_text())
    smap["timing"]["threads"] = 3  # as if mapped on three threads: the plan says its timings were not
    (mp / "sensitivity.json").write_text(json.dumps(smap))
    argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name", "p",
            "--map", str(mp), "--target-speedup", "1.1", "--plan-only", "--seq-len", "16", "--batch-size", "8",
            "--device", "cpu", "--latency-reps", "2", "--latency-batch", "1", "--speed-margin", "0.25",
            "--retime-rounds", "3", "--timing-threads", "1"]
    threads = torch.get_num_threads()
    assert run_main(plan_student.main, plan_student.build_parser(), argv) == 0
    assert torch.get_num_threads() == threads  # timed on one thread, then given back
    done = json.loads((tmp_path / "p" / "plan.json").read_text())
    log = (tmp_path / "p" / "plan.log").read_text()
    assert 1 <= len(done["retiming"]) <= 3 and "re-timing 1: planned for 1.100x" in log
    busy = "; load average " if hasattr(os, "getloadavg") else ")"  # the machine's load while the plans were timed
    assert f"median of 2 round-robin runs, CPU threads: 1{busy}" in log and "the map was timed on 3 CPU thread(s)" in log
    assert "with a 25% margin" in log.splitlines()[-1]
    # a plan kept as meeting it measured 1.1 * 1.25 or more in two timings
    met = "meets 1.1x with a 25% margin" in log
    assert not met or sum(t["measured_speedup"] >= 1.1 * 1.25 for t in done["retiming"]) >= 2


@pytest.mark.parametrize("flags, message", [
    (["--target-kv-cache", "1.5"], "--target-kv-cache is a fraction of the teacher's KV cache in [0, 1)"),
    (["--target-kv-cache", "0.5", "--target-speedup", "2"], "not allowed with argument"),
    (["--target-speedup", "2", "--speed", "fast"], "invalid choice: 'fast'"),
    (["--target-speedup", "2", "--speed-margin", "-0.1"], "--speed-margin must be >= 0"),
    (["--target-speedup", "2", "--retime-rounds", "-1"], "--retime-rounds"),
    (["--target-speedup", "2", "--latency-threads", "0"], "--latency-threads"),
    (["--target-speedup", "2", "--timing-threads", "0"], "--latency-threads"),  # the flag's other spelling
])
def test_plan_student_budget_flags_are_checked(tiny_llama, tiny_corpus, tmp_path, capsys, flags, message):
    import plan_student

    argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as e:
        plan_student.build_parser().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_masked_lm_map_has_no_decode_budget(tiny_teacher, tiny_corpus, combined_map):
    smap = json.loads((combined_map / "sensitivity.json").read_text())
    with pytest.raises(ValueError, match="no decode step timings"):
        choose_plan(smap, target_speedup=1.2, speed="decode")


def test_bench_refuses_a_map_of_another_layer_count_before_the_teacher_loads(tiny_teacher, combined_map, tmp_path,
                                                                              monkeypatch, capsys):
    """bench/plans.py checks the map's layers against the teacher's config (a map of 10^12 layers made the planner
    build range(10^12)), in one line naming the field, before any teacher is loaded."""
    smap = json.loads((combined_map / "sensitivity.json").read_text())
    smap["layers"] = 10 ** 12
    (tmp_path / "map.json").write_text(json.dumps(smap))
    monkeypatch.setattr(plans.session, "start", lambda *a, **k: pytest.fail("the teacher was loaded"))
    argv = ["--teacher", str(tiny_teacher), "--out", str(tmp_path), "--map", str(tmp_path / "map.json")]
    assert run_main(plans.main, plans.build_parser(), argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layers" in err[0] and "map.json" in err[0], err
