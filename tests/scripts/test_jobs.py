"""Issue 10: one job per unit, many at once, on a cluster that can stop them.

Runs never collide (each unit owns its folder, under a lock), readers never see a mix of two saves, a shared teacher
cache is built once and checked, a stop (SIGTERM / SIGUSR1 / SIGINT) saves a mid-epoch resume point, and resuming
gives bitwise the weights of an uninterrupted run; a resume with another setup, or another run's state, is refused.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, make_hf_teacher, write_corpus
from utils.cli.run import run_main
from utils.storage.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cmd(*args) -> list[str]:
    return [sys.executable, str(ROOT / "retrain_single_block.py"), *map(str, args)]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(d)[0]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _in_process(argv: list[str], after_step=None, monkeypatch=None) -> int:
    """retrain_single_block's main through run_main, in this process; ``after_step`` is injected into the loop."""
    import retrain_single_block
    from utils.training import loop as train

    if after_step is not None:
        init = train.Trainer.__init__

        def patched(self, *a, **kw):
            init(self, *a, **kw)
            self.after_step = after_step

        monkeypatch.setattr(train.Trainer, "__init__", patched)
    parser = retrain_single_block.build_parser()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:  # run_main points logging at the stderr of the moment (captured): undo that afterwards
        return run_main(lambda a: retrain_single_block.main(a, parser), parser, [str(a) for a in argv])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        if after_step is not None:
            monkeypatch.undo()


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("jobs")
    return make_hf_teacher(root / "teacher", layers=4), write_corpus(root / "corpus", n_train=96, n_valid=24)


def _block_args(teacher: Path, corpus: Path, *extra) -> list:
    return ["--teacher", teacher, "--data-dir", corpus, "--device", "cpu", "--heads", "2", "--epochs", "2",
            "--batch-size", "16", "--seed", "5", *extra]


# ---------------------------------------------------------------------------------------------------------------
def _four_jobs_then_alone(args, out: Path, tmp_path: Path, run_name: str) -> Path:
    """Blocks 0-3 as four jobs started at once into one ``out`` (sharing the derived run folder and the teacher
    cache), then each block trained alone in this process: bit for bit the same, best and last. ``args(*extra)``:
    the command line of a job. Returns the shared run folder."""
    common = args("--out", out, "--cache-teacher", "--cache-dir", tmp_path / "cache")
    procs = [subprocess.Popen(_cmd("--block", b, *common), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for b in range(4)]
    for p, (so, se) in zip(procs, [p.communicate(timeout=300) for p in procs]):
        assert p.returncode == 0, se[-3000:]
    run = out / run_name
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [f"block_{i}" for i in range(4)]
    for b in range(4):
        alone_args = args("--out", tmp_path / f"alone_{b}", "--cache-teacher", "--cache-dir", tmp_path / "cache_alone")
        assert _in_process(["--block", b, *alone_args]) == 0
        alone = tmp_path / f"alone_{b}" / run_name / f"block_{b}"
        for which in ("best", "last"):
            assert _equal(_weights(run / f"block_{b}" / which), _weights(alone / which)), (b, which)
    return run


def _run_notebook(monkeypatch, **env: str) -> str:
    """The assembling notebook, top to bottom, with its ST_* settings ``env``; returns what its cells printed."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(ROOT / "notebooks" / "build_bert_from_retrained_12.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_four_block_jobs_at_once_into_one_out(four_layers, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    teacher, corpus = four_layers
    out = tmp_path / "shared"
    run = _four_jobs_then_alone(lambda *extra: _block_args(teacher, corpus, *extra), out, tmp_path,
                                "blocks_h2_d8_output_mse")
    for b in range(4):  # each unit is whole: its own run record, resume point, log; no lock left behind
        unit = run / f"block_{b}"
        assert json.loads((unit / "run.json").read_text())["unit"] == f"block_{b}"
        assert (unit / "resume" / "meta.json").is_file() and any((unit / "tb").iterdir())
        assert not (unit / "lock").exists()
    # the notebook collects all four
    _run_notebook(monkeypatch, ST_TEACHER=str(teacher), ST_BLOCKS=str(out), ST_OUT=str(tmp_path / "assembled"),
                  ST_FILL_MASK="the small cat sees the [MASK] .")
    meta = json.loads((tmp_path / "assembled" / "meta.json").read_text())
    assert [spec["kind"] for spec in meta["config"]["layers"]] == ["block"] * 4
    assert len([s for s in meta["sources"] if s.startswith("block")]) == 4


@pytest.mark.slow
def test_four_decoder_block_jobs_at_once_into_one_out(tiny_llama, tiny_corpus, tmp_path, monkeypatch):
    """The decoder version: four multi-query blocks of the tiny Llama (6 query heads, 1 key/value head) as four
    jobs at once into one --out equal the same blocks trained alone; the notebook assembles and exports them."""
    pytest.importorskip("nbclient")

    def args(*extra) -> list:
        return ["--teacher", tiny_llama, "--data-dir", tiny_corpus, "--device", "cpu", "--kv-heads", "1",
                "--epochs", "2", "--batch-size", "16", "--seq-len", "32", "--seed", "5", *extra]

    out = tmp_path / "shared"
    _four_jobs_then_alone(args, out, tmp_path, "blocks_h6_d8_kv1_output_mse")
    text = _run_notebook(monkeypatch, ST_TEACHER=str(tiny_llama), ST_BLOCKS=str(out),
                         ST_OUT=str(tmp_path / "assembled"), ST_PROMPT="the small cat sees",
                         HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    meta = json.loads((tmp_path / "assembled" / "meta.json").read_text())
    assert [(spec["kind"], spec["num_kv_heads"]) for spec in meta["config"]["layers"]] == [("block", 1)] * 4
    assert "reloaded model gives identical outputs: True" in text
    assert "CompactLlamaForCausalLM" in text and "the same greedy tokens: True" in text


def test_second_job_for_a_running_unit_is_refused_and_a_stale_lock_taken_over(four_layers, tmp_path, capsys):
    from utils.storage.lock import UnitBusy, UnitLock

    teacher, corpus = four_layers
    unit = tmp_path / "out" / "blocks_h2_d8_output_mse" / "block_1"
    holder = UnitLock(unit, "block_1").acquire()  # a live job (this process) holds block 1
    try:
        code = _in_process(["--block", 1, *_block_args(teacher, corpus, "--out", tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 1 and f"pid {os.getpid()}" in err and str(unit / "lock") in err, err
        assert "epoch 1/" not in err and "teacher " not in err  # refused at start, before loading anything
        with pytest.raises(UnitBusy, match="being trained by another job"):
            UnitLock(unit, "block_1").acquire()
    finally:
        holder.release()
    # a lock left by a process that is gone: taken over with a warning, the job trains
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "2026-01-01T00:00:00",
            "token": "deadbeef"}
    (unit / "lock").write_text(json.dumps(info))
    code = _in_process(["--block", 1, *_block_args(teacher, corpus, "--out", tmp_path / "out", "--epochs", "1")])
    err = capsys.readouterr().err
    assert code == 0 and "took over a stale lock" in err and f"pid {info['pid']}" in err, err
    assert not (unit / "lock").exists() or json.loads((unit / "lock").read_text())["pid"] == os.getpid()


def test_readers_never_see_a_mix_while_a_writer_saves(tmp_path):
    d = tmp_path / "ck"
    meta = {"kind": "block", "layer": 0, "num_heads": 1, "head_dim": 4, "hidden_size": 4, "teacher_hash": "t"}
    save_checkpoint(d, {"w": torch.zeros(256, 256)}, {**meta, "version": 0})
    stop = threading.Event()

    def writer():
        v = 1
        while not stop.is_set():
            save_checkpoint(d, {"w": torch.full((256, 256), float(v))}, {**meta, "version": v})
            v += 1

    t = threading.Thread(target=writer)
    t.start()
    loads, failures = 0, []
    try:
        deadline = time.monotonic() + 60
        while loads < 300 and time.monotonic() < deadline:
            try:
                sd, meta, _ = load_checkpoint(d)
            except CheckpointError as e:
                failures.append(str(e))
                continue
            finally:
                loads += 1
            # the weights are the ones their metadata describes: every value equals the version number
            assert torch.all(sd["w"] == meta["version"]), (meta["version"], sd["w"].unique()[:5])
    finally:
        stop.set()
        t.join()
    assert loads >= 300 and not failures, failures[:3]


@pytest.mark.slow
def test_shared_cache_built_once_and_damaged_files_rebuilt(four_layers, tmp_path):
    teacher, corpus = four_layers
    cache = tmp_path / "cache"
    # two runs on overlapping blocks (0 and all) share one cache and start at the same moment
    jobs = [["--block", "0"], ["--block", "all"]]
    procs = [subprocess.Popen(_cmd(*j, *_block_args(teacher, corpus, "--out", tmp_path / f"o{i}", "--epochs", "1",
                                                    "--cache-teacher", "--cache-dir", cache)),
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, j in enumerate(jobs)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for e in errs]
    built = [line for e in errs for line in e.splitlines() if "teacher cache" in line and "; built " in line]
    names = [n.strip() for line in built for n in line.split("; built ", 1)[1].split(",")]
    assert sorted(names) == sorted(f"{k}_{i}" for i in range(4) for k in ("in", "block")), built  # each once
    (key,) = [p for p in cache.iterdir() if p.is_dir()]
    # a zeroed file and a truncated one: named, rebuilt, reported; the rerun trains as the first run did
    zeroed, cut = key / "in_0.npy", key / "block_0.npy"
    zeroed.write_bytes(bytes(zeroed.stat().st_size))
    cut.write_bytes(cut.read_bytes()[:-1000])
    r = subprocess.run(_cmd("--block", "0", *_block_args(teacher, corpus, "--out", tmp_path / "o2", "--epochs", "1",
                                                        "--cache-teacher", "--cache-dir", cache)),
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"'{zeroed}' is damaged (its sha256 differs" in r.stderr, r.stderr[-3000:]
    assert f"'{cut}' is damaged (" in r.stderr and "truncated" in r.stderr
    assert "; built block_0, in_0" in r.stderr or "; built in_0, block_0" in r.stderr
    first = _weights(tmp_path / "o0" / "blocks_h2_d8_output_mse" / "block_0" / "last")
    again = _weights(tmp_path / "o2" / "blocks_h2_d8_output_mse" / "block_0" / "last")
    assert _equal(first, again)
    assert np.load(zeroed).any()


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_epoch_then_resume_is_bitwise_the_uninterrupted_run(four_layers, tmp_path, capsys, monkeypatch,
                                                                        workers):
    teacher, corpus = four_layers
    args = ["--block", "all", *_block_args(teacher, corpus, "--epochs", "3", "--num-workers", workers,
                                           "--batch-size", "8")]
    assert _in_process([*args, "--out", tmp_path / "ref"]) == 0
    capsys.readouterr()

    def terminate_at_step_17(pos):  # 12 steps an epoch: the middle of epoch 2
        if pos.global_step == 17:
            os.kill(os.getpid(), signal.SIGTERM)

    assert _in_process([*args, "--out", tmp_path / "cut"], terminate_at_step_17, monkeypatch) == 143
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("stopped by SIGTERM at epoch 2, step 5 (global step 17); resume point saved to "), last
    meta = json.loads((tmp_path / "cut" / "blocks_h2_d8_output_mse" / "block_3" / "resume" / "meta.json").read_text())
    assert meta["position"] == {"epoch": 1, "step": 5, "global_step": 17}
    assert _in_process([*args, "--out", tmp_path / "cut", "--resume"]) == 0
    assert "continuing at epoch 2 after step 5" in capsys.readouterr().err
    for b in range(4):
        for which in ("best", "last"):
            ref = _weights(tmp_path / "ref" / "blocks_h2_d8_output_mse" / f"block_{b}" / which)
            got = _weights(tmp_path / "cut" / "blocks_h2_d8_output_mse" / f"block_{b}" / which)
            assert _equal(ref, got), (workers, b, which)


@pytest.mark.slow
def test_sigterm_from_outside_saves_and_exits_143(four_layers, tmp_path):
    teacher, corpus = four_layers
    corpus = write_corpus(tmp_path / "big", n_train=1500, n_valid=24)  # long enough to be stopped while training
    # a resume point every 5 steps: the first one proves that training has started (no guess at how long set-up takes)
    args = ["--block", "2", *_block_args(teacher, corpus, "--out", tmp_path / "o", "--epochs", "1", "--batch-size", "4",
                                         "--save-every-steps", "5")]
    p = subprocess.Popen(_cmd(*args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = tmp_path / "o" / "blocks_h2_d8_output_mse" / "block_2" / "run.json"
    first_step = record.parent / "resume" / "meta.json"
    deadline = time.monotonic() + 300
    while not first_step.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    so, se = p.communicate(timeout=120)
    assert p.returncode == 143, se[-3000:]
    lines = [line for line in se.splitlines() if line.strip()]
    assert lines[-1].startswith("stopped by SIGTERM at epoch 1, step "), lines[-3:]
    assert "Traceback" not in se and "results written" not in so
    pos = json.loads((record.parent / "resume" / "meta.json").read_text())["position"]
    assert pos["epoch"] == 0 and 0 < pos["step"] < 375


def test_resume_refuses_another_setup_or_a_foreign_train_state(four_layers, tmp_path, capsys):
    teacher, corpus = four_layers
    base = ["--block", "0", *_block_args(teacher, corpus, "--epochs", "1")]
    assert _in_process([*base, "--out", tmp_path / "a", "--run-name", "r"]) == 0
    for flag, value, field in (("--criterion", "L1", "criterion"), ("--lr", "0.05", "lr"), ("--seed", "9", "seed")):
        argv = [*base, "--out", tmp_path / "a", "--run-name", "r", "--epochs", "2", "--resume", flag, value]
        capsys.readouterr()
        assert _in_process(argv) == 1
        err = capsys.readouterr().err
        assert "the training setup differs" in err and f"{field}: resume point has" in err, err
        assert "--force-config" in err
    # more epochs is fine; --force-config accepts a change and logs it
    assert _in_process([*base, "--out", tmp_path / "a", "--run-name", "r", "--epochs", "2", "--resume",
                        "--lr", "0.05", "--force-config"]) == 0
    err = capsys.readouterr().err
    assert "--force-config: block_0: lr: resume point has 0.0005, this run has 0.05" in err, err
    state = load_checkpoint(tmp_path / "a" / "r" / "block_0" / "resume", with_train_state=True)[2]
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [0.05, 0.05]  # the new lr is used
    # a train_state.pt copied from another run of the same shape and setup
    for run in ("b", "c"):
        assert _in_process([*base, "--out", tmp_path / run, "--run-name", "r"]) == 0
    mine = tmp_path / "c" / "r" / "block_0" / "resume"
    other = tmp_path / "b" / "r" / "block_0" / "resume"
    (mine / "train_state.pt").write_bytes((other / "train_state.pt").read_bytes())
    capsys.readouterr()
    assert _in_process([*base, "--out", tmp_path / "c", "--run-name", "r", "--epochs", "3", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "train_state.pt" in err and "sha256 does not match" in err, err
    # ... even with its hash written into the metadata: the state names another run
    meta = json.loads((mine / "meta.json").read_text())
    meta["train_state_sha256"] = json.loads((other / "meta.json").read_text())["train_state_sha256"]
    (mine / "meta.json").write_text(json.dumps(meta))
    assert _in_process([*base, "--out", tmp_path / "c", "--run-name", "r", "--epochs", "3", "--resume"]) == 1
    assert "belongs to another run" in capsys.readouterr().err


def test_discovery_reads_a_checkpoint_caught_mid_swap_like_direct_loading(tiny_teacher, tmp_path):
    """A kill between the two renames of a save leaves only ``best.prev.*``: assemble uses it, as load does."""
    from models import BertAttention, load_teacher, weights_hash
    from utils.storage.checkpoint import find_checkpoints
    from utils.training.students import build_student

    teacher, _ = load_teacher(tiny_teacher)
    attn = BertAttention(teacher.config, 2, 8)
    meta = {"kind": "block", "layer": 1, "num_heads": 2, "head_dim": 8, "hidden_size": teacher.config.hidden_size,
            "teacher_hash": weights_hash(teacher), "teacher_heads": 4, "teacher_head_dim": 8}
    best = save_checkpoint(tmp_path / "run" / "block_1" / "best", attn.state_dict(), meta)
    best.rename(best.with_name(f"best.prev.{socket.gethostname()}.1.0badf00d"))
    direct = load_checkpoint(best)[0]
    (found,) = find_checkpoints([tmp_path / "run"], ["block"])
    assert found[0] == best and found[1]["layer"] == 1
    model, sources = build_student(teacher, [tmp_path / "run"], weights_hash(teacher))
    assert model.config.layers[1].kind == "block" and model.config.layers[1].num_heads == 2
    assert _equal(direct, {k: v for k, v in model.layers[1].attention.state_dict().items()})
