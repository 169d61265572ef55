"""Sensitivity map and planner on the tiny teacher: the map's shape and numbers, the planner's budgets."""
from __future__ import annotations

import itertools
import json
import math
import os

import pytest

import plan_student
import sensitivity_map
from utils.cli.run import run_main
from utils.planning.planner import choose_plan
from utils.training.students import load_model

FAST = ["--device", "cpu", "--batch-size", "16", "--epochs", "1", "--max-steps-per-epoch", "3", "--latency-reps", "2",
        "--eval-sentences", "32", "--valid-batches", "1"]


@pytest.fixture(scope="module")
def tiny_map(tiny_teacher, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("map")
    argv = ["--teacher", str(tiny_teacher), "--data-dir", str(tiny_corpus), "--out", str(out), "--run-name", "m",
            "--cache-dir", str(out / "cache")] + FAST
    assert run_main(sensitivity_map.main, sensitivity_map.build_parser(), argv) == 0
    return out / "m"


def test_map_shape_keys_and_numbers(tiny_map):
    smap = json.loads((tiny_map / "sensitivity.json").read_text())
    names = [o["name"] for o in smap["options"]]
    assert names == ["heads 3", "heads 2", "heads 1", "head_dim 4", "merge next", "ffn 32",  # 4 heads of 8, ffn 64
                     "heads 1 ffn 32", "heads 1 ffn 16", "merge heads 2 ffn 32"]  # combined (test_combined_options)
    cells = {(e["layer"], e["option"]) for e in smap["entries"]}
    want = {(i, n) for i in (0, 1) for n in names if not (n.startswith("merge") and i == 1)}  # no layer after the last
    assert cells == want and len(smap["entries"]) == len(want)
    t = smap["timing"]
    assert len(t["layer_ms"]) == 2 and t["encoder_ms"] > 0
    if hasattr(os, "getloadavg"):  # the machine's load while the units were timed, in the map and its table
        assert t["load"]["load_1min_min"] <= t["load"]["load_1min_max"] and t["load"]["cpus"] >= 1
        assert "load average" in (tiny_map / "sensitivity.md").read_text().splitlines()[0]
    for e in smap["entries"]:
        for k in ("top1_drop", "agreement_top1", "kl_teacher_student", "hidden_cosine", "latency_saved_ms", "unit_ms"):
            assert isinstance(e[k], float) and math.isfinite(e[k]), (e["option"], k)
        assert 0 <= e["agreement_top1"] <= 1 and e["kl_teacher_student"] > -1e-6 and e["unit_ms"] > 0
        covered = sum(t["layer_ms"][j] for j in e["covers"])
        assert e["latency_saved_ms"] == pytest.approx(covered - e["unit_ms"])
    by = {(e["layer"], e["option"]): e for e in smap["entries"]}
    # 2 of 4 heads removed: q, k, v rows (32 x 8 + 8 each) and 8 output columns of 32, per head
    assert by[0, "heads 2"]["params_saved"] == 2 * (3 * (32 * 8 + 8) + 8 * 32)
    assert by[0, "ffn 32"]["params_saved"] == 32 * (32 + 1) + 32 * 32  # 32 neurons: input row + bias, output column
    assert by[0, "merge next"]["params_saved"] > by[0, "heads 1"]["params_saved"]
    md = (tiny_map / "sensitivity.md").read_text().splitlines()
    assert sum(1 for line in md if line.startswith("| 0 (") or line.startswith("| 1 (")) == 2
    assert (tiny_map / "sensitivity.png").stat().st_size > 1000



def test_a_map_from_before_loads_were_recorded_renders_without_one(tiny_map):
    from utils.planning.sensitivity import map_markdown

    smap = json.loads((tiny_map / "sensitivity.json").read_text())
    smap["timing"].pop("load", None)
    head = map_markdown(smap).splitlines()[0]
    assert "load average" not in head and f"(median of {smap['timing']['reps']})" in head

def _synthetic_map(n: int = 4) -> dict:
    entries = []
    for i in range(n):
        for name, kind, cost, ms, params in (("heads 2", "block", 0.01 * (i + 1), 2.0, 100),
                                             ("ffn", "ffn", 0.03, 3.0, 150),
                                             ("merge next", "merge", 0.05 + 0.01 * i, 9.0, 500)):
            if kind == "merge" and i + 1 >= n:
                continue
            entries.append({"layer": i, "option": name, "kind": kind, "covers": [i, i + 1] if kind == "merge" else [i],
                            "kl_teacher_student": cost, "latency_saved_ms": ms + 0.1 * i, "params_saved": params + i})
    return {"layers": n, "timing": {"encoder_ms": 50.0}, "teacher_params": 10_000, "entries": entries,
            "options": []}


def _brute_force(smap, key, needed):
    n, best = smap["layers"], (math.inf, None)
    per = {i: [None] + [e for e in smap["entries"] if e["layer"] == i] for i in range(n)}
    for combo in itertools.product(*(per[i] for i in range(n))):
        used, ok = set(), True
        for e in filter(None, combo):
            if used & set(e["covers"]):
                ok = False
            used |= set(e["covers"])
        if ok and sum(e[key] for e in filter(None, combo)) >= needed:
            cost = sum(e["kl_teacher_student"] for e in filter(None, combo))
            best = min(best, (cost, combo), key=lambda x: x[0])
    return best[0]


@pytest.mark.parametrize("speedup", [1.1, 1.3, 1.5])
def test_plan_meets_speed_budget_at_least_cost(speedup):
    smap = _synthetic_map()
    plan = choose_plan(smap, target_speedup=speedup)
    chosen = [e for e in smap["entries"] if plan.choices.get(e["layer"]) == e["option"]]
    saved = sum(e["latency_saved_ms"] for e in chosen)
    assert 50.0 - saved <= 50.0 / speedup  # the map's latencies meet the budget
    layers = [j for e in chosen for j in e["covers"]]
    assert len(layers) == len(set(layers))  # a merged pair's second layer gets no option of its own
    assert plan.cost == pytest.approx(_brute_force(smap, "latency_saved_ms", 50.0 * (1 - 1 / speedup)), abs=0.011)
    assert any(line.startswith("plan (") for line in plan.lines) and any("candidates" in l for l in plan.lines)


def test_plan_meets_params_budget_exactly():
    smap = _synthetic_map()
    for target in (9_900, 9_700, 9_400, 9_000):
        plan = choose_plan(smap, target_params=target)
        saved = sum(e["params_saved"] for e in smap["entries"] if plan.choices.get(e["layer"]) == e["option"])
        assert 10_000 - saved <= target
    with pytest.raises(ValueError, match="cannot be met"):
        choose_plan(smap, target_params=100)
    assert choose_plan(smap, target_params=20_000).choices == {}


def test_planner_end_to_end(tiny_teacher, tiny_corpus, tiny_map, tmp_path):
    smap = json.loads((tiny_map / "sensitivity.json").read_text())
    target = smap["teacher_params"] - 3000  # needs more than one head or the ffn cut
    argv = ["--teacher", str(tiny_teacher), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name",
            "p", "--cache-dir", str(tmp_path / "cache"), "--map", str(tiny_map), "--target-params", str(target),
            "--ft-epochs", "1", "--test-sentences", "32"] + FAST
    assert run_main(plan_student.main, plan_student.build_parser(), argv) == 0
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert res["target_met"] and res["student_params"] <= target and res["plan"]
    chosen = [e for e in smap["entries"] if res["plan"].get(str(e["layer"])) == e["option"]]
    assert res["student_params"] == smap["teacher_params"] - sum(e["params_saved"] for e in chosen)
    model, meta = load_model(tmp_path / "p" / "model" / "best")
    assert model.num_parameters() == res["student_params"] and meta["plan"] == res["plan"]
    log = (tmp_path / "p" / "plan.log").read_text()
    assert "budget: parameters <=" in log and "total: cost" in log
    for k in ("student_top1", "agreement_top1", "kl_teacher_student"):
        assert math.isfinite(res["metrics"][k])
    assert res["measured_speedup"] > 0 and res["test_sentences"] == 32
    bad = argv[:argv.index("--target-params")] + ["--target-params", "1000"] + argv[argv.index("--target-params") + 2:]
    bad[bad.index("p")] = "p2"
    assert run_main(plan_student.main, plan_student.build_parser(), bad) == 2  # a usage error: what the map reaches


def test_a_stopped_map_trains_and_measures_only_what_it_had_not(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
    """Run again with --resume (as after a preemption), the map loads the units it trained and reuses what it measured
    on them (units/<option>/measured.json): the same entries, no unit evaluated again; a unit whose weights are not
    the ones measured (here: the record says other weights) is measured again."""
    from utils.evaluation.metrics import UnitEvaluator

    argv = ["--teacher", str(tiny_teacher), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name", "m",
            "--options", "ffn", "--resume"] + FAST
    assert run_main(sensitivity_map.main, sensitivity_map.build_parser(), argv) == 0
    first = json.loads((tmp_path / "m" / "sensitivity.json").read_text())["entries"]
    measured = []
    real = UnitEvaluator.measure

    def counted(self, model, start):  # students only: the teacher's own numbers are measured on each run
        if model is not self.teacher:
            measured.append(start)
        return real(self, model, start)

    monkeypatch.setattr(UnitEvaluator, "measure", counted)

    def again() -> list[dict]:
        measured.clear()
        assert run_main(sensitivity_map.main, sensitivity_map.build_parser(), argv) == 0
        return json.loads((tmp_path / "m" / "sensitivity.json").read_text())["entries"]

    quality = ("top1_drop", "agreement_top1", "kl_teacher_student", "hidden_cosine", "val_loss", "train_s_option")
    second = again()
    assert measured == []
    assert [{k: e[k] for k in quality} for e in second] == [{k: e[k] for k in quality} for e in first]
    record = tmp_path / "m" / "units" / "ffn_32" / "measured.json"
    done = json.loads(record.read_text())
    assert sorted(done["key"]["units"]) == ["0", "1"] and len(done["entries"]) == 2
    done["key"]["units"]["1"] = "0" * 64  # as if layer 1's unit had been trained again since
    record.write_text(json.dumps(done))
    third = again()
    assert measured == [0, 1]  # the option's units, measured again
    assert [e["kl_teacher_student"] for e in third] == pytest.approx([e["kl_teacher_student"] for e in first])


def test_a_map_keeps_the_start_of_units_training_made_worse(tiny_llama, tiny_corpus, tmp_path):
    """Units start from the teacher's weights, and the lr that trains one teacher's units wrecks another's (1e-3:
    better than 1e-4 on SmolLM2, far worse on Qwen2.5-Coder's layer 0): by default each unit is validated before its
    first step and kept as it started unless training beats it. At a harmful lr the map's unit is its start (best is
    epoch 0); with --no-keep-start it is the trained one."""
    from utils.storage.checkpoint import read_meta

    def unit_epoch(flags: list[str], name: str) -> int:
        argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name",
                name, "--seq-len", "16", "--options", "ffn", "--layers", "1", "--lr", "3", *flags] + FAST
        assert run_main(sensitivity_map.main, sensitivity_map.build_parser(), argv) == 0
        metas = [read_meta(d) for d in (tmp_path / name / "units").glob("*/*/best")]
        assert metas and len({m["epoch"] for m in metas}) == 1, metas
        return metas[0]["epoch"]

    assert unit_epoch([], "kept") == 0
    assert unit_epoch(["--no-keep-start"], "trained") == 1


@pytest.mark.parametrize("module, extra, default", [(sensitivity_map, [], True),
                                                    (plan_student, ["--target-speedup", "1.3"], True)])
def test_keep_start_flags(module, extra, default):
    """--keep-start is on by default for the map's and a planned student's units, --no-keep-start turns it off."""
    from utils.cli.configs import train_config

    args = module.build_parser().parse_args(["--teacher", "t", *extra])
    assert args.keep_start is default and train_config(args).keep_start is default
    assert module.build_parser().parse_args(["--teacher", "t", "--no-keep-start", *extra]).keep_start is False



def test_ffn_units_start_refit_and_a_copy_started_unit_is_not_reused_as_one(tiny_llama, tiny_corpus, tmp_path,
                                                                             capsys):
    """A map's narrower feed-forward units start with their output projection refit on the first training tokens
    (--ffn-refit-tokens, on by default; 0: the plain copy). The refit is part of the units' training setup: a map
    made without it is not continued with it (one-line error), and a plan reading that map's units (``map_trained``)
    trains its own refit units instead, while a plan without the refit reuses them."""
    from utils import api
    from utils.planning.sensitivity import build_units, load_map_trained, map_trained, option_from_dict
    from utils.planning.students import MapConfig, context
    from utils.storage.checkpoint import read_meta

    def run_map(flags: list[str]) -> int:
        argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name",
                "m", "--seq-len", "16", "--options", "ffn", "--layers", "1,2", "--resume", *flags] + FAST
        return run_main(sensitivity_map.main, sensitivity_map.build_parser(), argv)

    assert run_map(["--ffn-refit-tokens", "0"]) == 0
    metas = [read_meta(d) for d in (tmp_path / "m" / "units").glob("*/*/best")]
    assert metas and all("ffn: top" in m["init"] and "refit" not in m["init"] for m in metas)
    capsys.readouterr()
    assert run_map([]) == 1
    assert "ffn_refit_tokens: resume point has None, this run has 16384" in capsys.readouterr().err

    smap = json.loads((tmp_path / "m" / "sensitivity.json").read_text())
    option = option_from_dict(smap["options"][0])
    session = api.load_teacher(str(tiny_llama), device="cpu",
                               data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16, batch_size=16))

    def units_to_train(tokens: int) -> tuple[dict, str]:
        train = api.TrainConfig(epochs=1, max_steps_per_epoch=3, ffn_refit_tokens=tokens)
        ctx = context(session, MapConfig(eval_sentences=32), train=train, record={})
        found = map_trained(ctx, {1: option}, tmp_path / "m" / "units")
        units = build_units(ctx, {1: option}, no_refit=found)
        load_map_trained(units, found)
        return found, units[1].note

    found, note = units_to_train(64)
    assert found == {} and "output projection refit on 64 tokens" in note
    found, note = units_to_train(0)
    assert list(found) == [1] and "trained by the map" in note and "ffn: top" in note


def test_a_planned_student_asks_before_it_builds_and_skips_the_refit_of_map_units(tiny_llama, tiny_corpus, tmp_path,
                                                                                   monkeypatch):
    """``make_student`` checks whether its folder already holds the student before it builds any unit (a refit runs
    the teacher over its probe: a requeued bench that only loads its students should not pay for that), and units a
    map trained are loaded without being refit first; their notes say how the map's unit started."""
    from utils import api
    from utils.planning import sensitivity, students
    from utils.planning.sensitivity import option_from_dict
    from utils.planning.students import MapConfig, PlanFinetune, context, make_student
    from utils.storage.checkpoint import read_meta

    argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--out", str(tmp_path), "--run-name", "m",
            "--seq-len", "16", "--options", "ffn", "--layers", "1,2", "--ffn-refit-tokens", "64"] + FAST
    assert run_main(sensitivity_map.main, sensitivity_map.build_parser(), argv) == 0
    option = option_from_dict(json.loads((tmp_path / "m" / "sensitivity.json").read_text())["options"][0])
    session = api.load_teacher(str(tiny_llama), device="cpu",
                               data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16, batch_size=16))
    train = api.TrainConfig(epochs=1, max_steps_per_epoch=3, ffn_refit_tokens=64)
    ctx = context(session, MapConfig(eval_sentences=32), train=train, record={})
    refit_layers: list[int] = []
    rank = sensitivity.neuron_rankings
    monkeypatch.setattr(sensitivity, "neuron_rankings", lambda t, probe, layers, **kw: (
        refit_layers.extend(layers if kw.get("keep_inputs") else []), rank(t, probe, layers, **kw))[1])

    def build() -> dict:
        make_student(session, ctx, {1: option, 2: option}, run=tmp_path / "s", origin="test",
                     finetune=PlanFinetune(epochs=0), map_units=tmp_path / "m" / "units")
        return read_meta(tmp_path / "s" / "model" / "best")

    meta = build()
    assert refit_layers == []  # both units came from the map: neither was refit again
    sources = " ".join(meta["sources"])
    assert sources.count("trained by the map") == 2 and sources.count("output projection refit on 64 tokens") == 2
    assert meta["build"]["ffn_refit_tokens"] == 64 and not (tmp_path / "s" / "units").exists()

    def no_units(*args, **kwargs):
        raise AssertionError("a unit was built for a student the folder already holds")

    monkeypatch.setattr(students, "build_units", no_units)
    assert build()["sources"] == meta["sources"]  # loaded as it was


def test_ffn_refit_flag_where_units_narrow_a_feed_forward_part():
    """--ffn-refit-tokens (default 16384) on the scripts that build single-layer units; not on the end-to-end heal."""
    import finetune_merged
    import retrain_single_block
    from bench import plans
    from utils.cli.configs import train_config

    for module, extra in [(sensitivity_map, []), (plan_student, ["--target-speedup", "1.3"]),
                          (retrain_single_block, ["--block", "1"]), (plans, ["--map", "m"])]:
        args = module.build_parser().parse_args(["--teacher", "t", *extra])
        assert train_config(args).ffn_refit_tokens == 16384, module
        args = module.build_parser().parse_args(["--teacher", "t", "--ffn-refit-tokens", "0", *extra])
        assert train_config(args).ffn_refit_tokens == 0, module
    assert "ffn_refit_tokens" not in vars(finetune_merged.build_parser().parse_args(["--teacher", "t"]))


def test_a_student_built_from_copied_units_is_not_loaded_for_a_refit_one(tiny_llama, tiny_corpus, tmp_path):
    """A planned student's record says how its narrower feed-forward parts started: asked again with the same
    plan and settings it is loaded; asked with the refit switched, it is built anew."""
    from utils import api
    from utils.planning.sensitivity import default_options
    from utils.planning.students import MapConfig, PlanFinetune, context, make_student
    from utils.storage.checkpoint import read_meta

    session = api.load_teacher(str(tiny_llama), device="cpu",
                               data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16, batch_size=8))
    ffn = next(o for o in default_options(session.teacher.config, kinds=("ffn",), task="causal"))

    def build(tokens: int) -> dict:
        train = api.TrainConfig(epochs=1, max_steps_per_epoch=1, ffn_refit_tokens=tokens)
        ctx = context(session, MapConfig(eval_sentences=16), train=train, record={})
        make_student(session, ctx, {1: ffn}, run=tmp_path / "s", origin="test", finetune=PlanFinetune(epochs=0),
                     train=False)
        best = tmp_path / "s" / "model" / "best"
        return {**read_meta(best), "written": max(f.stat().st_mtime_ns for f in best.iterdir())}

    first = build(0)
    assert "ffn_refit_tokens" not in first["build"] and "refit" not in " ".join(first["sources"])
    assert build(0)["written"] == first["written"]  # loaded, not written again
    refit = build(32)
    assert refit["written"] > first["written"] and refit["build"]["ffn_refit_tokens"] == 32
    assert "output projection refit on 32 tokens" in " ".join(refit["sources"])
