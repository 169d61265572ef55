"""The planner for a runtime (``--runtime pytorch|llama.cpp|vllm``, utils/planning/runtimes.py): the options each
keeps (vLLM's on its FFN grid), an old map re-planned for vLLM from only the units it runs, the exporters refusing
exactly what the filter drops, a teacher a runtime cannot run refused in one line, and — where llama-cpp-python is
installed — a plan re-timed and its student timed in llama.cpp itself, on tiny Llama and Qwen2 teachers."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest

import plan_student
from helpers import make_decoder_teacher
from models import load_teacher
from models.export import ExportError
from models.gguf_export import export_gguf
from models.llama import LlamaConfig
from models.nemotron_nas import export_nemotron_nas
from utils.cli.output import plan_table
from utils.cli.run import run_main
from utils.errors import SettingError
from utils.planning.planner import PlanError, choose_plan
from utils.planning.runtimes import check_runtime_teacher, runtime_map, runtime_options, unit_problem
from utils.planning.sensitivity import (compose_units, decoder_options, default_options, option_from_dict, random_unit,
                                        reach_map)

gguf = pytest.importorskip("gguf")

NAS_UNITS = ["kv 1", "ffn 256", "no attention", "no attention ffn 256", "drop", "merge next"]


def _make_teacher(kind: str, tmp_path_factory) -> tuple:
    """(kind, teacher, tokenizer, folder): 4 layers, hidden 48, 6 query heads over 2 KV heads of 8, SwiGLU 512 (on
    the Nemotron-NAS grid), a byte-level BPE tokenizer; llama_bias: a Llama with q/k/v/o biases."""
    folder = make_decoder_teacher(tmp_path_factory.mktemp(kind), model_type=kind.split("_")[0], ffn=512,
                                  tokenizer="bpe", **({"attention_bias": True} if kind == "llama_bias" else {}))
    model, tok = load_teacher(folder)
    return kind, model, tok, folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _make_teacher("llama", tmp_path_factory)


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama_bias"])
def teacher(request, llama, tmp_path_factory):
    return llama if request.param == "llama" else _make_teacher(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def llama_or_qwen2(request, llama, tmp_path_factory):
    return llama if request.param == "llama" else _make_teacher(request.param, tmp_path_factory)


def names(options) -> list[str]:
    return [o.name for o in options]


def test_each_runtime_keeps_the_options_it_runs(teacher):
    kind, model, tok, _ = teacher
    cfg = model.config
    every = default_options(cfg, task="causal")
    assert names(runtime_options(cfg, every, "pytorch")) == names(every)
    llama_cpp = names(runtime_options(cfg, every, "llama.cpp"))  # everything but a linear attention with a bias
    assert llama_cpp == [n for n in names(every) if not (kind == "llama_bias" and n == "linear")]
    if kind == "llama":  # fewer query heads and linear attention go; FFN 384 snaps to 512 (the teacher's: gone),
        assert names(runtime_options(cfg, every, "vllm")) == NAS_UNITS  # 256 stays, 128 snaps to 256 (one option)
    else:  # q/k/v biases: the layout has none
        with pytest.raises(SettingError, match="`runtime` vllm cannot run a student of this teacher: .*biases"):
            check_runtime_teacher("vllm", model, tok)


def test_vllm_snaps_ffn_widths_to_the_layout_grid():
    cfg = LlamaConfig(vocab_size=100, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, num_hidden_layers=3)  # SmolLM2-135M's shapes
    kept = {o.name: o for o in runtime_options(cfg, decoder_options(cfg), "vllm")}
    assert list(kept) == ["kv 1", "ffn 1024", "ffn 768", "ffn 512", "no attention", "no attention ffn 768", "drop",
                          "merge next"]
    assert [kept[n].ffn for n in ("ffn 1024", "ffn 768", "ffn 512")] == [1024, 768, 512]


def _student(model, opt, layer: int):
    """The teacher with one untrained unit of ``opt`` at ``layer``."""
    return compose_units(model, {layer: random_unit(model, opt, layer)})


def test_the_filter_keeps_exactly_what_the_exporters_write(teacher, tmp_path):
    """Every option the filter keeps exports without refusal; every one it drops is refused by the exporter, with
    nothing written (for vLLM also: a linear attention, which the layout writes for TensorRT-LLM and mlx-lm but vLLM
    does not run)."""
    kind, model, tok, _ = teacher
    cfg = model.config
    every = default_options(cfg, task="causal")
    options = {o.name: o for o in every + runtime_options(cfg, every, "vllm" if kind == "llama" else "llama.cpp")}
    target = {"llama.cpp": lambda name: tmp_path / f"{name}.gguf", "vllm": lambda name: tmp_path / f"{name}_nas"}
    writers = {"llama.cpp": lambda m, name: export_gguf(m, target["llama.cpp"](name), tok)[0],
               "vllm": lambda m, name: export_nemotron_nas(m, target["vllm"](name), tok)[0]}
    kept = {"llama.cpp": [], "vllm": []}
    for opt in options.values():
        student, spec, name = _student(model, opt, 1), opt.spec(1, cfg), opt.name.replace(" ", "_")
        for runtime, write in writers.items():
            if runtime == "vllm" and kind != "llama":
                continue  # the teacher itself is refused (test_each_runtime_keeps_the_options_it_runs)
            problem = unit_problem(runtime, 1, spec, cfg=cfg)
            if problem is None:
                kept[runtime].append(opt.name)
                assert write(student, name).exists(), (runtime, opt.name)
            elif runtime == "vllm" and opt.attention == "linear":
                assert "vLLM's DeciLM does not run" in problem and write(student, name).is_dir()
            else:
                with pytest.raises(ExportError, match="layer 1: "):
                    write(student, name)
                assert not target[runtime](name).exists(), (runtime, opt.name)
    dropped = {"llama": set(), "qwen2": set(), "llama_bias": {"linear"}}[kind]
    assert set(kept["llama.cpp"]) == set(options) - dropped
    if kind == "llama":
        assert set(kept["vllm"]) == set(NAS_UNITS)


def _old_map(model, kinds: tuple[str, ...] | None = None) -> dict:
    """A map of every option on every layer (sizes from untrained units), as sensitivity_map.py writes one; the
    options vLLM cannot run are the cheapest, so a plan that ignores the runtime takes them."""
    cfg = model.config
    options = default_options(cfg, None, kinds, task="causal")
    smap = reach_map(model, options, list(range(len(model.layers))))
    by_name = {o.name: o for o in options}
    for e in smap["entries"]:
        opt = by_name[e["option"]]
        e.update(kind=opt.kind, latency_saved_ms=1.0, decode_saved_ms=0.1,
                 kl_teacher_student=0.001 if opt.attention == "linear" or opt.num_heads not in (0, 6) else 0.1)
    smap.update(teacher="tiny", teacher_hash="0" * 8, options=[dataclasses.asdict(o) for o in options],
                timing={"encoder_ms": 10.0, "embeddings_ms": 0.5, "layer_ms": [2.0] * 4, "decode_ms": 1.0,
                        "decode_layer_ms": [0.2] * 4})
    return smap


def test_an_old_map_is_replanned_for_vllm_from_only_its_units(llama):
    _, model, _, _ = llama
    cfg, smap = model.config, _old_map(model)
    anywhere = choose_plan(smap, target_kv_cache=1 / 3)
    assert "linear" in anywhere.choices.values()  # the cheapest, in PyTorch
    vllm = choose_plan(runtime_map(smap, cfg, "vllm"), target_kv_cache=1 / 3)
    opts = {o["name"]: o for o in smap["options"]}
    assert vllm.choices and all(unit_problem("vllm", i, option_from_dict(opts[n]).spec(i, cfg), cfg=cfg) is None
                                for i, n in vllm.choices.items())
    assert vllm.lines[0].startswith("runtime vllm: ") and any("left out: linear (" in x for x in vllm.lines)
    assert smap["entries"] and len(runtime_map(smap, cfg, "vllm")["entries"]) < len(smap["entries"])  # a copy
    few = _old_map(model, ("kv", "heads", "linear"))  # only one KV head is left to vLLM: half the cache at best
    choose_plan(few, target_kv_cache=1 / 3)
    with pytest.raises(PlanError, match="the map's options that vllm runs"):
        choose_plan(runtime_map(few, cfg, "vllm"), target_kv_cache=1 / 3)


def error_line(capsys) -> str:
    """The message of the one error line of a script's stderr (its log lines and usage aside; argparse's form,
    ``<prog>: error: ...``), with no traceback."""
    err = capsys.readouterr().err
    lines = [line.partition("error: ")[2] for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _plan_argv(folder, corpus, tmp_path, smap: dict, *flags: str) -> list[str]:
    (tmp_path / "old").mkdir(exist_ok=True)
    (tmp_path / "old" / "sensitivity.json").write_text(json.dumps(smap))
    return ["--teacher", str(folder), "--data-dir", str(corpus), "--out", str(tmp_path), "--run-name", "p",
            "--map", str(tmp_path / "old"), "--plan-only", "--seq-len", "16", "--batch-size", "8", "--device", "cpu",
            "--force", *flags]


def test_plan_student_replans_an_old_map_for_vllm_and_refuses_what_it_cannot_reach(llama, tiny_corpus, tmp_path,
                                                                                  capsys):
    _, model, _, folder = llama
    argv = _plan_argv(folder, tiny_corpus, tmp_path, _old_map(model), "--target-kv-cache", "1/3", "--runtime", "vllm")
    assert run_main(plan_student.main, plan_student.build_parser(), argv) == 0
    done = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert done["runtime"] == "vllm" and set(done["plan"].values()) <= set(NAS_UNITS)
    assert "left out: heads 4 (layer 0: 4 query heads of 8" in (tmp_path / "p" / "plan.log").read_text()
    capsys.readouterr()
    argv = _plan_argv(folder, tiny_corpus, tmp_path, _old_map(model, ("kv", "heads", "linear")), "--target-kv-cache",
                      "1/3", "--runtime", "vllm")
    assert run_main(plan_student.main, plan_student.build_parser(), argv) == 2
    assert error_line(capsys).startswith("--target-kv-cache 0.333333 cannot be met: the map's options that "
                                         "vllm runs keep at least 0.500")


def test_a_teacher_a_runtime_cannot_run_is_refused_in_one_line(tiny_llama, tiny_corpus, tmp_path, capsys):
    """tiny_llama: SwiGLU 64 (off vLLM's grid) and a word-level tokenizer (no GGUF form)."""
    model, tok = load_teacher(tiny_llama)
    with pytest.raises(SettingError, match="cannot run this teacher's own layers: layer 0: FFN width 64 is off"):
        check_runtime_teacher("vllm", model, tok)
    with pytest.raises(SettingError, match="`runtime` llama.cpp cannot run a student of this teacher: .*byte-level"):
        check_runtime_teacher("llama.cpp", model, tok)
    argv = _plan_argv(tiny_llama, tiny_corpus, tmp_path, _old_map(model), "--target-kv-cache", "1/2", "--runtime",
                      "vllm")
    assert run_main(plan_student.main, plan_student.build_parser(), argv) == 2
    assert error_line(capsys).startswith("--runtime vllm cannot run this teacher's own layers: layer 0")


def test_llama_cpp_timing_without_llama_cpp_python_is_refused_in_one_line(llama, tiny_corpus, tmp_path, capsys,
                                                                          monkeypatch):
    _, model, _, folder = llama
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    argv = _plan_argv(folder, tiny_corpus, tmp_path, _old_map(model), "--target-speedup", "1.1", "--runtime",
                      "llama.cpp")
    assert run_main(plan_student.main, plan_student.build_parser(), argv) == 2
    assert error_line(capsys).startswith("--runtime llama.cpp times students in llama.cpp itself: "
                                         "llama-cpp-python is not installed")
    assert not (tmp_path / "p").exists()


def test_a_plan_for_llama_cpp_is_retimed_and_its_student_timed_in_llama_cpp(llama_or_qwen2, tiny_corpus, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
    from utils import api

    _, model, _, folder = llama_or_qwen2
    session = api.SessionConfig(teacher=str(folder), device="cpu",
                                data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16, batch_size=8))
    config = api.MapConfig(latency_reps=3, latency_threads=1, runtime="llama.cpp", gguf_type="f32",
                           max_train_sentences=32, eval_sentences=16, valid_batches=1)
    smap = _old_map(model, ("kv", "drop"))
    planned = api.plan_student(session, target_speedup=1.05, map=smap, config=config, out=tmp_path / "speed",
                               plan_only=True, retime_rounds=2, speed_margin=0.0,
                               train=api.TrainConfig(force=True))
    log = (tmp_path / "speed" / "plan.log").read_text()
    assert "in llama.cpp, f32 GGUF files, median of 3 round-robin runs, CPU threads: 1" in log
    assert planned.results["retiming"] and all(r["in"] == "llama.cpp" and r["teacher_ms"] > 0
                                               for r in planned.results["retiming"])
    done = api.plan_student(session, target_kv_cache=0.5, map=smap, config=config, out=tmp_path / "kv",
                            finetune=api.PlanFinetune(epochs=0, test_sentences=8),
                            train=api.TrainConfig(epochs=1, max_steps_per_epoch=1, force=True))
    timed = done.results["llama_cpp"]
    assert (timed["gguf_type"], timed["threads"], timed["reps"], timed["seq"]) == ("f32", 1, 3, 16)
    assert timed["prefill_speedup"] > 0 and timed["student_decode_tokens_per_s"] > 0 and done.results["target_met"]
    assert "in llama.cpp (f32 GGUF, 1 thread(s), median of 3): prefill " in plan_table(done.results)


def test_a_map_for_vllm_maps_only_its_units_on_its_grid(llama, tiny_corpus, tmp_path):
    from utils import api

    folder = llama[3]
    api.sensitivity_map(api.SessionConfig(teacher=str(folder), device="cpu",
                                          data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16, batch_size=8)),
                        config=api.MapConfig(options=("kv", "heads", "ffn", "drop"), runtime="vllm",
                                             max_train_sentences=24, eval_sentences=8, valid_batches=1,
                                             latency_reps=2, latency_batch=1),
                        train=api.TrainConfig(epochs=1, max_steps_per_epoch=1), out=tmp_path / "map")
    smap = json.loads((tmp_path / "map" / "sensitivity.json").read_text())
    assert smap["runtime"] == "vllm" and [o["name"] for o in smap["options"]] == ["kv 1", "ffn 256", "drop"]
    assert {e["option"] for e in smap["entries"]} == {"kv 1", "ffn 256", "drop"} and len(smap["entries"]) == 12
    assert next(o for o in smap["options"] if o["name"] == "ffn 256")["ffn"] == 256


def test_a_map_for_llama_cpp_is_timed_in_llama_cpp(llama, tiny_corpus, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
    from utils import api

    folder = llama[3]
    session = api.SessionConfig(teacher=str(folder), device="cpu",
                                data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16, batch_size=8))
    config = api.MapConfig(options=("kv", "linear", "merge", "drop"), runtime="llama.cpp", gguf_type="q8_0",
                           max_train_sentences=24, eval_sentences=8, valid_batches=1, latency_reps=2,
                           latency_batch=1, latency_threads=1)
    smap = api.sensitivity_map(session, config=config, train=api.TrainConfig(epochs=1, max_steps_per_epoch=1),
                               out=tmp_path / "map")
    t = smap["timing"]
    assert (t["in"], t["gguf_type"], t["threads"], t["batch"], t["seq"]) == ("llama.cpp", "q8_0", 1, 1, 16)
    assert smap["pytorch_timing"]["batch"] == 1 and "in" not in smap["pytorch_timing"]
    by = {}
    for e in smap["entries"]:  # one saving per option, the same at every layer; the schema's sums hold
        by.setdefault(e["option"], set()).add((e["latency_saved_ms"], e["decode_saved_ms"]))
        assert e["latency_saved_ms"] == pytest.approx(sum(t["layer_ms"][j] for j in e["covers"]) - e["unit_ms"])
        assert e["unit_ms"] == t["unit_ms"][f"{e['layer']}/{e['option']}"]
    assert set(by) == {"kv 1", "linear", "merge next", "drop"} and all(len(v) == 1 for v in by.values())
    assert t["encoder_ms"] == pytest.approx(t["embeddings_ms"] + sum(t["layer_ms"]))
    written = json.loads((tmp_path / "map" / "sensitivity.json").read_text())
    assert written["timing"]["in"] == "llama.cpp" and choose_plan(written, target_kv_cache=0.5).choices


def test_an_unknown_runtime_is_refused():
    from utils.planning.students import MapConfig

    with pytest.raises(SettingError, match="`runtime` must be one of pytorch, llama.cpp, vllm, got 'onnx'"):
        MapConfig(runtime="onnx")
