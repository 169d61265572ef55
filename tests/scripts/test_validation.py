"""Issue 12: bad input never gives a traceback or a silent wrong result; every input is validated at the door.

One test (or a small group) per bullet of the issue's "Why", numbered as there, then the metadata fuzz test.
Scripts run in-process through their own run_main (fast); one subprocess run per kind of failure shows what a user
sees. The tiny teacher of conftest.py has 64 position embeddings.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from helpers import (DATA_READ, ROOT, assert_clean_failure, data_args, flip_byte, in_process, last_line,
                     make_hf_teacher, restored_logging, run_script, script_env, toy_batches, toy_trainer)
from utils.storage.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def one_error_line(err: str, *needles: str) -> str:
    """stderr ends with exactly one 'error: ...' line, holds no traceback, and names everything in ``needles``."""
    assert "Traceback" not in err, err[-3000:]
    line = last_line(err)
    assert line.startswith("error: ") or ": error: " in line, err[-3000:]
    assert sum(l.startswith("error:") or ": error: " in l for l in err.splitlines()) == 1, err[-3000:]
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.fixture(scope="module")
def saved_model(tiny_teacher, tmp_path_factory):
    """An assembled-model checkpoint of the tiny teacher itself (what eval_merged_12 --model reads)."""
    from models import load_teacher, weights_hash
    from utils.training.students import save_model

    teacher, _ = load_teacher(tiny_teacher)
    return save_model(teacher, tmp_path_factory.mktemp("model") / "model",
                      {"teacher": str(tiny_teacher), "teacher_hash": weights_hash(teacher), "sources": []})


# ---------------------------------------------------------------------------------------------------------------
# 1. --seq-len longer than the teacher's position embeddings: refused at the door (exit 2), not mid-epoch
@pytest.mark.parametrize("module, extra", [("retrain_single_block", ["--block", "0"]),
                                           ("retrain_merge", ["--block", "0"]),
                                           ("eval_merged_12", []),
                                           ("finetune_merged", ["--drop-every-second"])])
def test_1_seq_len_beyond_position_embeddings_exits_2(tiny_teacher, tiny_corpus, saved_model, tmp_path, capsys,
                                                      module, extra):
    out = tmp_path / "out"
    argv = [*extra, *map(str, data_args(tiny_teacher, tiny_corpus)), "--seq-len", "200", "--out", str(out)]
    if module == "eval_merged_12":
        argv += ["--model", str(saved_model)]
    code, err = in_process(module, argv, capsys)
    assert code == 2, err[-3000:]
    one_error_line(err, "--seq-len 200", "max_position_embeddings is 64")
    assert "epoch 1/" not in err and not DATA_READ.search(err)  # refused before any data or training work
    assert not out.exists() or not any(out.rglob("*.safetensors"))


def test_1_judge_with_fewer_positions_exits_2(tiny_teacher, tiny_corpus, saved_model, tmp_path, capsys):
    judge = make_hf_teacher(tmp_path / "judge", max_position_embeddings=16)
    code, err = in_process("eval_merged_12", [*map(str, data_args(tiny_teacher, tiny_corpus)), "--model",
                                               str(saved_model), "--judge", str(judge), "--out", str(tmp_path / "o")],
                            capsys)
    assert code == 2 and "--judge" in one_error_line(err, "--seq-len 40", "max_position_embeddings is 16")


# ---------------------------------------------------------------------------------------------------------------
# 2. an incomplete or broken teacher folder: one line naming the file, exit 1
def _teacher_variant(src: Path, dst: Path, mutate) -> Path:
    shutil.copytree(src, dst)
    mutate(dst)
    return dst


def _truncate_weights(d: Path) -> None:
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])


def _garbage_bin(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(os.urandom(4096))


def _pickled_code_bin(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(print))  # not tensors: refused by weights_only loading


def _config_not_matching(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48  # the weights have 64
    (d / "config.json").write_text(json.dumps(cfg))


def _no_tokenizer(d: Path) -> None:
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)


def _config_not_json(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "bert", ')


TEACHER_FAULTS = {
    "truncated-safetensors": (_truncate_weights, "model.safetensors' cannot be read"),
    "garbage-pytorch-bin": (_garbage_bin, "cannot be read"),
    "pickled-code-bin": (_pickled_code_bin, "cannot be read"),
    "weights-not-matching-config": (_config_not_matching, "do not match its config.json"),
    "no-tokenizer": (_no_tokenizer, "has no tokenizer"),
    "config-not-json": (_config_not_json, "config.json' cannot be read"),
}


@pytest.mark.parametrize("fault", list(TEACHER_FAULTS))
def test_2_broken_teacher_folder_is_one_line_exit_1(tiny_teacher, tiny_corpus, tmp_path, capsys, fault):
    mutate, message = TEACHER_FAULTS[fault]
    bad = _teacher_variant(tiny_teacher, tmp_path / "teacher", mutate)
    code, err = in_process("retrain_single_block", ["--block", "0", *map(str, data_args(bad, tiny_corpus)),
                                                     "--out", str(tmp_path / "out")], capsys)
    assert code == 1, err[-3000:]
    line = one_error_line(err, message, str(bad))
    assert "weights_only=False" not in line and "no sentence has a token" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_2_broken_teacher_from_a_process(tiny_teacher, tiny_corpus, tmp_path):
    bad = _teacher_variant(tiny_teacher, tmp_path / "teacher", _config_not_matching)
    r = run_script("eval_merged_12.py", "--model", tmp_path / "none", *data_args(bad, tiny_corpus),
                   "--out", tmp_path / "out")
    assert_clean_failure(r, 1, "do not match its config.json", "intermediate")


# ---------------------------------------------------------------------------------------------------------------
# 3. checkpoint metadata is validated on every load (see also the fuzz test at the end)
@pytest.fixture()
def block_dir(tiny_teacher, tmp_path):
    from models import BertAttention, load_teacher, weights_hash

    teacher, _ = load_teacher(tiny_teacher)
    meta = {"kind": "block", "layer": 1, "num_heads": 2, "head_dim": 8, "hidden_size": 32,
            "teacher": str(tiny_teacher), "teacher_hash": weights_hash(teacher)}
    d = save_checkpoint(tmp_path / "run" / "block_1" / "best", BertAttention(teacher.config, 2, 8).state_dict(), meta)
    return d, teacher


def _edit_meta(d: Path, **changes) -> None:
    meta = json.loads((d / "meta.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            meta.pop(k, None)
        else:
            meta[k] = v
    (d / "meta.json").write_text(json.dumps(meta))


_DELETE = object()
UNIT_META = {"kind": "block", "layer": 0, "num_heads": 1, "head_dim": 2, "hidden_size": 2, "teacher_hash": "t"}
RESUME_META = {"kind": "resume", "unit": "u", "unit_meta": UNIT_META, "run_id": "r1", "setup": {},
               "position": {"epoch": 1, "step": 0, "global_step": 4}}
TRAIN_STATE = {"position": {"epoch": 1, "step": 0, "global_step": 4}, "optimizer": {}, "scheduler": {},
               "best": float("inf"), "rng": {}, "run_id": "r1", "unit": "u", "weights_hash": "0"}


@pytest.mark.parametrize("changes, message", [
    ({"layer": _DELETE}, "required field 'layer' is missing"),
    ({"num_heads": _DELETE}, "required field 'num_heads' is missing"),
    ({"num_heads": "2"}, "field 'num_heads' must be an integer >= 1, found str \"2\""),
    ({"layer": True}, "field 'layer' must be an integer >= 0, found bool true"),
    ({"kind": "blocks"}, "field 'kind' must be one of block, merged_layer, model, resume"),
    ({"weights_sha256": _DELETE}, "required field 'weights_sha256' is missing"),
    ({"weights_sha256": ""}, "field 'weights_sha256' must be the sha256"),
])
def test_3_bad_block_metadata_is_refused_naming_the_field(block_dir, changes, message):
    from utils.training.students import build_student, load_block

    d, teacher = block_dir
    _edit_meta(d, **changes)
    if "weights_sha256" in changes:
        flip_byte(d / "model.safetensors")  # without a checksum, nothing could tell
    for load in (lambda: load_block(d, teacher.config, "x", force=True),
                 lambda: build_student(teacher, [d.parent.parent], "x", force=True)):
        with pytest.raises(CheckpointError) as e:
            load()
        assert message in str(e.value) and str(d / "meta.json") in str(e.value), str(e.value)


def test_3_model_metadata_without_config_is_one_line(tiny_teacher, tiny_corpus, saved_model, tmp_path, capsys):
    d = tmp_path / "model"
    shutil.copytree(saved_model, d)
    _edit_meta(d, config=_DELETE)
    code, err = in_process("eval_merged_12", ["--model", str(d), *map(str, data_args(tiny_teacher, tiny_corpus)),
                                               "--out", str(tmp_path / "o")], capsys)
    assert code == 1
    assert one_error_line(err, "required field 'config' is missing") != "error: 'config'"


def test_3_rehash_tool_records_a_vouched_for_hash(block_dir, capsys):
    from utils.checkpoint import main as checkpoint_tool

    d, teacher = block_dir
    _edit_meta(d, weights_sha256=_DELETE)
    with pytest.raises(CheckpointError, match="weights_sha256"):
        load_checkpoint(d)
    assert checkpoint_tool(["rehash", str(d.parent.parent)]) == 0  # found recursively
    assert "weights_sha256 set to" in capsys.readouterr().out
    sd, meta, _ = load_checkpoint(d)
    assert meta["layer"] == 1 and len(meta["weights_sha256"]) == 64
    # weights safetensors cannot read are never blessed
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    _edit_meta(d, weights_sha256=_DELETE)
    assert checkpoint_tool(["rehash", str(d)]) == 1
    assert "cannot be read as safetensors" in capsys.readouterr().err
    assert "weights_sha256" not in json.loads((d / "meta.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# 4. eval --force with a student made from a teacher of another vocabulary: one line
def test_4_force_with_another_vocabulary_is_one_line(tiny_teacher, tiny_corpus, tmp_path, capsys):
    from models import load_teacher, weights_hash
    from utils.training.students import save_model

    other = make_hf_teacher(tmp_path / "other", vocab_size=137)
    teacher, _ = load_teacher(other)
    model = save_model(teacher, tmp_path / "model", {"teacher": str(other), "teacher_hash": weights_hash(teacher)})
    code, err = in_process("eval_merged_12", ["--model", str(model), "--force",
                                               *map(str, data_args(tiny_teacher, tiny_corpus)),
                                               "--out", str(tmp_path / "o")], capsys)
    assert code == 1
    one_error_line(err, "does not fit this teacher", "vocab_size: the model has 137")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. an unwritable --out is refused before the evaluation runs (the export side of this bullet is issue 14's)
def test_5_eval_out_checked_before_evaluating(tiny_teacher, tiny_corpus, saved_model, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("an existing file")
    for module, extra in (("eval_merged_12", ["--model", str(saved_model)]),
                          ("eval_merge_layer", ["--checkpoint", str(tmp_path / "none")])):
        for out in (blocker, blocker / "sub"):
            code, err = in_process(module, [*extra, *map(str, data_args(tiny_teacher, tiny_corpus)),
                                             "--out", str(out)], capsys)
            assert code == 1, err[-2000:]
            one_error_line(err, "--out", str(out))
            assert "test:" not in err and not DATA_READ.search(err)  # nothing was evaluated
    assert blocker.read_text() == "an existing file"


# ---------------------------------------------------------------------------------------------------------------
# 6. numeric flags: finite, in range, naming the flag; exit 2
@pytest.mark.parametrize("module, argv, message", [
    ("retrain_single_block", ["--warmup", "-3"], "--warmup is a fraction of the training steps in [0, 1), got -3"),
    ("retrain_single_block", ["--warmup", "5"], "--warmup is a fraction of the training steps in [0, 1), got 5"),
    ("retrain_single_block", ["--clip", "nan"], "--clip must be a finite number, got nan"),
    ("retrain_single_block", ["--clip", "-1"], "--clip must be >= 0"),
    ("retrain_merge", ["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    ("retrain_merge", ["--seed", str(2**70)], "--seed must be in [0, 4294967295]"),
    ("retrain_single_block", ["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    ("eval_merged_12", ["--split-ratio", "nan,0,1"], "expected three finite non-negative numbers summing to 1"),
    ("eval_merged_12", ["--seq-len", "2"], "--seq-len must be >= 3"),
    ("finetune_merged", ["--kl-weight", "nan"], "--kl-weight must be a finite number"),
    ("finetune_merged", ["--hidden-weight", "-1"], "--hidden-weight must be 'balanced' or a finite number >= 0"),
    ("finetune_merged", ["--kl-weight", "0"], "all 0: nothing to train on"),
    ("eval_merge_layer", ["--block", "-1"], "--block must be >= 0"),
])
def test_6_numeric_flags_are_range_checked(tiny_teacher, tiny_corpus, tmp_path, capsys, module, argv, message):
    if module.startswith("retrain"):
        argv = ["--block", "0", *argv]
    out = tmp_path / "out"
    code, err = in_process(module, [*argv, *map(str, data_args(tiny_teacher, tiny_corpus)), "--out", str(out)],
                            capsys)
    assert code == 2, err[-2000:]
    one_error_line(err, message)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_6_cuda_asked_without_cuda_exits_2(tiny_teacher, tiny_corpus, saved_model, tmp_path, capsys):
    code, err = in_process("eval_merged_12", ["--model", str(saved_model), "--teacher", str(tiny_teacher),
                                               "--data-dir", str(tiny_corpus), "--device", "cuda",
                                               "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    one_error_line(err, "--device cuda was asked for, but torch sees no CUDA device")


# ---------------------------------------------------------------------------------------------------------------
# 7. run names stay inside --out; the teacher cache defaults to <--out>/cache
@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE", "a/../../b", ""])
def test_7_run_name_must_stay_inside_out(tiny_teacher, tiny_corpus, tmp_path, capsys, name):
    name = str(tmp_path / "abs_run") if name == "ABSOLUTE" else name
    code, err = in_process("retrain_single_block", ["--block", "0", *map(str, data_args(tiny_teacher, tiny_corpus)),
                                                     "--out", str(tmp_path / "a" / "b"), "--run-name", name], capsys)
    assert code == 2
    one_error_line(err, "--run-name must be a relative folder name inside --out")
    assert not (tmp_path / "a").exists() and not (tmp_path / "abs_run").exists()


def test_7_cache_dir_defaults_to_out(tiny_teacher, tiny_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the old default, ./checkpoints/cache, would appear here
    out = tmp_path / "runs"
    code, err = in_process("retrain_single_block", ["--block", "0", *map(str, data_args(tiny_teacher, tiny_corpus)),
                                                     "--epochs", "1", "--max-steps-per-epoch", "1", "--out", str(out),
                                                     "--cache-teacher", "--run-name", "r"], capsys)
    assert code == 0, err[-3000:]
    assert any((out / "cache").iterdir()) and not (tmp_path / "checkpoints").exists()
    record = json.loads((out / "r" / "block_0" / "run.json").read_text())["invocations"][-1]
    assert record["args"]["cache_dir"] == str(out / "cache")


# ---------------------------------------------------------------------------------------------------------------
# 8. clean output: loss 0 is 0; error lines start their own line; disk full is named; no pickle advice
class ZeroLoss(torch.nn.Module):
    """A task whose loss is exactly 0.0 at every step (a student that already matches its teacher)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, batch):
        return (self.lin(batch["x"]) * 0).sum(), {}

    def evaluate(self):
        return {"toy/loss": 0.0}


def test_8_running_loss_of_zero_prints_as_zero(tmp_path, caplog):
    trainer, _ = toy_trainer(tmp_path / "run", task=ZeroLoss(), epochs=1)
    with caplog.at_level(logging.INFO, logger="utils.training.loop"):
        trainer.fit(toy_batches())
    assert "epoch 1/1  train loss 0 " in caplog.text and "train loss nan" not in caplog.text


def test_8_error_line_starts_after_the_progress_bar(tmp_path, capsys):
    from utils.cli.parser import Parser
    from utils.data.text import DataError
    from utils.cli.run import run_main

    class FailsAtStep3(ZeroLoss):
        calls = 0

        def forward(self, batch):
            self.calls += 1
            if self.calls == 3:
                raise DataError("sentence 17 of 'x.txt' is broken")
            return super().forward(batch)

    def main(args):
        trainer, _ = toy_trainer(tmp_path / "run", task=FailsAtStep3(), epochs=1)
        trainer.fit(toy_batches())

    with restored_logging():
        assert run_main(main, Parser(), []) == 1
    err = capsys.readouterr().err
    assert "epoch 1/1" in err  # the bar was drawn
    assert err.endswith("\nerror: sentence 17 of 'x.txt' is broken\n"), repr(err[-300:])


def test_8_disk_full_is_named(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    import utils.storage.checkpoint as ck

    def odd_failure(*a, **kw):  # what safetensors said when the disk filled up
        raise SafetensorError("Error while serializing: unexpected pos 69120 vs 69012")

    monkeypatch.setattr(safetensors.torch, "save", odd_failure)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(CheckpointError, match=r"No space left on device \(0.0 MiB free"):
        save_checkpoint(tmp_path / "ck", {"w": torch.zeros(64, 64)}, UNIT_META)
    monkeypatch.undo()

    def enospc(*a, **kw):  # torch.save's own words on a full disk, with the errno behind them
        raise OSError(errno.ENOSPC, "file write failed")

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(tmp_path / "ck2", {"w": torch.zeros(2)}, RESUME_META, train_state=TRAIN_STATE)


@pytest.mark.parametrize("content", [b"garbage, not a checkpoint" * 10, pickle.dumps({"epoch": 0, "f": print})])
def test_8_garbage_train_state_never_suggests_unsafe_loading(tmp_path, content):
    d = save_checkpoint(tmp_path / "resume", {"u.w": torch.zeros(2)}, RESUME_META, train_state=TRAIN_STATE)
    (d / "train_state.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="sha256 does not match"):  # not the state this checkpoint saved
        load_checkpoint(d, with_train_state=True)
    meta = json.loads((d / "meta.json").read_text())  # as if the garbage had been saved with it
    meta["train_state_sha256"] = hashlib.sha256(content).hexdigest()
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, with_train_state=True)
    msg = str(e.value)
    assert "train_state.pt' cannot be read" in msg and "weights_only" not in msg and "\n" not in msg, msg


def test_8_train_state_missing_a_field_is_named(tmp_path):
    state = {k: v for k, v in TRAIN_STATE.items() if k != "scheduler"}
    d = save_checkpoint(tmp_path / "resume", {"u.w": torch.zeros(2)}, RESUME_META, train_state=state)
    with pytest.raises(CheckpointError, match="required field 'scheduler' of the training state is missing"):
        load_checkpoint(d, with_train_state=True)


# ---------------------------------------------------------------------------------------------------------------
# 9. only the project's errors (and a few named OS errors) are one line; a bug shows its traceback
@pytest.mark.parametrize("bug", [KeyError("layers"), IndexError("list index out of range"), ValueError("x"),
                                 TypeError("y"), OSError(errno.EBADF, "Bad file descriptor")])
def test_9_a_bug_prints_its_traceback_and_asks_for_a_report(capsys, bug):
    from utils.cli.parser import Parser
    from utils.cli.run import run_main

    def main(args):
        raise bug

    assert run_main(main, Parser(), []) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and type(bug).__name__ in err
    assert last_line(err).startswith("error: this is a bug") and "please report it" in last_line(err)
    assert "error: 'layers'" not in err


@pytest.mark.parametrize("expected, line", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y.txt"),
     "error: No such file or directory: '/x/y.txt'"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/y.txt"), "error: No space left on device"),
    (CheckpointError("checkpoint 'c' is broken"), "error: checkpoint 'c' is broken"),
])
def test_9_expected_errors_are_one_line(capsys, expected, line):
    from utils.cli.parser import Parser
    from utils.cli.run import run_main

    def main(args):
        raise expected

    assert run_main(main, Parser(), []) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and last_line(err).startswith(line) and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_9_bug_from_a_process_shows_traceback(tiny_teacher, tiny_corpus, tmp_path):
    import subprocess
    import sys

    # an internal KeyError (planted: start-up crashes) is a bug: its traceback is shown and a report asked for
    code = ("import runpy, sys, utils.session as s\n"
            "def start(args): raise KeyError('layers')\n"
            "s.start = start\n"
            "sys.argv = ['retrain_single_block.py'] + sys.argv[1:]\n"
            "runpy.run_path('retrain_single_block.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code, "--block", "0", *map(str, data_args(tiny_teacher, tiny_corpus)),
                        "--out", str(tmp_path / "o")], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" in r.stderr and "KeyError: 'layers'" in r.stderr
    assert last_line(r.stderr).startswith("error: this is a bug")


# ---------------------------------------------------------------------------------------------------------------
# fuzz: corrupt every field of real saved metadata in turn (delete, wrong type, out of range)
@pytest.fixture(scope="module")
def real_checkpoints(tiny_teacher, tiny_corpus, tmp_path_factory):
    """Checkpoints of every kind as the scripts write them: block, merged layer, model, resume."""
    from models import load_teacher, weights_hash
    from utils.training.students import save_model
    from utils.cli.run import run_main

    import retrain_merge
    import retrain_single_block

    out = tmp_path_factory.mktemp("fuzz")
    common = [*map(str, data_args(tiny_teacher, tiny_corpus)), "--epochs", "1", "--max-steps-per-epoch", "1",
              "--batch-size", "16", "--out", str(out)]
    with restored_logging():
        for mod, name in ((retrain_single_block, "blocks"), (retrain_merge, "merge")):
            parser = mod.build_parser()
            code = run_main(lambda a: mod.main(a, parser), parser,
                            ["--block", "0", "--heads", "2", *common, "--run-name", name])
            if code != 0:
                pytest.fail(f"{mod.__name__} exited {code}")
    teacher, _ = load_teacher(tiny_teacher)
    save_model(teacher, out / "model", {"teacher": str(tiny_teacher), "teacher_hash": weights_hash(teacher),
                                        "sources": ["base teacher"]})
    return {"block": out / "blocks" / "block_0" / "best", "merged_layer": out / "merge" / "merge_0" / "best",
            "model": out / "model", "resume": out / "blocks" / "block_0" / "resume"}, teacher


def _leaves(obj, path=()):
    """(path, value) of every field; objects are descended into, lists of objects by their first element."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*path, k), v
            if isinstance(v, (dict, list)):
                yield from _leaves(v, (*path, k))
    elif isinstance(obj, list) and obj and isinstance(obj[0], dict):
        yield (*path, 0), obj[0]
        yield from _leaves(obj[0], (*path, 0))


def _wrong_type(v):
    if isinstance(v, bool):
        return "true"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return 7
    if isinstance(v, list):
        return {"a": 1}
    if isinstance(v, dict):
        return [1]
    return 3


def _out_of_range(v):
    if isinstance(v, bool) or v is None or isinstance(v, dict):
        return _SKIP
    if isinstance(v, int):
        return -1
    if isinstance(v, float):
        return math.nan
    if isinstance(v, str):
        return ""
    return []  # lists


_SKIP = object()


def _mutated(meta: dict, path: tuple, how: str):
    meta = copy.deepcopy(meta)
    parent = meta
    for k in path[:-1]:
        parent = parent[k]
    old = parent[path[-1]]
    if how == "delete":
        if isinstance(parent, list):
            return None
        del parent[path[-1]]
        return meta
    new = _wrong_type(old) if how == "wrong type" else _out_of_range(old)
    if new is _SKIP:
        return None
    parent[path[-1]] = new
    return meta


def _loader(kind: str, d: Path, teacher, unit_meta: dict):
    """What a user's command does with a checkpoint of ``kind``; returns what decides the model that results."""
    from models import weights_hash
    from models.compress import compress_attention
    from utils.training.loop import TrainConfig, Trainer, Unit
    from utils.training.students import load_block, load_merged_layer, load_model
    from utils.training.tasks import BlockDistill

    th = weights_hash(teacher)
    if kind == "block":
        i, attn = load_block(d, teacher.config, th)
        return i, attn.num_heads, attn.head_dim, attn.state_dict()
    if kind == "merged_layer":
        first, layer, spec = load_merged_layer(d, teacher.config, th)
        return first, spec, layer.state_dict()
    if kind == "model":
        model, _ = load_model(d, th, force=False, teacher_config=teacher.config)
        return model.config.to_dict(), model.state_dict()
    # resume: the training loop's own loader and checks, for the unit the run was started with
    attn, _ = compress_attention(teacher.layers[0].attention, teacher.config, num_heads=unit_meta["num_heads"],
                                 head_dim=unit_meta["head_dim"])  # as retrain_single_block builds it
    unit = Unit("block_0", attn, d.parent, unit_meta)
    task = BlockDistill(teacher, {0: attn}, ["output"])
    # another lr, seed, data...: accepted (and logged) with --force-config, so only the unit's own fields decide
    trainer = Trainer(task, [unit], TrainConfig(epochs=2, resume=True, force_config=True), run_dir=d.parent,
                      device=torch.device("cpu"), evaluate=dict)
    unit.scheduler = torch.optim.lr_scheduler.LambdaLR(unit.optimizer, lambda s: 1.0)
    trainer._try_resume()
    return trainer.start_epoch, attn.state_dict()


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("kind", ["block", "merged_layer", "model", "resume"])
def test_fuzz_every_metadata_field(real_checkpoints, tmp_path, capsys, kind):
    from utils.storage.checkpoint import REQUIRED
    from utils.cli.parser import Parser
    from utils.cli.run import run_main

    dirs, teacher = real_checkpoints
    src = dirs[kind]
    original = json.loads((src / "meta.json").read_text())
    unit_meta = original.get("unit_meta")
    work = tmp_path / "ck"

    def attempt(meta) -> tuple[int, str, object]:
        shutil.rmtree(work.parent / "w", ignore_errors=True)
        shutil.copytree(src.parent if kind == "resume" else src, work.parent / "w")
        d = work.parent / "w" / ("resume" if kind == "resume" else "")
        if meta is not None:
            (d / "meta.json").write_text(json.dumps(meta))
        result = []

        def main(args):
            result.append(_loader(kind, d, teacher, unit_meta))
            return d

        with restored_logging():
            code = run_main(main, Parser(), [])
        return code, capsys.readouterr().err, (result[0] if result else None)

    code, err, reference = attempt(None)
    assert code == 0 and reference is not None, err
    cases = [(p, how) for p, _ in _leaves(original) for how in ("delete", "wrong type", "out of range")]
    accepted, refused = [], 0
    for path, how in cases:
        meta = _mutated(original, path, how)
        if meta is None:
            continue
        code, err, got = attempt(meta)
        label = f"{'.'.join(map(str, path))} {how}"
        field = next(str(k) for k in reversed(path) if not isinstance(k, int))
        if code == 0:
            assert _same(got, reference), f"{label}: exit 0 with a different model"
            accepted.append(label)
            continue
        assert code == 1, (label, err)
        one_error_line(err, field)
        refused += 1
    # a required field deleted, or given a wrong type, is always refused
    required = set(REQUIRED[kind]) | {"format_version", "kind", "weights_sha256"}
    for r in required:
        assert f"{r} delete" not in accepted and f"{r} wrong type" not in accepted, (r, accepted)
    print(f"{kind}: {refused} corruptions refused; accepted with the same model: {accepted}")
    assert refused >= 2 * len(required)  # every required field: delete + wrong type at least
