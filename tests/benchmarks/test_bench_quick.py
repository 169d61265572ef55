"""Every script in bench/ runs in its --quick mode (tiny shapes, the real run's code path) as a user starts it, in a
subprocess, and prints or writes its table: a refactor that breaks a benchmark fails here. bench/decoder_blocks.py's
quick run is tests/benchmarks/test_decoder_bench.py; bench/gpu.sh, which needs a CUDA device, is checked for calling
scripts that exist with flags they take."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from helpers import ROOT, make_decoder_teacher, make_sentences, run_script

pytestmark = pytest.mark.slow


def ok(r) -> str:
    """stdout of a run that must have succeeded (its stderr's tail in the failure message)."""
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_retrain_throughput_prints_the_ratios(tiny_teacher, tiny_corpus, tmp_path):
    """(a), (b) and (c) on the tiny teacher, on sentences tokenised as the real run's WikiText-2 text is."""
    out = ok(run_script("bench/retrain_throughput.py", "--quick", "--threads", "1", "--text",
                        tiny_corpus / "train.txt", "--tokenizer", tiny_teacher, "--cache-root", tmp_path,
                        "--json", tmp_path / "rt.json"))
    ratios = re.search(r"\(b\)/\(a\) = ([\d.]+)x +\(c\)/\(a\) = ([\d.]+)x", out)
    assert ratios and min(float(x) for x in ratios.groups()) > 0, out
    r = json.loads((tmp_path / "rt.json").read_text())
    assert r["quick"] and r["blocks"] == 2 and r["target_5x_met"] is None
    assert r["data"].startswith(str(tiny_corpus / "train.txt"))
    assert r["ratios"]["c_over_a"] == pytest.approx(float(ratios.group(2)), abs=0.006)
    # the three methods did the same training: one final-epoch loss per block each
    assert [len(r["final_epoch_loss"][k]) for k in "abc"] == [2, 2, 2]
    assert not list(tmp_path.glob("bench_cache_*"))  # the temporary cache is gone


def test_inference_speed_times_every_variant(tmp_path):
    ok(run_script("bench/inference_speed.py", "--quick", "--threads", "1", "--onnx", "--json", tmp_path / "is.json"))
    r = json.loads((tmp_path / "is.json").read_text())
    plain = {k for k in r["models"] if not k.endswith("[ONNX Runtime]")}
    assert plain == {"teacher", "blocks 2x8", "blocks 4x4", "merged 2->1"} and len(r["models"]) == 8
    assert r["target_met"] is None and r["merged_encoder_speedup"] > 0
    assert all(m[case]["latency_s"] > 0 for m in r["models"].values() for case in ("encoder", "MLM"))


def test_quality_sweeps_the_given_teacher(tiny_teacher, tiny_corpus, tmp_path):
    ok(run_script("bench/quality.py", "--quick", "--teacher", tiny_teacher, "--data-dir", tiny_corpus, "--blocks",
                  "2x8", "--latency-reps", "2", "--threads", "1", "--out", tmp_path / "q", "--cache-dir",
                  tmp_path / "cache"))
    r = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert {(x["setting"], x["method"]) for x in r["rows"]} >= {
        ("teacher", "teacher"), ("blocks 2x8", "untrained"), ("blocks 2x8", "retrained"),
        ("merged pairs", "retrained + fine-tuned")}
    assert "| blocks 2x8 | retrained |" in (tmp_path / "q" / "quality.md").read_text()


def test_plans_builds_every_method(tiny_llama, tiny_corpus, tmp_path):
    """A decoder's KV-cache target (in bytes: the same on every machine) from a small map made here."""
    from utils import api

    api.sensitivity_map(api.SessionConfig(teacher=str(tiny_llama), device="cpu",
                                          data=api.DataConfig(data_dir=str(tiny_corpus), seq_len=16, batch_size=8)),
                        config=api.MapConfig(options=("kv", "drop"), max_train_sentences=48, eval_sentences=16,
                                             valid_batches=1, latency_reps=3, latency_batch=1),
                        train=api.TrainConfig(epochs=1, max_steps_per_epoch=2), out=tmp_path / "map")
    ok(run_script("bench/plans.py", "--quick", "--teacher", tiny_llama, "--data-dir", tiny_corpus, "--map",
                  tmp_path / "map", "--targets", "none", "--kv-targets", "0.5", "--out", tmp_path, "--run-name", "b"))
    r = json.loads((tmp_path / "b" / "plans.json").read_text())
    assert {"planned", "uniform", "ShortGPT", "SLEB"} <= {x["method"] for x in r["rows"]}
    assert r["test_items"] > 0 and all(x["kv_bytes"] <= 0.5 * r["teacher_kv_bytes"] for x in r["rows"])
    assert "| KV 0.5 | planned |" in (tmp_path / "b" / "plans.md").read_text()
    if hasattr(os, "getloadavg"):  # the load during the run's timings, beside them
        assert r["timing_load"]["cpus"] >= 1 and r["timing_load"]["load_1min_max"] >= r["timing_load"]["load_1min_min"]
        assert "load average" in (tmp_path / "b" / "plans.md").read_text().splitlines()[0]


def test_paired_decoders_tests_each_student(tiny_llama, tiny_corpus, tmp_path):
    from models import load_teacher
    from models.compress import clone_model, drop_every_second
    from models.hf import weights_hash
    from utils.training.students import save_model

    teacher, _ = load_teacher(str(tiny_llama))
    meta = {"teacher": str(tiny_llama), "teacher_hash": weights_hash(teacher)}
    save_model(clone_model(drop_every_second(teacher)[0]), tmp_path / "half", meta)
    save_model(clone_model(teacher), tmp_path / "same", meta)
    out = ok(run_script("bench/paired_decoders.py", "--quick", "--teacher", tiny_llama, "--data-dir", tiny_corpus,
                        "--models", f"same={tmp_path / 'same'}", f"half={tmp_path / 'half'}", "--reference", "same",
                        "--out", tmp_path / "p"))
    r = json.loads((tmp_path / "p" / "paired.json").read_text())
    assert r["seq_len"] == 16 and set(r["tests"]) == {"half"} and r["rows"]["same"]["agreement"] == 1.0
    assert any(line.startswith("| half |") for line in out.splitlines())


def test_llama_cpp_speed_times_the_teacher_and_a_student(tiny_corpus, tmp_path):
    """A tiny Llama with a byte-level BPE tokenizer (what a GGUF carries) and its every-second-layer student."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
    from models import load_teacher
    from models.compress import clone_model, drop_every_second
    from models.hf import weights_hash
    from utils.training.students import save_model

    folder = make_decoder_teacher(tmp_path / "t", tokenizer="bpe")
    teacher, _ = load_teacher(str(folder))
    save_model(clone_model(drop_every_second(teacher)[0]), tmp_path / "half",
               {"teacher": str(folder), "teacher_hash": weights_hash(teacher)})
    out = ok(run_script("bench/llama_cpp_speed.py", "--quick", "--teacher", folder, "--data-dir", tiny_corpus,
                        "--models", f"half={tmp_path / 'half'}", "--out", tmp_path, "--run-name", "l"))
    r = json.loads((tmp_path / "l" / "llama_cpp.json").read_text())
    assert (r["seq_len"], r["windows"], r["threads"]) == (16, 2, [1]) and len(r["speed"]) == 4
    assert any(line.startswith("| half | q8_0 |") for line in out.splitlines())


def test_convert_smollm2_converts_and_checks_a_tiny_gguf(tiny_corpus, tmp_path):
    """--quick writes a tiny Llama GGUF (random weights, a byte-level BPE tokenizer) in place of the package's file,
    converts it and measures it as the real file is; our loader reads the folder as a teacher."""
    from models import load_teacher

    out = ok(run_script("bench/convert_smollm2.py", "--quick", "--check", "--data-dir", tiny_corpus, "--out",
                        tmp_path / "hf"))
    check = json.loads((tmp_path / "hf" / "check_test.json").read_text())
    assert (check["window"], check["windows"], check["predicted_tokens"]) == (16, 4, 60)
    assert 1 < check["perplexity"] < float("inf") and f"{check['perplexity']:.3f} |" in out
    shape = json.loads((tmp_path / "hf" / "conversion.json").read_text())["shape"]
    assert (shape["layers"], shape["heads"], shape["kv_heads"], shape["tied_embeddings"]) == (2, 9, 3, True)
    teacher, _ = load_teacher(tmp_path / "hf")
    assert teacher.config.num_hidden_layers == 2 and teacher.config.family == "llama"


@pytest.fixture
def sentence_file(tmp_path) -> Path:
    src = tmp_path / "sentences.txt"
    src.write_text("\n".join(make_sentences(90, seed=7)) + "\n")
    return src


def test_prepare_wikitext2_splits_a_small_file(sentence_file, tmp_path):
    out = ok(run_script("bench/prepare_wikitext2.py", "--quick", "--src", sentence_file, "--out", tmp_path / "s"))
    assert "train: 40, valid: 10, test: 40 sentences written to" in out
    assert [len((tmp_path / "s" / f"{n}.txt").read_text().splitlines()) for n in ("train", "valid", "test")] == \
        [40, 10, 40]


def test_make_mlm_teacher_runs_the_recipe(tiny_encoder, sentence_file, tmp_path):
    out = ok(run_script("bench/make_mlm_teacher.py", "--quick", "--encoder", tiny_encoder, "--src", sentence_file,
                        "--out", tmp_path / "t", "--device", "cpu"))
    info = json.loads((tmp_path / "t" / "provenance.json").read_text())
    assert (info["sentences"], info["held_out"], info["finetune_steps"]) == (50, 20, 3)
    assert 0 <= info["heldout_top1"] <= 1 and out.strip().endswith(f"results written to {tmp_path / 't'}")


FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def gpu_sh_calls() -> dict[str, set[str]]:
    """{script: the flags gpu.sh passes it} for every bench script gpu.sh runs: the flags on its command line (lines
    joined at '\\') and in the bash arrays that line expands (``NAME=(...)``, ``NAME+=(...)``)."""
    lines = (ROOT / "bench" / "gpu.sh").read_text().replace("\\\n", " ").splitlines()
    arrays: dict[str, set[str]] = {}
    for line in lines:
        for name, body in re.findall(r"\b(\w+)\+?=\(([^)]*)\)", line):
            arrays.setdefault(name, set()).update(FLAG.findall(body))
    calls: dict[str, set[str]] = {}
    for line in lines:
        for script, rest in re.findall(r"(bench/\w+\.py)(.*)", line):
            flags = set(FLAG.findall(rest))
            for name in re.findall(r"\$\{(\w+)\[@\]", rest):
                flags |= arrays.get(name, set())
            calls.setdefault(script, set()).update(flags)
    return calls


def test_gpu_sh_calls_scripts_that_take_its_flags(capsys):
    """Each script's --help (its main, in this process: no subprocess needed to read a parser) lists every flag."""
    import importlib

    calls = gpu_sh_calls()
    assert set(calls) == {"bench/retrain_throughput.py", "bench/inference_speed.py", "bench/quality.py",
                          "bench/prepare_wikitext2.py"}
    assert {"--text", "--tokenizer", "--device"} <= calls["bench/retrain_throughput.py"]  # from the arrays too
    for script, flags in sorted(calls.items()):
        assert (ROOT / script).is_file(), script
        with pytest.raises(SystemExit) as e:
            importlib.import_module(script.removesuffix(".py").replace("/", ".")).main(["--help"])
        assert e.value.code == 0
        taken = set(FLAG.findall(capsys.readouterr().out))
        assert flags and flags <= taken, (script, sorted(flags - taken))


def test_topk_heal_compares_each_k_with_the_full_kd(tiny_llama, tiny_corpus, tmp_path):
    """bench/topk_heal.py: the live-teacher heal and a heal from the top-k cache for each K, on the same budget."""
    out = ok(run_script("bench/topk_heal.py", "--quick", "--teacher", tiny_llama, "--data-dir", tiny_corpus,
                        "--out", tmp_path))
    r = json.loads((tmp_path / "topk_heal.json").read_text())
    assert [x["k"] for x in r["rows"]] == ["full", 4, 8] and r["quick"]
    assert [x.get("bytes_per_token") for x in r["rows"]] == [None, 4 * 2 + 5 * 4, 8 * 2 + 9 * 4]
    assert all(x["perplexity"] > 1 and 0 <= x["agreement"] <= 1 and x["kl"] >= 0 for x in r["rows"])
    assert "| 8 | 52 |" in out and sorted(p.name for p in tmp_path.glob("cache/*/top*.npy")) == [
        "top4_t1_ids.npy", "top4_t1_logp.npy", "top8_t1_ids.npy", "top8_t1_logp.npy"]
    again = run_script("bench/topk_heal.py", "--quick", "--teacher", tiny_llama, "--data-dir", tiny_corpus,
                       "--out", tmp_path)
    assert "| 8 | 52 |" in ok(again) and "epoch 1/1" not in again.stderr  # the rows done are read back, not healed


def test_layer_times_says_what_each_teacher_layer_costs_and_what_each_student_saves_there(tiny_llama, tmp_path):
    """Two students of a tiny Llama: layer pairs merged (every second layer dropped), and layer 0 without attention."""
    from models import load_teacher
    from models.compress import clone_model, drop_every_second
    from utils.planning.sensitivity import compose_units, decoder_options, random_unit
    from utils.training.students import save_model

    teacher, _ = load_teacher(str(tiny_llama))
    n = len(teacher.layers)
    save_model(clone_model(drop_every_second(teacher)[0]), tmp_path / "half", {"teacher": str(tiny_llama)})
    bare = next(o for o in decoder_options(teacher.config, kinds=("no_attention",)) if o.name == "no attention")
    save_model(clone_model(compose_units(teacher, {0: random_unit(teacher, bare, 0)})), tmp_path / "bare",
               {"teacher": str(tiny_llama)})
    out = ok(run_script("bench/layer_times.py", "--quick", "--teacher", tiny_llama, "--models",
                        f"half={tmp_path / 'half'}", f"bare={tmp_path / 'bare'}", "--out", tmp_path / "lt"))
    r = json.loads((tmp_path / "lt" / "layer_times.json").read_text())
    t, half, bare_t = r["timed"]["teacher"], r["timed"]["half"], r["timed"]["bare"]
    assert len(t["layer_ms"]) == n and len(half["layer_ms"]) == n // 2 and r["seq"] == 16
    assert t["whole_ms"] >= sum(t["layer_ms"]) and all(ms > 0 for ms in t["layer_ms"])
    merged = r["students"]["half"]["saved_ms"]  # pair (0, 1) is half's layer 0: saved at 0, nothing more at 1
    assert merged[0] == pytest.approx(t["layer_ms"][0] + t["layer_ms"][1] - half["layer_ms"][0]) and merged[1] is None
    saved = r["students"]["bare"]["saved_ms"]
    assert saved == pytest.approx([a - b for a, b in zip(t["layer_ms"], bare_t["layer_ms"])])
    assert bare_t["layers"][0].startswith("attention none") and bare_t["layers"][1].startswith("gqa ")
    c = r["students"]["bare"]
    assert c["saved_total_ms"] == pytest.approx(sum(saved))
    assert c["speedup_from_layers"] == pytest.approx(t["whole_ms"] / (t["whole_ms"] - sum(saved)))
    assert c["speedup"] == pytest.approx(t["whole_ms"] / bare_t["whole_ms"])
    md = (tmp_path / "lt" / "layer_times.md").read_text()
    assert "| half |" in md and "(merged above)" in md and "(attention none, ffn" in md and "| bare |" in md
    if hasattr(os, "getloadavg"):
        assert r["load"]["cpus"] >= 1 and "load average" in md.splitlines()[0]
    assert "results written to" in out


@pytest.mark.parametrize("spec, message", [("half", "--models takes NAME=DIR"), ("teacher=x", "names the teacher")])
def test_layer_times_refuses_a_bad_model_spec_in_one_line(tiny_llama, tmp_path, spec, message):
    res = run_script("bench/layer_times.py", "--quick", "--teacher", tiny_llama, "--models", spec,
                     "--out", tmp_path / "lt")
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
