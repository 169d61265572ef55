"""Issue 6: training and evaluation survive faults and bad input, lose nothing, and say what went wrong.

One test (or a small group) per behaviour of the issue, numbered as there. Scripts run in subprocesses on the tiny
teacher and corpus of conftest.py; the training loop's failure paths run in-process on a toy task.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import (ROOT, STEPS, Toy, all_finite, assert_clean_failure, data_args, flip_byte, in_process, last_line,
                     make_hf_teacher, restored_logging, run_parallel, run_script, script_cmd, script_env, tensors_equal,
                     toy_batches, toy_trainer)
from utils.cli.run import flags_in_errors
from utils.storage.checkpoint import (CheckpointError, has_checkpoint, load_checkpoint, read_meta, remove_checkpoint,
                                      save_checkpoint)
from utils.training.loop import TrainingDiverged


# ---------------------------------------------------------------------------------------------------------------
# 1. kill -9 mid-epoch, rerun with --resume: bitwise the weights of an uninterrupted run
@pytest.mark.slow
def test_1_kill9_mid_epoch_then_resume_matches_uninterrupted_run(tiny_teacher, tmp_path):
    from helpers import write_corpus

    # 1200 sentences at batch 8: 150 steps an epoch, long enough to be killed in the middle of one; a resume point
    # every 7 steps
    corpus = write_corpus(tmp_path / "corpus", n_train=1200)
    args = ["retrain_single_block.py", "--block", "0", *data_args(tiny_teacher, corpus), "--epochs", "3",
            "--batch-size", "8", "--seed", "3", "--lr", "1e-3", "--run-name", "run", "--save-every-steps", "7"]
    killed = tmp_path / "killed"
    log_path = tmp_path / "killed.log"
    position = None
    with open(log_path, "w") as log_f:
        proc = subprocess.Popen(script_cmd(*args, "--out", killed), cwd=ROOT, env=script_env(), stdout=log_f,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    position = json.loads((killed / "run" / "block_0" / "resume" / "meta.json").read_text())["position"]
                except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, KeyError):
                    position = None  # not written yet, or being swapped in
                if position and position["epoch"] >= 1 and position["step"] > 0:
                    break  # in the middle of epoch 2, past a mid-epoch resume point
                time.sleep(0.01)
            assert proc.poll() is None, "the run ended before it could be killed: " + log_path.read_text()[-2000:]
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert "results written" not in log_path.read_text()
    ref = run_script(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    resumed = run_script(*args, "--out", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m = re.search(r"resumed from .*: epoch (\d+) done, continuing at epoch (\d+) after step (\d+)", resumed.stderr)
    assert m and int(m[1]) >= 1 and int(m[3]) > 0, resumed.stderr[-3000:]  # mid-epoch
    assert "epoch 1/3  train loss" not in resumed.stderr  # completed epochs are not trained again
    assert last_line(resumed.stdout) == f"results written to {killed / 'run'}"

    for which in ("last", "best"):
        a = killed / "run" / "block_0" / which / "model.safetensors"
        b = tmp_path / "ref" / "run" / "block_0" / which / "model.safetensors"
        assert a.read_bytes() == b.read_bytes(), f"{which}: resumed weights differ from the uninterrupted run"
    sd_a, meta_a, _ = load_checkpoint(killed / "run" / "block_0" / "last")
    sd_b, meta_b, _ = load_checkpoint(tmp_path / "ref" / "run" / "block_0" / "last")
    assert tensors_equal(sd_a, sd_b) and meta_a["epoch"] == meta_b["epoch"] == 3


# ---------------------------------------------------------------------------------------------------------------
# 2. atomic checkpoint writes
class Killed(BaseException):
    """Stands for the process dying at that instant: nothing after it runs, no handler catches it."""


BLOCK_META = {"kind": "block", "layer": 0, "num_heads": 1, "head_dim": 4, "hidden_size": 4,
              "teacher_hash": "teacher-a"}
POSITION = {"epoch": 1, "step": 0, "global_step": 4}
RESUME_META = {"kind": "resume", "unit": "u", "unit_meta": BLOCK_META, "run_id": "r1", "setup": {},
               "position": POSITION, "epoch": 1}
TRAIN_STATE = {"position": POSITION, "optimizer": {}, "scheduler": {}, "best": float("inf"), "rng": {}, "run_id": "r1",
               "unit": "u", "weights_hash": "0"}


def _ckpt(tmp_path: Path, value: float) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = {"w": torch.full((64, 64), value), "b": torch.arange(5.0) * value}
    return save_checkpoint(tmp_path / "ck", sd, BLOCK_META), sd


def test_2_crash_while_writing_weights_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import utils.storage.checkpoint

    path, old = _ckpt(tmp_path, 1.0)

    def half_then_fail(filename, data):
        Path(filename).write_bytes(data[: len(data) // 2])  # leave half a file behind, as a crash mid-write would
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(utils.storage.checkpoint, "_write_file", half_then_fail)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*ck.*previous checkpoint"):
        save_checkpoint(path, {"w": torch.zeros(64, 64), "b": torch.zeros(5)}, BLOCK_META)
    monkeypatch.undo()
    sd, meta, _ = load_checkpoint(path)
    assert tensors_equal(sd, old) and meta["layer"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no half-written folder left behind


@pytest.mark.parametrize("crash", [Killed, OSError])
def test_2_crash_between_the_renames_falls_back_to_prev(tmp_path, monkeypatch, crash):
    path, old = _ckpt(tmp_path, 1.0)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp." in Path(src).name:  # final -> prev went through; tmp -> final is where we die
            raise crash("died between the renames")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(CheckpointError if crash is OSError else Killed):
            save_checkpoint(path, {"w": torch.zeros(64, 64), "b": torch.zeros(5)}, BLOCK_META)
    if crash is Killed:
        assert not path.exists() and len(list(tmp_path.glob("ck.prev.*/meta.json"))) == 1  # mid-swap state on disk
    assert has_checkpoint(path)  # what resume and discovery ask before they read
    sd, _, _ = load_checkpoint(path)  # the previous checkpoint, via .prev where the swap was cut short
    assert tensors_equal(sd, old)
    if crash is Killed:  # the half-done temporary folder names its writer; as a killed process's, it is dead
        (left,) = tmp_path.glob("ck.tmp.*")
        host = left.name.split(".tmp.", 1)[1].rsplit(".", 2)[0]
        left.rename(tmp_path / f"ck.tmp.{host}.{2**22 + 12345}.0badf00d")
    # the next save recovers the folder layout
    _, new = _ckpt(tmp_path, 3.0)
    sd, _, _ = load_checkpoint(path)
    assert tensors_equal(sd, new) and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    (tmp_path / "ck.prev.left").mkdir()  # as a later save cut short would leave it
    remove_checkpoint(path)
    assert not has_checkpoint(path) and sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# 3. truncated or corrupted checkpoint -> an error naming the file and the problem, never random weights
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _drop_sha(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    del meta["weights_sha256"]
    (d / "meta.json").write_text(json.dumps(meta))


CORRUPTIONS = {
    "truncated": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors", "corrupted or truncated"),
    "flipped-bytes": (lambda d: flip_byte(d / "model.safetensors"), "model.safetensors", "corrupted or truncated"),
    # without its checksum nothing vouches for the weights: refused (issue 12), whatever state they are in
    "truncated-no-checksum": (lambda d: (_drop_sha(d), _truncate(d / "model.safetensors")), "meta.json",
                              "required field 'weights_sha256' is missing"),
    "broken-meta": (lambda d: (d / "meta.json").write_text('{"kind": "block", "lay'), "meta.json",
                    "not valid JSON"),
    "meta-not-utf8": (lambda d: (d / "meta.json").write_bytes(b"\xff\xfe{}"), "meta.json", "not valid JSON"),
    "weights-missing": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors", "missing"),
    "train-state-truncated": (lambda d: _truncate(d / "train_state.pt"), "train_state.pt", "sha256 does not match"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_3_corrupted_checkpoint_is_refused_naming_file(tmp_path, kind):
    corrupt, fname, problem = CORRUPTIONS[kind]
    d = save_checkpoint(tmp_path / "ck", {"w": torch.randn(32, 32)}, RESUME_META, train_state=TRAIN_STATE)
    corrupt(d)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, with_train_state=True)
    assert str(d / fname) in str(e.value) and problem in str(e.value), str(e.value)


def test_3_library_loaders_refuse_a_corrupted_model(tiny_teacher, tmp_path):
    from models import load_teacher, weights_hash
    from utils.training.students import load_model, save_model

    teacher, _ = load_teacher(tiny_teacher)
    d = save_model(teacher, tmp_path / "model", {"teacher": str(tiny_teacher), "teacher_hash": weights_hash(teacher)})
    load_model(d, weights_hash(teacher))  # intact: loads
    flip_byte(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors' is corrupted or truncated"):
        load_model(d, weights_hash(teacher))


@pytest.mark.slow
def test_3_eval_script_exits_1_naming_the_truncated_file(tiny_teacher, tiny_corpus, tmp_path):
    from models import load_teacher, weights_hash
    from utils.training.students import save_model

    teacher, _ = load_teacher(tiny_teacher)
    bad = save_model(teacher, tmp_path / "BAD", {"teacher": str(tiny_teacher), "teacher_hash": weights_hash(teacher)})
    _truncate(bad / "model.safetensors")
    out = tmp_path / "eval_out"
    r = run_script("eval_merged_12.py", "--model", bad, *data_args(tiny_teacher, tiny_corpus), "--out", out)
    assert_clean_failure(r, 1, str(bad / "model.safetensors"), "corrupted or truncated")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. a checkpoint for another shape, block or teacher -> an error naming the mismatch; --force: teacher only
@pytest.fixture()
def block_ckpt(tiny_teacher, tmp_path):
    from models import BertAttention, load_teacher, weights_hash

    teacher, _ = load_teacher(tiny_teacher)
    cfg = teacher.config

    def make(name="blk", **meta):
        attn = BertAttention(cfg, 2, 8)
        full = {"kind": "block", "layer": 0, "num_heads": 2, "head_dim": 8, "hidden_size": cfg.hidden_size,
                "teacher": str(tiny_teacher), "teacher_hash": weights_hash(teacher), **meta}
        return save_checkpoint(tmp_path / name, attn.state_dict(), full)
    return make, cfg, weights_hash(teacher)


def test_4_block_checkpoint_mismatches_are_named(block_ckpt):
    from utils.training.students import load_block, load_merged_layer

    make, cfg, th = block_ckpt
    assert load_block(make("ok"), cfg, th)[0] == 0
    # another teacher: refused, with a hint; --force accepts it
    other = make("other_teacher", teacher_hash="0123456789abcdef")
    with pytest.raises(CheckpointError, match=r"teacher_hash: checkpoint has '0123456789abcdef'.*--force"), \
            flags_in_errors():
        load_block(other, cfg, th)
    assert load_block(other, cfg, th, force=True)[0] == 0
    # another shape: refused even with --force
    wide = make("other_shape", hidden_size=48)
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint has 48, expected 32"):
        load_block(wide, cfg, th, force=True)
    # weights of another shape than the metadata says
    lying = make("lying", num_heads=4)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_block(lying, cfg, th, force=True)
    # another block: a layer this teacher does not have; a block where a merged layer is expected
    with pytest.raises(CheckpointError, match="is for layer 5, the teacher has 2"):
        load_block(make("layer5", layer=5), cfg, th, force=True)
    with pytest.raises(CheckpointError, match="kind: checkpoint has 'block', expected 'merged_layer'"):
        load_merged_layer(make("as_merge"), cfg, th, force=True)


def test_4_resume_checks_units_teacher_and_shape(tmp_path):
    run = tmp_path / "run"
    trainer, _ = toy_trainer(run, epochs=1)
    trainer.fit(toy_batches())
    # another unit's resume point copied into this unit's folder
    import shutil

    shutil.copytree(run / "toy" / "resume", run / "other_block" / "resume")
    t, _ = toy_trainer(run, epochs=2, name="other_block", resume=True)
    with pytest.raises(CheckpointError, match=r"is the resume point of unit 'toy', not of 'other_block'"):
        t.fit(toy_batches())
    # another teacher: refused, unless forced
    t, _ = toy_trainer(run, epochs=2, resume=True, teacher_hash="teacher-b")
    with pytest.raises(CheckpointError,
                       match=r"teacher_hash: checkpoint has 'teacher-a', expected 'teacher-b'.*--force"), \
            flags_in_errors():
        t.fit(toy_batches())
    # another shape: refused even when forced
    t, _ = toy_trainer(run, epochs=2, resume=True, force=True, num_heads=2)
    with pytest.raises(CheckpointError, match="num_heads: checkpoint has 1, expected 2"):
        t.fit(toy_batches())
    t, task = toy_trainer(run, epochs=2, resume=True, force=True, teacher_hash="teacher-b")
    t.fit(toy_batches())
    assert t.start_epoch == 1 and task.calls == STEPS  # resumed: only epoch 2 was trained


def test_4_assemble_refuses_another_teacher_unless_forced(block_ckpt, tmp_path, capsys):
    from utils.assemble import main as assemble  # what `python -m utils.assemble` passes to sys.exit

    make, _, _ = block_ckpt
    ckpt = make("blk")
    other = make_hf_teacher(tmp_path / "other_teacher", seed=1)  # same shape, other weights
    with restored_logging():
        assert assemble(["--teacher", str(other), "--blocks", str(ckpt), "--out", str(tmp_path / "a1")]) == 1
    err = capsys.readouterr().err
    assert f"error: checkpoint '{ckpt}' does not fit: teacher_hash" in err and "--force" in err, err
    assert not (tmp_path / "a1").exists()
    with restored_logging():
        assert assemble(["--teacher", str(other), "--blocks", str(ckpt), "--out", str(tmp_path / "a2"),
                         "--force"]) == 0
    assert last_line(capsys.readouterr().out) == f"results written to {tmp_path / 'a2'}"


# ---------------------------------------------------------------------------------------------------------------
# 5. NaN / inf -> stop naming the step, keep the last good checkpoint, exit non-zero
def test_5_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    trainer, task = toy_trainer(tmp_path / "run", Toy(nan_loss_at=STEPS + 2), epochs=3)
    with pytest.raises(TrainingDiverged, match=rf"loss became nan at epoch 2, step 2 \(global step {STEPS + 2}\)"):
        trainer.fit(toy_batches())
    assert task.calls == STEPS + 2
    sd, meta, _ = load_checkpoint(tmp_path / "run" / "toy" / "last")
    assert meta["epoch"] == 1 and all_finite(sd)
    assert read_meta(tmp_path / "run" / "toy" / "resume")["epoch"] == 1


def test_5_nan_weights_after_a_finite_last_step_are_never_saved(tmp_path):
    # the last step of epoch 2 has a finite loss but NaN gradients: the weights saved after epoch 1 must stay
    trainer, task = toy_trainer(tmp_path / "run", Toy(nan_grad_at=2 * STEPS), epochs=3)
    with pytest.raises(TrainingDiverged, match="non-finite in epoch 2"):
        trainer.fit(toy_batches())
    for which in ("last", "best", "resume"):
        d = tmp_path / "run" / "toy" / which
        sd, meta, _ = load_checkpoint(d)
        assert meta["epoch"] == 1 and all_finite(sd), which


@pytest.mark.slow
def test_5_script_with_exploding_lr_exits_1_naming_the_step(tiny_teacher, tiny_corpus, tmp_path):
    cases = {"1e30": "loss became nan at epoch 1, step 2", "1e38": "the optimizer step overflowed at epoch 1, step 1"}
    runs = run_parallel([("retrain_single_block.py", ["--block", "0", *data_args(tiny_teacher, tiny_corpus),
                                                      "--epochs", "2", "--batch-size", "16", "--lr", lr,
                                                      "--out", tmp_path / lr]) for lr in cases])
    for r, message in zip(runs, cases.values()):
        assert_clean_failure(r, 1, message, "last good checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# 6. output not writable / disk full
@pytest.mark.slow
def test_6_unwritable_output_fails_before_training(tiny_teacher, tiny_corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = run_script("retrain_single_block.py", "--block", "0", *data_args(tiny_teacher, tiny_corpus),
                   "--out", blocker / "out")
    assert_clean_failure(r, 1, "is not writable", str(blocker / "out"))
    assert "epoch 1/" not in r.stderr and "sentences" not in r.stderr  # failed before reading data or training


def test_6_disk_full_at_probe_fails_before_any_step(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match="is not writable: No space left on device"):
        toy_trainer(tmp_path / "run")


@pytest.mark.parametrize("where", ["weights", "train_state"])
def test_6_disk_full_at_save_keeps_last_good_checkpoint(tmp_path, monkeypatch, where):
    import safetensors.torch
    from safetensors import SafetensorError

    calls = {"n": 0}
    real = safetensors.torch.save if where == "weights" else torch.save
    fail_at = 4 if where == "weights" else 2  # epoch 2's first weights file / epoch 2's training state

    def save(*a, **kw):
        calls["n"] += 1
        if calls["n"] >= fail_at:  # what each library raises on a full disk
            if where == "weights":
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real(*a, **kw)

    if where == "weights":
        monkeypatch.setattr(safetensors.torch, "save", save)
    else:
        monkeypatch.setattr(torch, "save", save)
    trainer, _ = toy_trainer(tmp_path / "run", epochs=3)
    failing = tmp_path / "run" / "toy" / ("last" if where == "weights" else "resume")
    with pytest.raises(CheckpointError, match="could not write checkpoint") as e:
        trainer.fit(toy_batches())
    assert str(failing) in str(e.value)
    assert ("No space left on device" if where == "weights" else "file write failed") in str(e.value)
    monkeypatch.undo()
    sd, meta, state = load_checkpoint(tmp_path / "run" / "toy" / "resume", with_train_state=True)
    assert meta["epoch"] == 1 and state["position"]["epoch"] == 1
    sd, meta, _ = load_checkpoint(tmp_path / "run" / "toy" / "last")
    assert meta["epoch"] == (1 if where == "weights" else 2) and all_finite(sd)
    assert not list((tmp_path / "run").rglob("*.tmp.*"))


# ---------------------------------------------------------------------------------------------------------------
# 7. bad CLI values -> argparse errors, exit code 2, nothing written
BAD_BLOCK_ARGS = {
    "block-outside-model": (["--block", "5"], "--block 5 is out of range"),
    "block-negative": (["--block", "-1"], "--block"),
    "heads-zero": (["--block", "0", "--heads", "0"], "--block-heads must be > 0"),
    "heads-negative": (["--block", "0", "--block_heads", "-2"], "--block-heads must be > 0"),
    "head-dim-zero": (["--block", "0", "--head-dim", "0"], "--block-d-k must be > 0"),
    "percentage-zero": (["--block", "0", "--percentage_data", "0"], "must be in (0, 1]"),
    "percentage-over-one": (["--block", "0", "--percentage-data", "1.5"], "must be in (0, 1]"),
    "batch-size-zero": (["--block", "0", "--batch-size", "0"], "--batch-size must be > 0"),
    "unknown-criterion": (["--block", "0", "--criterion", "hinge"], "unknown criterion 'hinge'"),
    "infinite-lr": (["--block", "0", "--lr", "inf"], "must be a finite number > 0"),
    "criterion-not-for-scores": (["--block", "0", "--loss_on_scores", "--criterion", "cosine"], "does not apply"),
}


@pytest.mark.parametrize("case", list(BAD_BLOCK_ARGS))
def test_7_bad_cli_values_exit_2_and_write_nothing(tiny_teacher, tiny_corpus, tmp_path, capsys, case):
    argv, message = BAD_BLOCK_ARGS[case]
    out = tmp_path / "out"
    code, err = in_process("retrain_single_block",
                            [*argv, *map(str, data_args(tiny_teacher, tiny_corpus)), "--out", str(out)], capsys)
    assert code == 2 and "error:" in err and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("module, argv, message", [
    ("retrain_merge", ["--block", "1"], "layer 2 does not exist"),
    ("retrain_merge", ["--block", "0", "--head-dim", "0"], "--block-d-k must be > 0"),
    ("retrain_merge", ["--block", "0", "--criterion", "KL"], "--criterion for a merged layer must be one of"),
    ("eval_merged_12", ["--percentage-data", "-0.5"], "must be in (0, 1]"),
    ("finetune_merged", ["--batch-size", "-1"], "--batch-size must be > 0"),
])
def test_7_bad_cli_values_other_scripts(tiny_teacher, tiny_corpus, tmp_path, capsys, module, argv, message):
    out = tmp_path / "out"
    code, err = in_process(module, [*argv, *map(str, data_args(tiny_teacher, tiny_corpus)), "--out", str(out)],
                            capsys)
    assert code == 2 and message in err, err
    assert not out.exists()


@pytest.mark.slow
def test_7_bad_cli_exit_code_2_from_the_processes(tiny_teacher, tiny_corpus, tmp_path):
    jobs = [("retrain_merge.py", ["--block", "1", *data_args(tiny_teacher, tiny_corpus), "--out", tmp_path / "m"]),
            ("retrain_single_block.py", ["--block", "7", *data_args(tiny_teacher, tiny_corpus),
                                         "--out", tmp_path / "b"])]
    for r, message in zip(run_parallel(jobs), ["no pair to merge", "out of range"]):
        assert_clean_failure(r, 2, message)
    assert not (tmp_path / "m").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------------------------
# 8. data problems: clear errors or counted skips, never a traceback
def test_8_data_files_library(tiny_teacher, tmp_path, caplog):
    from transformers import AutoTokenizer

    from utils.data.batches import TokenizedSentences
    from utils.data.text import DataConfig, DataError, load_sentences, read_text_file

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=f"'{empty}' is empty"):
        read_text_file(empty)
    headings = tmp_path / "headings.txt"
    headings.write_text(" = Title = \n\n = = Section = = \n = = = Sub = = = \n")
    with pytest.raises(DataError, match=f"'{headings}' has no usable sentence"):
        read_text_file(headings)
    # non-UTF-8 bytes: replaced, counted exactly (2 stray bytes + a cut 2-byte prefix of a 3-byte character)
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"the red cat sees the dog .\nthe \xff\xfe old king likes \xe2\x82 the ship .\n")
    with caplog.at_level(logging.WARNING):
        sents = read_text_file(mixed)
    assert len(sents) == 2 and "\ufffd" in sents[1]
    assert "4 bytes were not valid UTF-8" in caplog.text and str(mixed) in caplog.text
    # a missing split
    d = tmp_path / "two_splits"
    d.mkdir()
    (d / "train.txt").write_text("the cat sees the dog .\n")
    (d / "test.txt").write_text("the cat sees the dog .\n")
    with pytest.raises(DataError, match=r"split 'valid' is missing: expected '.*valid.txt' \(found train.txt"):
        load_sentences(DataConfig(data_dir=str(d)), "valid")
    # lines longer than seq_len: cut to seq_len keeping [CLS] ... [SEP], and counted; an exact fit is not counted
    tok = AutoTokenizer.from_pretrained(str(tiny_teacher))
    exact = "the cat sees the dog ."  # 6 tokens + [CLS] [SEP] = 8
    longer = "the cat sees the dog near the red bird ."
    huge = " ".join(["the cat"] * 20000) + " ."
    ds = TokenizedSentences([exact, longer, huge], tok, seq_len=8)
    assert len(ds) == 3 and ds.truncated == 2 and ds.skipped == 0
    assert all(len(ids) <= 8 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id for ids in ds.ids)
    assert len(ds.ids[0]) == 8 and len(ds.ids[1]) == 8


def _corpus_variant(src: Path, dst: Path, **replace: bytes | None) -> Path:
    dst.mkdir()
    for name in ("train", "valid", "test"):
        content = replace.get(name, (src / f"{name}.txt").read_bytes())
        if content is not None:
            (dst / f"{name}.txt").write_bytes(content)
    return dst


@pytest.mark.slow
def test_8_scripts_report_data_errors_cleanly(tiny_teacher, tiny_corpus, tmp_path, capsys):
    empty = _corpus_variant(tiny_corpus, tmp_path / "empty", train=b"")
    headings = _corpus_variant(tiny_corpus, tmp_path / "headings", valid=b" = A = \n = = B = = \n")
    missing = _corpus_variant(tiny_corpus, tmp_path / "missing", valid=None)
    base = ["--block", "0", "--teacher", str(tiny_teacher), "--device", "cpu", "--epochs", "1"]
    r = run_script("retrain_single_block.py", *base, "--data-dir", empty, "--out", tmp_path / "out_empty")
    assert_clean_failure(r, 1, f"text file '{empty / 'train.txt'}' is empty")
    for d, message in ((headings, f"'{headings / 'valid.txt'}' has no usable sentence"),
                       (missing, f"split 'valid' is missing: expected '{missing / 'valid.txt'}'")):
        code, err = in_process("retrain_single_block", [*base, "--data-dir", str(d), "--out", str(tmp_path / d.name)],
                                capsys)
        assert code == 1 and last_line(err).startswith("error: ") and message in err, err
        assert "epoch 1/" not in err


# ---------------------------------------------------------------------------------------------------------------
# 9. loading never executes pickled code
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_9_checkpoint_loading_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "PWNED"
    d = save_checkpoint(tmp_path / "run" / "toy" / "resume", {"weight": torch.zeros(1, 4), "bias": torch.zeros(1)},
                        {"kind": "resume", "unit": "toy", "unit_meta": BLOCK_META, "epoch": 1, "run_id": "r1",
                         "setup": {}, "position": {"epoch": 1, "step": 0, "global_step": STEPS}},
                        train_state={"epoch": 0, "optimizer": _Payload(marker)})
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="train_state.pt' cannot be read"):
        load_checkpoint(d, with_train_state=True)
    assert not marker.exists()
    # the training loop's --resume goes through the same loader
    trainer, _ = toy_trainer(tmp_path / "run", epochs=2, resume=True)
    with pytest.raises(CheckpointError, match="train_state.pt"):
        trainer.fit(toy_batches())
    assert not marker.exists()
    # the file really is an exploit: a pickle-trusting loader would have run it
    torch.load(d / "train_state.pt", weights_only=False)
    assert marker.read_text() == "pwned"


# ---------------------------------------------------------------------------------------------------------------
# 10. every script: exit 0 and 'results written to ...' last, non-zero on failure
@pytest.mark.slow
def test_10_every_script_reports_where_results_went(tiny_teacher, tiny_corpus, tmp_path):
    out = tmp_path / "ck"
    common = [*data_args(tiny_teacher, tiny_corpus), "--batch-size", "16"]
    steps = [
        ("retrain_single_block.py", ["--block", "0", *common, "--epochs", "1", "--out", out, "--run-name", "blocks"],
         out / "blocks"),
        ("retrain_merge.py", ["--block", "0", *common, "--epochs", "1", "--out", out, "--run-name", "merge"],
         out / "merge"),
        ("utils.assemble", ["--teacher", tiny_teacher, "--blocks", out / "blocks", "--out", out / "assembled"],
         out / "assembled"),
        ("eval_merged_12.py", ["--model", out / "assembled", *common, "--out", out / "eval12"], out / "eval12"),
        ("eval_merge_layer.py", ["--checkpoint", out / "merge" / "merge_0" / "best", *common, "--out",
                                 out / "eval_merge"], out / "eval_merge"),
        ("finetune_merged.py", ["--merged", out / "merge", *common, "--epochs", "1", "--eval-batches", "1",
                                "--out", out, "--run-name", "ft"], out / "ft"),
    ]
    for script, args, where in steps:
        r = run_script(script, *args)
        assert r.returncode == 0, (script, r.stderr[-3000:])
        assert last_line(r.stdout) == f"results written to {where}", (script, r.stdout[-1000:])
        assert where.is_dir() and any(where.iterdir()), script

    nowhere = tmp_path / "does_not_exist"
    failing = [
        ("retrain_single_block.py", ["--block", "0", *data_args(tiny_teacher, nowhere), "--out", tmp_path / "f1"]),
        ("retrain_merge.py", ["--block", "0", *data_args(tiny_teacher, nowhere), "--out", tmp_path / "f2"]),
        ("utils.assemble", ["--teacher", tiny_teacher, "--blocks", nowhere, "--out", tmp_path / "f3"]),
        ("eval_merged_12.py", ["--model", nowhere, *common, "--out", tmp_path / "f4"]),
        ("eval_merge_layer.py", ["--checkpoint", nowhere, *common, "--out", tmp_path / "f5"]),
        ("finetune_merged.py", ["--merged", nowhere, *common, "--out", tmp_path / "f6"]),
    ]
    for (script, _), r in zip(failing, run_parallel(failing)):
        assert r.returncode != 0, script
        assert_clean_failure(r, 1, str(nowhere))
