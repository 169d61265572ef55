"""Issue 21: every stop and every bad file ends in one clear line and a usable state.

One test (or a small group) per failure case of the issue, numbered and named as there: a broken teacher folder (1),
plan targets (2), a malformed map (3), a full disk (4) and kill -9 (5) during a cache build, kill -9 during exports
(6), discovery racing a writer (7), signals in every phase (8), damaged cache arrays (9), run.json history (10), and
the tokenizer of a CompactBERT export (11). Each reproduces the failure through a hook, a file or a state that proves
the phase was reached; none waits for time to pass.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (DATA_READ, ROOT, compact_student, data_args, in_process, last_line, script_env, tiny_cache,
                     toy_batches, toy_trainer)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def one_line(err: str, *needles: str) -> str:
    """stderr ends with exactly one 'error: ...' line naming ``needles``, and holds no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("error:") or ": error: " in l]
    assert len(lines) == 1 and last_line(err) == lines[0], err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def run_python(code: str, *args, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -c code args`` from the repository root (tests/ importable too)."""
    env = script_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# 4. a full disk while the teacher cache is built: one line naming the disk, no temporary file left
def _small_fs_command(mount: Path, size: str) -> list[str]:
    """A command prefix that runs its arguments with a ``size`` tmpfs mounted at ``mount`` (in a private user and
    mount namespace: no root needed where user namespaces are allowed); pytest.skip where it cannot be made."""
    mount.mkdir(parents=True, exist_ok=True)
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
              f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"', str(mount)]
    if shutil.which("unshare") is None:
        pytest.skip("no small file system: unshare(1) is not installed, so the test cannot mount a tmpfs of its own")
    probe = subprocess.run(prefix + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("no small file system: this machine does not let an unprivileged user namespace mount a tmpfs "
                    f"({' '.join(probe.stderr.split())[:200]})")
    return prefix


def test_4_disk_full_during_cache_build_is_one_line_and_leaves_no_temporary(tiny_teacher, tiny_corpus, tmp_path):
    mount = tmp_path / "small"
    listing = tmp_path / "left.txt"
    cmd = _small_fs_command(mount, "96k") + [
        "sh", "-c", 'm=$0; l=$1; shift; "$@"; rc=$?; find "$m" -type f > "$l"; exit $rc', str(mount), str(listing),
        sys.executable, str(ROOT / "retrain_single_block.py"), "--block", "0",
        *map(str, data_args(tiny_teacher, tiny_corpus)), "--epochs", "1", "--out", str(tmp_path / "out"),
        "--cache-teacher", "--cache-dir", str(mount)]
    r = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])  # before: 135 (Bus error), no line
    line = one_line(r.stderr, "No space left on device", str(mount))
    assert ".npy.tmp." in line  # names the file it could not write
    left = listing.read_text().split()
    assert not [f for f in left if ".tmp." in f], left


# ---------------------------------------------------------------------------------------------------------------
# 5. kill -9 during a cache build: the next run removes the dead builder's full-size temporary files
KILL_DURING_BUILD = r'''
import os, signal, sys
from pathlib import Path
import torch
import utils.storage.features as F
from helpers import tiny_cache

real = F.teacher_features
def dying(*args, **kwargs):  # the first batch is computed and written, then the builder dies
    F.teacher_features = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
F.teacher_features = dying
tiny_cache(Path(sys.argv[1]), Path(sys.argv[2])).ensure(["in_0", "block_0"], 8, torch.device("cpu"))
'''


@pytest.mark.slow
def test_5_kill9_during_cache_build_leaves_nothing_for_good(tiny_teacher, tmp_path):
    root = tmp_path / "cache"
    r = run_python(KILL_DURING_BUILD, tiny_teacher, root)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    left = sorted(root.rglob("*.tmp.*"))
    assert [p.name.split(".tmp.")[0] for p in left] == ["block_0.npy", "in_0.npy"]  # the dead builder's files
    cache = tiny_cache(tiny_teacher, root).ensure(["in_0"], 8, torch.device("cpu"))  # the next run
    assert not list(root.rglob("*.tmp.*"))  # before: both stayed, full size, for good
    assert cache.arrays["in_0"].shape == (int(cache.offsets[-1]), 32)


def test_5_a_live_builders_temporary_files_are_kept(tiny_teacher, tmp_path):
    import socket

    cache = tiny_cache(tiny_teacher, tmp_path / "cache")
    cache.dir.mkdir(parents=True)
    mine = cache.dir / f"in_1.npy.tmp.{socket.gethostname()}.{os.getpid()}.abcd1234"  # this process: alive
    mine.write_bytes(b"x")
    cache.ensure(["in_0"], 8, torch.device("cpu"))
    assert mine.is_file()


def test_5_a_dead_builders_staged_record_folder_is_removed(tiny_teacher, tmp_path):
    """The records (info.json, <feature>.json) are written staged, in a folder: one left by a dead writer goes too."""
    import socket

    cache = tiny_cache(tiny_teacher, tmp_path / "cache")
    cache.dir.mkdir(parents=True)
    dead = cache.dir / f"info.json.tmp.{socket.gethostname()}.{2**22 + 12345}.0badf00d"  # no such pid
    dead.mkdir()
    (dead / "info.json").write_text('{"sentences": ')  # half a record
    cache.ensure(["in_0"], 8, torch.device("cpu"))
    assert not dead.exists() and not list(cache.dir.glob("*.tmp.*"))
    assert json.loads((cache.dir / "info.json").read_text())["features"] == ["in_0"]
    assert json.loads((cache.dir / "in_0.json").read_text())["shape"] == [int(cache.offsets[-1]), 32]


# ---------------------------------------------------------------------------------------------------------------
# 9. a cached array of the wrong dtype or row count, with a matching size/sha record: named and rebuilt, never used
def _forge(cache, name: str, content: np.ndarray | bytes) -> None:
    """Replace a feature's file by ``content`` and record its true size and sha256 (as if a build had written it)."""
    from utils.storage.features import _file_sha256

    f = cache.dir / f"{name}.npy"
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        np.save(f, content, allow_pickle=True)
    rec = json.loads((cache.dir / f"{name}.json").read_text())
    rec.update(bytes=f.stat().st_size, sha256=_file_sha256(f))
    (cache.dir / f"{name}.json").write_text(json.dumps(rec))


@pytest.mark.parametrize("forged", ["object-dtype", "rows-missing", "float32", "not-npy"])
def test_9_cached_array_of_wrong_dtype_or_shape_is_rebuilt(tiny_teacher, tmp_path, caplog, forged):
    cache = tiny_cache(tiny_teacher, tmp_path / "cache").ensure(["in_0"], 8, torch.device("cpu"))
    good = np.array(cache.arrays.pop("in_0"))
    content = {"object-dtype": np.array([{"x": 1}] * len(good), dtype=object), "rows-missing": good[:-3],
               "float32": good.astype(np.float32), "not-npy": b"\0" * 256}[forged]
    _forge(cache, "in_0", content)
    again = tiny_cache(tiny_teacher, tmp_path / "cache")
    with caplog.at_level("WARNING"):
        again.ensure(["in_0"], 8, torch.device("cpu"))  # before: ValueError / IndexError, "this is a bug"
    assert "in_0.npy' is damaged" in caplog.text and "this cache needs a float16 array" in caplog.text
    assert np.array_equal(np.array(again.arrays["in_0"]), good)


@pytest.mark.parametrize("where", [0, 17])
def test_9_cached_array_of_nan_with_a_matching_checksum_is_named_and_rebuilt(tiny_teacher, tmp_path, caplog, where):
    """Issue 34 (9): before, such a file was used and training ended in "loss became nan", naming no file."""
    cache = tiny_cache(tiny_teacher, tmp_path / "cache").ensure(["in_0"], 8, torch.device("cpu"))
    good = np.array(cache.arrays.pop("in_0"))
    forged = good.copy()
    forged[where:] = np.nan if where == 0 else np.inf
    _forge(cache, "in_0", forged)
    again = tiny_cache(tiny_teacher, tmp_path / "cache")
    with caplog.at_level("WARNING"):
        again.ensure(["in_0"], 8, torch.device("cpu"))
    assert f"in_0.npy' is damaged (it holds NaN or infinite values (first in row {where})" in caplog.text
    assert np.array_equal(np.array(again.arrays["in_0"]), good)


def test_9_a_teacher_feature_beyond_float16_is_never_cached(tiny_teacher, tmp_path):
    """Written as inf, it would be refused as damaged by every later run and rebuilt as inf again."""
    from models import TeacherError

    cache = tiny_cache(tiny_teacher, tmp_path / "cache")
    with torch.no_grad():
        cache.teacher.bert.embeddings.LayerNorm.weight.fill_(1e6)  # in_0: the embeddings' LayerNorm output
    with pytest.raises(TeacherError, match="teacher feature in_0 holds NaN or infinite values in float16"):
        cache.ensure(["in_0"], 8, torch.device("cpu"))
    assert not list(cache.dir.glob("in_0.*"))  # neither a final file nor a temporary left


# ---------------------------------------------------------------------------------------------------------------
# 7. discovery while a job saves: folders that vanish between being listed and being read are skipped
def _saved_block(d: Path, value: float) -> Path:
    from utils.storage.checkpoint import save_checkpoint

    meta = {"kind": "block", "layer": 0, "num_heads": 1, "head_dim": 4, "hidden_size": 4, "teacher_hash": "t"}
    return save_checkpoint(d, {"w": torch.full((4, 4), value)}, meta)


class _Listing:
    """What os.scandir returns, listed in full before ``then`` runs (a writer acting between list and enter)."""

    def __init__(self, entries: list, then):
        self.entries = iter(entries)
        then()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


def test_7_discovery_skips_a_folder_removed_while_it_walks(tmp_path, monkeypatch):
    from utils.storage.checkpoint import find_checkpoints

    unit = tmp_path / "run" / "block_0"
    _saved_block(unit / "best", 1.0)
    prev = _saved_block(unit / "best.prev.otherhost.1.abcd", 0.0)  # a save's old copy, about to be removed
    real = os.scandir

    def scandir(path="."):
        with real(path) as it:
            entries = list(it)
        listed_unit = isinstance(path, (str, os.PathLike)) and Path(path) == unit
        then = (lambda: shutil.rmtree(prev)) if listed_unit else (lambda: None)
        return _Listing(entries, then)

    monkeypatch.setattr(os, "scandir", scandir)
    found = find_checkpoints([tmp_path / "run"], ["block"])  # before: FileNotFoundError from the walk
    assert [p for p, _ in found] == [unit / "best"]


def test_7_discovery_finds_a_checkpoint_whose_swap_completes_while_it_walks(tmp_path, monkeypatch):
    from utils.storage.checkpoint import find_checkpoints

    unit = tmp_path / "run" / "block_0"
    prev = _saved_block(unit / "best.prev.otherhost.1.abcd", 1.0)  # the old copy moved aside...
    tmp = _saved_block(unit / "best.tmp.otherhost.1.abcd", 2.0)  # ...the new one not yet renamed into place
    (tmp_path / "run" / "notes" / "best").mkdir(parents=True)  # a folder of that name that is no checkpoint
    real = os.scandir

    def scandir(path="."):
        with real(path) as it:
            entries = list(it)

        def finish_swap():
            tmp.rename(unit / "best")
            shutil.rmtree(prev)
        listed_unit = isinstance(path, (str, os.PathLike)) and Path(path) == unit
        return _Listing(entries, finish_swap if listed_unit else (lambda: None))

    monkeypatch.setattr(os, "scandir", scandir)
    found = find_checkpoints([tmp_path / "run"], ["block"])  # before: the unit was missed (both names vanished)
    assert [p for p, _ in found] == [unit / "best"]


def test_7_resolving_a_swap_that_finishes_while_it_reads(tmp_path, monkeypatch):
    from utils.storage.checkpoint import load_checkpoint, resolve_dir

    unit = tmp_path / "block_0"
    _saved_block(unit / "best", 1.0)
    prev = unit / "best.prev.otherhost.1.abcd"
    (unit / "best").rename(prev)  # mid-swap: the old copy moved aside, the new one not yet in place
    new = _saved_block(unit / "new", 2.0)
    real = Path.glob

    def glob(self, pattern):
        listed = list(real(self, pattern))
        if self == unit:  # the writer completes its swap right after the listing
            new.rename(unit / "best")
            shutil.rmtree(prev)
        return iter(listed)

    monkeypatch.setattr(Path, "glob", glob)
    assert resolve_dir(unit / "best") == unit / "best"  # before: FileNotFoundError from stat
    monkeypatch.undo()
    assert float(load_checkpoint(unit / "best")[0]["w"][0, 0]) == 2.0


# ---------------------------------------------------------------------------------------------------------------
# 10. a job killed before its first resume point keeps its invocation in run.json when it is started again
class _Killed(BaseException):
    """Stands for kill -9 in the middle of a step: nothing after it runs (no resume point is saved)."""


def test_10_run_json_keeps_the_invocation_of_a_job_that_died_before_a_resume_point(tmp_path):
    first, _ = toy_trainer(tmp_path, resume=True)
    first.after_step = lambda position: (_ for _ in ()).throw(_Killed())  # dies after its first step
    with pytest.raises(_Killed):
        first.fit(toy_batches())
    record = tmp_path / "toy" / "run.json"
    assert len(json.loads(record.read_text())["invocations"]) == 1 and not (tmp_path / "toy" / "resume").exists()
    again, _ = toy_trainer(tmp_path, resume=True)  # the requeued job: nothing to resume, starts from scratch
    again.fit(toy_batches())
    history = json.loads(record.read_text())["invocations"]
    assert len(history) == 2  # before: 1, the first invocation was lost
    assert history[0]["run_id"] == first.run_id and history[1]["run_id"] == again.run_id != first.run_id
    third, _ = toy_trainer(tmp_path, epochs=4, resume=True)  # a real resume appends too
    third.fit(toy_batches())
    assert [i["run_id"] for i in json.loads(record.read_text())["invocations"]][1:] == [again.run_id] * 2


def test_10_an_unreadable_run_json_is_kept_aside(tmp_path, caplog):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "run.json").write_text('{"invocations": [')
    trainer, _ = toy_trainer(tmp_path, epochs=1)
    trainer.fit(toy_batches())
    (aside,) = (tmp_path / "toy").glob("run.json.unreadable.*")
    assert aside.read_text() == '{"invocations": [' and "could not be read" in caplog.text
    assert len(json.loads((tmp_path / "toy" / "run.json").read_text())["invocations"]) == 1


# ---------------------------------------------------------------------------------------------------------------
# 2. plan targets: checked at parse time, and against what the map (or, before it is built, its options) can reach
PLAN_FAST = ["--device", "cpu", "--batch-size", "16", "--epochs", "1", "--max-steps-per-epoch", "2", "--latency-reps",
             "2", "--eval-sentences", "16", "--valid-batches", "1", "--ft-epochs", "0", "--test-sentences", "16"]


def small_map(layers: int = 2) -> dict:
    """A valid map of the tiny teacher (2 layers, 4 heads of 8, FFN 64) with one option: 2 heads."""
    entries = [{"layer": i, "option": "heads 2", "kind": "block", "covers": [i], "num_heads": 2, "head_dim": 8,
                "ffn": 64, "params_saved": 528, "latency_saved_ms": 0.1, "unit_ms": 0.2, "kl_teacher_student": 0.01,
                "top1_drop": 0.0, "agreement_drop": 0.01} for i in range(layers)]
    return {"teacher": "tiny", "teacher_hash": "0123456789abcdef", "layers": layers, "teacher_params": 10_000,
            "options": [{"name": "heads 2", "kind": "block", "num_heads": 2, "head_dim": 8, "ffn": 64}],
            "mapped_layers": list(range(layers)), "entries": entries, "device": "cpu",
            "timing": {"encoder_ms": 1.0, "embeddings_ms": 0.1, "layer_ms": [0.45] * layers, "unit_ms": {},
                       "batch": 32, "seq": 40, "reps": 2}}


def _plan(tiny_teacher, tiny_corpus, tmp_path, capsys, *target) -> tuple[int, str]:
    argv = [*map(str, data_args(tiny_teacher, tiny_corpus)), "--out", str(tmp_path / "out"), "--run-name", "p",
            "--cache-dir", str(tmp_path / "cache"), *PLAN_FAST, *map(str, target)]
    return in_process("plan_student", argv, capsys)


@pytest.mark.parametrize("value", ["0.5", "0", "-2", "inf", "nan"])
def test_2_target_speedup_below_one_is_a_usage_error(tiny_teacher, tiny_corpus, tmp_path, capsys, value):
    code, err = _plan(tiny_teacher, tiny_corpus, tmp_path, capsys, "--target-speedup", value)
    assert code == 2  # before (0.5): accepted, the whole map built, then "this is a bug"
    one_line(err, "--target-speedup must be a finite number >= 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target, reach", [(["--target-params", "1"], "the map's options remove at most"),
                                           (["--target-speedup", "1000"], "the map's options reach at most")])
def test_2_unreachable_target_is_refused_before_a_map_is_built(tiny_teacher, tiny_corpus, tmp_path, capsys, target,
                                                               reach):
    code, err = _plan(tiny_teacher, tiny_corpus, tmp_path, capsys, *target)
    assert code == 2, err[-3000:]  # before: the map was built, then a traceback asking for a bug report
    one_line(err, f"{target[0]} {target[1]} cannot be met", reach)
    assert not (tmp_path / "out" / "p").exists() and "mapping layers" not in err  # nothing was trained


@pytest.mark.parametrize("target, reach", [(["--target-params", "1"], "remove at most 1,056 of the teacher's 10,000"),
                                           (["--target-speedup", "100"], "reach at most 1.25x")])
def test_2_unreachable_target_with_a_map_is_one_line(tiny_teacher, tiny_corpus, tmp_path, capsys, target, reach):
    f = tmp_path / "map.json"
    f.write_text(json.dumps(small_map()))
    code, err = _plan(tiny_teacher, tiny_corpus, tmp_path, capsys, "--map", f, "--force", *target)
    assert code == 2, err[-3000:]  # before: "this is a bug" with a traceback
    one_line(err, "cannot be met", reach)


def test_2_planner_says_what_the_map_reaches():
    from utils.planning.planner import PlanError, choose_plan

    with pytest.raises(PlanError, match=r"reach at most 1\.25x"):
        choose_plan(small_map(), target_speedup=3.0)
    with pytest.raises(PlanError, match="smallest student has 8,944"):
        choose_plan(small_map(), target_params=5_000)
    assert choose_plan(small_map(), target_speedup=1.2).choices == {0: "heads 2", 1: "heads 2"}


# ---------------------------------------------------------------------------------------------------------------
# 3. a malformed --map: one line naming the file and the field, exit 1
def _edit(change):
    smap = small_map()
    change(smap)
    return json.dumps(smap)


MAP_FAULTS = {
    "not-json": ("{'layers': 2,", "not valid JSON"),
    "binary": (b"\xff\xfe\x00garbage", "not valid JSON"),
    "a-list": (json.dumps([small_map()]), "field '(the whole file)' must be a JSON object"),
    "layer-a-path": (_edit(lambda m: m["entries"][1].update(layer="../x")), "field 'entries[1].layer' must be a layer"),
    "layer-out-of-range": (_edit(lambda m: m["entries"][0].update(layer=7)), "'entries[0].layer' must be a layer"),
    "unknown-option": (_edit(lambda m: m["entries"][0].update(option="heads 9")), "'entries[0].option' must be"),
    "covers-wrong": (_edit(lambda m: m["entries"][0].update(covers=[0, 1])), "'entries[0].covers' must be [0]"),
    "saving-a-string": (_edit(lambda m: m["entries"][0].update(latency_saved_ms="fast")), "latency_saved_ms"),
    "no-timing": (_edit(lambda m: m.pop("timing")), "field 'timing' must be present"),
    "encoder-ms-zero": (_edit(lambda m: m["timing"].update(encoder_ms=0)), "'timing.encoder_ms' must be a number"),
    "option-kind": (_edit(lambda m: m["options"][0].update(kind="magic")), "'options[0].kind' must be one of"),
    "layers-bool": (_edit(lambda m: m.update(layers=True)), "field 'layers' must be an integer"),
    # issue 34.4: valid otherwise, but not the teacher's 2 layers (10^12 made the planner build range(10^12))
    "layers-huge": (_edit(lambda m: m.update(layers=10 ** 12)), "field 'layers' must be 2 (the teacher's number"),
    "layers-other-teacher": (_edit(lambda m: m.update(layers=3)), "field 'layers' must be 2 (the teacher's number"),
}


@pytest.mark.parametrize("fault", list(MAP_FAULTS))
def test_3_malformed_map_is_one_line_naming_the_field(tiny_teacher, tiny_corpus, tmp_path, capsys, fault):
    content, message = MAP_FAULTS[fault]
    f = tmp_path / "sensitivity.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = _plan(tiny_teacher, tiny_corpus, tmp_path, capsys, "--map", f, "--force", "--target-params", "9900")
    assert code == 1, err[-3000:]  # before: a traceback asking for a bug report (or a KeyError deep in the planner)
    one_line(err, str(f), message)
    assert "layers, hidden" not in err  # refused before the teacher loaded (its log line), let alone any planning


def test_3_a_map_from_sensitivity_map_is_valid(tmp_path):
    from utils.planning.students import read_map

    (tmp_path / "sensitivity.json").write_text(json.dumps(small_map()))
    assert read_map(str(tmp_path)) == small_map()


# ---------------------------------------------------------------------------------------------------------------
# 6. kill -9 during an export: nothing half-written under the requested name; the next export cleans up and succeeds
KILL_DURING_EXPORT = r'''
import os, shutil, signal, sys
from pathlib import Path
import models.onnx_export as ox
from models.export import export_pretrained
from helpers import compact_student

student, tok = compact_student(Path(sys.argv[1]))
what, out = sys.argv[2], Path(sys.argv[3])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if what == "hf":  # weights and config written, the modeling file created but still empty, no tokenizer yet
    def copyfile(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"")
        die()
    shutil.copyfile = copyfile
    export_pretrained(student, out, tok)
else:  # the encoder graph written and checked, the masked-LM graph cut short
    real, calls = ox.export_graph, []
    def export_graph(model, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\x08\x07truncat")
            die()
        return real(model, path, *args, **kwargs)
    ox.export_graph = export_graph
    ox.export_onnx(student, out)
'''


def _export_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp." in p.name or ".old." in p.name)


@pytest.mark.slow
@pytest.mark.parametrize("previous", [False, True], ids=["new-folder", "over-a-previous-export"])
def test_6_kill9_during_hf_export_leaves_no_half_folder(tiny_teacher, tmp_path, previous):
    from models.export import export_pretrained

    student, tok = compact_student(tiny_teacher)
    out = tmp_path / "exports" / "hf"
    if previous:
        export_pretrained(student, out, tok)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_python(KILL_DURING_EXPORT, tiny_teacher, "hf", out)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    # before: 'hf' held config.json, model.safetensors and an empty modeling file, and no tokenizer
    if previous:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export, untouched
    else:
        assert not out.exists()
    assert [n.split(".tmp.")[0] for n in _export_leftovers(out.parent)] == ["hf"]  # marked incomplete by its name
    export_pretrained(student, out, tok)  # the next export removes the dead one's folder and completes
    assert not _export_leftovers(out.parent)
    assert (out / "modeling_compact_bert.py").stat().st_size > 0 and (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_6_kill9_during_onnx_export_leaves_no_truncated_graph(tiny_teacher, tmp_path):
    from models.onnx_export import encoder_path, export_onnx

    out = tmp_path / "onnx" / "model.onnx"
    r = run_python(KILL_DURING_EXPORT, tiny_teacher, "onnx", out)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists() and not encoder_path(out).exists()  # before: a truncated model.onnx beside the encoder
    assert len(_export_leftovers(out.parent)) == 1
    student, _ = compact_student(tiny_teacher)
    done = export_onnx(student, out)
    assert set(done) == {"encoder", "masked-LM"} and not _export_leftovers(out.parent)
    import onnx

    for graph in (out, encoder_path(out)):
        onnx.checker.check_model(str(graph))  # complete graphs (raises on a truncated one)


def test_6_an_export_never_replaces_a_folder_that_is_not_a_model(tiny_teacher, tiny_corpus, tmp_path, capsys):
    from models.export import ExportError, export_pretrained

    keep = tmp_path / "my_documents"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    student, tok = compact_student(tiny_teacher)
    with pytest.raises(ExportError, match="holds files but no model"):
        export_pretrained(student, keep, tok)
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]
    code, err = in_process("finetune_merged", [*map(str, data_args(tiny_teacher, tiny_corpus)), "--drop-every-second",
                                                "--out", str(tmp_path / "runs"), "--export-hf", str(keep)], capsys)
    assert code == 1 and not (tmp_path / "runs").exists()  # refused before any training
    one_line(err, "--export-hf folder", "holds files but no model")


# ---------------------------------------------------------------------------------------------------------------
# 11. the tokenizer of a CompactBERT export loads with AutoTokenizer, without remote code
def test_11_compact_export_tokenizer_loads_without_remote_code(tiny_teacher, tmp_path, monkeypatch):
    import builtins

    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    from models.export import export_pretrained

    student, tok = compact_student(tiny_teacher)
    out, kind = export_pretrained(student, tmp_path / "hf", tok)
    assert kind.startswith("CompactBertForMaskedLM")
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "n")
    loaded = AutoTokenizer.from_pretrained(str(out))  # before: "Do you wish to run the custom code? [y/N]"
    assert not asked, asked
    assert loaded("the small cat .")["input_ids"] == tok("the small cat .")["input_ids"]
    assert type(AutoConfig.from_pretrained(str(out))).__name__ == "BertConfig"
    model = AutoModelForMaskedLM.from_pretrained(str(out), trust_remote_code=True)
    assert type(model).__name__ == "CompactBertForMaskedLM" and not asked
    with pytest.raises(RuntimeError, match="mismatch"):  # without the remote code: refused, never silently wrong
        AutoModelForMaskedLM.from_pretrained(str(out))


def test_11_a_model_plain_bert_would_misread_keeps_a_remote_config(tiny_teacher, tmp_path):
    from models import LayerSpec, ModelConfig
    from models.bert import BertForMaskedLM
    from models.export import export_pretrained

    student, tok = compact_student(tiny_teacher)
    cfg = ModelConfig.from_dict({**student.config.to_dict(), "layers": [
        LayerSpec(4, 8, 64, [0]).to_dict(), LayerSpec(8, 4, 64, [1], "block").to_dict()]})  # same shapes, 8 x 4
    out, _ = export_pretrained(BertForMaskedLM(cfg).eval(), tmp_path / "hf", tok)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "compact_bert" and "AutoConfig" in config["auto_map"]


# ---------------------------------------------------------------------------------------------------------------
# 1. a broken teacher folder: validated in full before any work, one line for each variant
def _config(**changes):
    def mutate(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return mutate


def _vocab_only(content: bytes):
    """No tokenizer.json: transformers builds the tokenizer from vocab.txt, which holds ``content``."""
    def mutate(d: Path) -> None:
        (d / "tokenizer.json").unlink()
        (d / "vocab.txt").write_bytes(content)
    return mutate


def _write(name: str, content: bytes):
    return lambda d: (d / name).write_bytes(content)


TEACHER_VARIANTS = {
    "heads-not-dividing-hidden": (_config(num_attention_heads=5), "num_attention_heads 5 does not divide hidden_size"),
    "size-not-an-integer": (_config(hidden_size=32.5), "hidden_size must be a positive integer, found float 32.5"),
    "size-a-string": (_config(intermediate_size="64"), "intermediate_size must be a positive integer, found str"),
    "size-a-boolean": (_config(num_hidden_layers=True), "num_hidden_layers must be a positive integer, found bool"),
    "size-negative": (_config(vocab_size=-3), "vocab_size must be a positive integer"),
    "dropout-out-of-range": (_config(hidden_dropout_prob=1.5), "hidden_dropout_prob must be a number in [0, 1]"),
    "eps-a-string": (_config(layer_norm_eps="small"), "layer_norm_eps must be a number > 0"),
    "vocab-random-bytes": (_vocab_only(bytes(range(128, 256)) * 16), "vocab.txt' is not UTF-8 text"),
    "vocab-empty": (_vocab_only(b""), "vocab.txt' is empty"),
    "vocab-without-unknown-token": (_vocab_only(b"[PAD]\n[CLS]\n[SEP]\n[MASK]\nthe\ncat\n"), "cannot be loaded"),
    "tokenizer-json-garbage": (_write("tokenizer.json", b'{"version": "1.0", "model": '), "is not valid JSON"),
    "tokenizer-config-garbage": (_write("tokenizer_config.json", b"not json at all"), "cannot be loaded"),
    # issue 34 (9): a vocab.txt beside the tokenizer.json that is read, damaged or of another vocabulary
    "vocab-garbage-beside-tokenizer-json": (_write("vocab.txt", bytes(range(128, 256)) * 16),
                                            "vocab.txt' is not UTF-8 text"),
    "vocab-of-other-words-beside-tokenizer-json": (_write("vocab.txt", b"[PAD]\nfoo\nbar\n"),
                                                   "vocab.txt' does not match"),
}


# Issue 34 (1, 2, 3, 9): a Llama-family config.json checked in full before any work, each fault named by its field
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
LLAMA_VARIANTS = {
    "kv-heads-not-dividing": (_config(num_key_value_heads=4), "num_key_value_heads 4 does not divide "
                              "num_attention_heads 6"),
    "kv-heads-zero": (_config(num_key_value_heads=0), "num_key_value_heads must be a whole number >= 1, found 0"),
    "rope-garbage": (_config(rope_scaling={"rope_type": "bogus", "factor": "x"}),
                     "rope_scaling: rope type 'bogus' is not supported; supported: default, linear, llama3"),
    "rope-factor-a-string": (_config(rope_parameters={"rope_type": "linear", "factor": "x", "rope_theta": 1e4}),
                             "rope_parameters: factor must be a finite number > 0, found 'x'"),
    "rope-llama3-incomplete": (_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                               "rope type 'llama3' needs low_freq_factor, high_freq_factor, original_max_position"),
    "rope-llama3-band-empty": (_config(rope_scaling={**LLAMA3, "high_freq_factor": 1.0}),
                               "high_freq_factor 1.0 must be above low_freq_factor 1.0"),
    "eps-nan": (_config(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number > 0, found nan"),
    "eps-negative": (_config(rms_norm_eps=-1e-6), "rms_norm_eps must be a finite number > 0, found -1e-06"),
    "theta-zero": (_config(rope_theta=0), "rope_theta must be a finite number > 0, found 0"),
    "theta-zero-in-rope-parameters": (_config(rope_parameters={"rope_type": "default", "rope_theta": 0.0}),
                                      "rope_theta must be a finite number > 0, found 0.0"),
    "head-dim-odd": (_config(head_dim=7), "head_dim is 7: a head size must be even"),
    "head-dim-zero": (_config(head_dim=0), "head_dim must be a whole number >= 1, found 0"),
}


VARIANTS = {"tiny_teacher": TEACHER_VARIANTS, "tiny_llama": LLAMA_VARIANTS}


@pytest.mark.parametrize("teacher,variant", [(t, v) for t, variants in VARIANTS.items() for v in variants])
def test_1_broken_teacher_folder_is_one_line_before_any_work(request, tiny_corpus, tmp_path, capsys, teacher,
                                                              variant):
    mutate, message = VARIANTS[teacher][variant]
    bad = tmp_path / "teacher"
    shutil.copytree(request.getfixturevalue(teacher), bad)
    mutate(bad)
    code, err = in_process("retrain_single_block", ["--block", "0", *map(str, data_args(bad, tiny_corpus)),
                                                     "--out", str(tmp_path / "out")], capsys)
    # before: a traceback (4 BERT faults; a Llama's kv heads, rope), a failure only after the teacher loaded, a
    # config field named as a flag (--block_d_k=7 for head_dim 7), or training to "loss became nan" (eps, theta)
    assert code == 1, err[-3000:]
    line = one_line(err, message, str(bad))
    assert " --" not in line, "a config field reported as a flag"
    assert "teacher " + str(bad) + ":" not in err and not DATA_READ.search(err)  # refused before loading or reading
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("teacher", list(VARIANTS))
def test_1_library_loader_refuses_the_same_folders(request, tmp_path, teacher):
    from models import TeacherError, load_teacher
    from models.hf import check_teacher_files

    for i, (mutate, message) in enumerate(VARIANTS[teacher].values()):
        bad = tmp_path / str(i)
        shutil.copytree(request.getfixturevalue(teacher), bad)
        mutate(bad)
        for check in (check_teacher_files, load_teacher):
            with pytest.raises(TeacherError) as e:
                check(bad)
            assert message in str(e.value) and str(bad) in str(e.value)


def test_1_saved_llama_configs_obey_the_same_rules(tiny_llama):
    """A config rebuilt from a checkpoint's metadata (``ModelConfig.from_dict``) is held to the same rules."""
    from models import load_teacher
    from models.config import ModelConfig

    saved = load_teacher(tiny_llama)[0].config.to_dict()
    assert ModelConfig.from_dict(saved).to_dict() == saved
    for change, message in [({"rms_norm_eps": float("nan")}, "rms_norm_eps"), ({"rope_theta": 0.0}, "rope_theta"),
                            ({"num_key_value_heads": 0}, "num_key_value_heads"),
                            ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope type 'yarn'")]:
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_dict({**saved, **change})


def test_2_transformers_messages_never_name_flags(tiny_llama, tmp_path, capsys, monkeypatch):
    """transformers quotes config fields in backticks; the scripts turn backticked settings into flags, so a config
    field like `head_dim` would be reported as --block_d_k, a flag the user never passed."""
    import transformers

    def refuse(*args, **kwargs):
        raise ValueError("RoPE requires an even rotary dimension, but got `head_dim`=7")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    code, err = in_process("retrain_single_block", ["--block", "0", "--teacher", str(tiny_llama), "--device", "cpu",
                                                     "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")],
                           capsys)
    assert code == 1 and "'head_dim'=7" in one_line(err, "config.json") and "--block_d_k" not in err


# ---------------------------------------------------------------------------------------------------------------
# 8. a stop in any phase: 143 (SIGTERM / SIGUSR1) or 130 (SIGINT) and one line, also for a second signal
SIGNAL_AT = r'''
import os, runpy, signal, sys
phase, marks, script, argv = sys.argv[1], sys.argv[2].split("|"), sys.argv[3], sys.argv[4:]
kill = lambda: os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs right after this call returns

if phase == "import":  # while the script imports torch: the old code had no handler yet
    class Hook:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                kill()
            return None
    sys.meta_path.insert(0, Hook())
else:  # once per mark, when the script writes it (a log line, the stop line, "results written")
    class Watch:
        def __init__(self, inner):
            self.inner = inner
        def write(self, text):
            n = self.inner.write(text)
            if marks and marks[0] in text:
                marks.pop(0)
                self.inner.flush()
                kill()
            return n
        def __getattr__(self, key):
            return getattr(self.inner, key)
    sys.stdout, sys.stderr = Watch(sys.stdout), Watch(sys.stderr)
sys.argv = [script, *argv]
if script.startswith("-m"):  # a module entry point: python -m utils.assemble
    runpy.run_module(script[2:], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(script, run_name="__main__")
'''


def _signalled_run(tiny_teacher, tiny_corpus, tmp_path, phase: str, *marks: str) -> subprocess.CompletedProcess:
    argv = ["--block", "0", *data_args(tiny_teacher, tiny_corpus), "--epochs", "1", "--batch-size", "32",
            "--out", tmp_path / "out"]
    return run_python(SIGNAL_AT, phase, "|".join(marks), ROOT / "retrain_single_block.py", *argv)


def _stop_lines(err: str) -> list[str]:
    return [l for l in err.splitlines() if l.startswith(("stopped by", "interrupted"))]


@pytest.mark.slow
def test_8_signal_while_the_script_imports(tiny_teacher, tiny_corpus, tmp_path):
    r = _signalled_run(tiny_teacher, tiny_corpus, tmp_path, "import")
    assert r.returncode == 143, (r.returncode, r.stderr[-2000:])  # before: killed by SIGUSR1 (138 in a shell)
    assert _stop_lines(r.stderr) == ["stopped by SIGUSR1 while starting (nothing to save yet)"] == [last_line(r.stderr)]


@pytest.mark.slow
def test_8_signal_while_python_m_utils_assemble_imports(tiny_teacher, tmp_path):
    r = run_python(SIGNAL_AT, "import", "", "-mutils.assemble", "--teacher", tiny_teacher, "--blocks", tmp_path,
                   "--out", tmp_path / "assembled")
    assert r.returncode == 143, (r.returncode, r.stderr[-2000:])  # before: killed by SIGUSR1 (138 in a shell)
    assert last_line(r.stderr) == "stopped by SIGUSR1 while starting (nothing to save yet)"


@pytest.mark.slow
def test_8_signal_right_after_results_written(tiny_teacher, tiny_corpus, tmp_path):
    r = _signalled_run(tiny_teacher, tiny_corpus, tmp_path, "marks", "results written to")
    assert r.returncode == 143, (r.returncode, r.stderr[-2000:])  # before: killed by SIGUSR1, no line
    assert last_line(r.stdout).startswith("results written to")
    assert _stop_lines(r.stderr) == [last_line(r.stderr)]
    assert "after the results were written: nothing was left to do" in last_line(r.stderr)


@pytest.mark.slow
def test_8_second_signal_after_the_stop_line_before_training(tiny_teacher, tiny_corpus, tmp_path):
    r = _signalled_run(tiny_teacher, tiny_corpus, tmp_path, "marks", "teacher ", "stopped by")
    assert r.returncode == 143, (r.returncode, r.stderr[-2000:])  # before: a traceback and exit 1 (or 138)
    assert "Traceback" not in r.stderr
    assert _stop_lines(r.stderr) == [last_line(r.stderr)]
    assert last_line(r.stderr).startswith("stopped by SIGUSR1 while not training: nothing to save")


@pytest.mark.slow
def test_8_second_signal_after_the_stop_line_of_training(tiny_teacher, tiny_corpus, tmp_path):
    r = _signalled_run(tiny_teacher, tiny_corpus, tmp_path, "marks", "epoch 1/1", "stopped by")
    assert r.returncode == 143, (r.returncode, r.stderr[-2000:])  # before: killed by the second SIGUSR1, 138
    assert _stop_lines(r.stderr) == [last_line(r.stderr)]
    assert last_line(r.stderr).startswith("stopped by SIGUSR1 at epoch 1, step ")
    assert list((tmp_path / "out").rglob("resume/meta.json"))  # the resume point of the first stop


def test_8_signal_while_weights_load_is_a_stop_not_a_teacher_error(tiny_teacher, tiny_corpus, tmp_path, capsys,
                                                                   monkeypatch):
    import models.hf

    real = models.hf.read_state_dict

    def read_state_dict(folder):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the reader's `except Exception`
        return real(folder)

    monkeypatch.setattr(models.hf, "read_state_dict", read_state_dict)
    code, err = in_process("retrain_single_block", ["--block", "0", *map(str, data_args(tiny_teacher, tiny_corpus)),
                                                     "--out", str(tmp_path / "out")], capsys)
    assert code == 143, err[-2000:]  # before: "error: teacher weights ... cannot be read: stopped by SIGTERM", exit 1
    assert last_line(err).startswith("stopped by SIGTERM while not training")


def test_8_signal_after_the_loops_last_check_is_not_lost(tmp_path, capsys, monkeypatch):
    import argparse

    from utils.cli.run import run_main
    from utils.training.loop import Trainer

    real = Trainer._end_epoch

    def end_epoch(self, epoch, *args):
        metrics = real(self, epoch, *args)
        if epoch + 1 == self.cfg.epochs:  # after the loop's last look at the stop requests
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(Trainer, "_end_epoch", end_epoch)

    def main(args):
        trainer, _ = toy_trainer(tmp_path, epochs=1)
        trainer.fit(toy_batches())
        return tmp_path

    code = run_main(main, argparse.ArgumentParser(), [])
    err = capsys.readouterr().err
    assert code == 143, err[-2000:]  # before: 0, the stop was dropped
    assert last_line(err).startswith("stopped by SIGTERM while not training")


def slurm_script(job: str | None = None) -> str:
    """The SLURM batch script of docs/jobs.md, its python command replaced by ``job`` if given."""
    text = (ROOT / "docs" / "jobs.md").read_text()
    start = text.index("```bash\n#!/bin/bash\n") + len("```bash\n")
    script = text[start:text.index("```", start)]
    if job is not None:
        first = script.index("python retrain_single_block.py")
        end = script.index("&\n", first)
        script = script[:first] + job + " " + script[end:]
    return script


FAKE_JOB = r'''
import os, signal, sys, time
mode = os.environ["FAKE_MODE"]
if mode == "fails-at-once":
    sys.exit(1)
if mode == "exits-143":
    signal.signal(signal.SIGUSR1, lambda *a: sys.exit(143))
if mode == "finished-anyway":
    signal.signal(signal.SIGUSR1, lambda *a: sys.exit(0))
# "killed-by-the-signal": no handler, as Python before its handlers are installed
open(os.environ["FAKE_READY"], "w").write(str(os.getpid()))
while True:  # not signal.pause(): a signal that lands before pause() is entered would leave it waiting for another
    time.sleep(0.05)
'''


def _run_batch_script(tmp_path: Path, script: str, env: dict[str, str], signal_when_ready: bool
                      ) -> tuple[int, list[str]]:
    """Run the batch script under bash with a stub `scontrol`; send USR1 to the shell (as SLURM does) once the job
    has written its ready file. Returns (exit code, the scontrol calls)."""
    import time

    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    calls = tmp_path / "scontrol_calls"
    (stubs / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    (stubs / "scontrol").chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    env = {**script_env(), "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "0", "FAKE_READY": str(tmp_path / "ready"),
           **env, "PATH": os.pathsep.join([str(stubs), env.get("PATH", os.environ["PATH"])])}
    shell = subprocess.Popen(["bash", str(tmp_path / "job.sh")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    if signal_when_ready:
        deadline = time.monotonic() + 120  # a bound against hanging, not a phase: the file proves the phase
        while not (tmp_path / "ready").exists() and shell.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (tmp_path / "ready").exists(), shell.communicate()[0][-2000:]
        shell.send_signal(signal.SIGUSR1)
    out, _ = shell.communicate(timeout=240)
    return shell.returncode, calls.read_text().split("\n")[:-1] if calls.exists() else []


@pytest.mark.parametrize("mode, code, requeued", [("exits-143", 143, True), ("killed-by-the-signal", 138, True),
                                                  ("finished-anyway", 0, False), ("fails-at-once", 1, False)])
@pytest.mark.slow
def test_8_slurm_script_requeues_after_a_stop_whatever_the_job_did(tmp_path, mode, code, requeued):
    fake_bin = tmp_path / "fake_bin"
    fake_bin.mkdir()
    (tmp_path / "fake_job.py").write_text(FAKE_JOB)
    (fake_bin / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "fake_job.py"}" "$@"\n')
    (fake_bin / "python").chmod(0o755)
    rc, calls = _run_batch_script(tmp_path, slurm_script(),
                                  {"FAKE_MODE": mode, "PATH": f"{fake_bin}:{os.environ['PATH']}"},
                                  signal_when_ready=mode != "fails-at-once")
    assert rc == code  # before: killed-by-the-signal was not requeued; fails-at-once could exit 0
    assert calls == (["requeue 7_0"] if requeued else [])


@pytest.mark.slow
def test_8_slurm_script_requeues_a_real_job_stopped_while_it_starts(tiny_teacher, tiny_corpus, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # the job asks its shell for a stop while it imports torch (as SLURM)
        "import os, signal, sys\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            sys.meta_path.remove(self)\n"
        "            open(os.environ['FAKE_READY'], 'w').write('importing torch')\n"
        "            os.kill(os.getppid(), signal.SIGUSR1)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hook())\n")
    job = " ".join(["python", str(ROOT / "retrain_single_block.py"), "--block", "0",
                    *map(str, data_args(tiny_teacher, tiny_corpus)), "--epochs", "1", "--out", str(tmp_path / "out")])
    env = {"PYTHONPATH": str(hook), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    rc, calls = _run_batch_script(tmp_path, slurm_script(job), env, signal_when_ready=False)
    assert (tmp_path / "ready").read_text() == "importing torch"
    assert rc == 143 and calls == ["requeue 7_0"]  # before: 138 and not requeued
