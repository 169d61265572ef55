"""The teacher cache as its own job (issue 20, item 7): --cache-only builds exactly the features the given units
read, with the teacher spread over a device map (here every module on "cpu": the multi-device code path on one
device), and later per-unit jobs read them without building anything."""
from __future__ import annotations

import json

import numpy as np
import pytest

import retrain_merge
import retrain_single_block
from helpers import run_in_process

DATA = ["--seq-len", "16", "--batch-size", "4", "--device", "cpu"]


def _files(cache) -> dict[str, tuple[int, int]]:
    """Each feature file of the one cache folder under ``cache``: (inode, mtime), which a rebuild changes."""
    (folder,) = [d for d in cache.iterdir() if d.is_dir()]
    return {f.stem: (f.stat().st_ino, f.stat().st_mtime_ns) for f in folder.glob("*.npy")}


@pytest.fixture()
def device_map(tmp_path):
    layers = {f"model.layers.{i}": "cpu" for i in range(4)}
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "lm_head": "cpu"}))
    return path


def test_cache_only_builds_the_requested_features_and_per_unit_jobs_reuse_them(tiny_llama, tiny_corpus, tmp_path,
                                                                               device_map, capsys):
    common = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--cache-dir", str(tmp_path / "cache"),
              "--out", str(tmp_path / "out"), *DATA]
    spread = ["--teacher-device-map", str(device_map), "--cache-only"]
    assert run_in_process(retrain_single_block, ["--block", "2", *spread, *common]) == 0
    assert "in_2, block_2" in capsys.readouterr().out
    assert set(_files(tmp_path / "cache")) == {"in_2", "block_2"}
    assert not (tmp_path / "out").exists()  # nothing trained, no unit claimed
    assert run_in_process(retrain_merge, ["--block", "0", *spread, *common]) == 0
    assert run_in_process(retrain_merge, ["--block", "2", "--conditioned", *spread, *common]) == 0  # in_2: there
    before = _files(tmp_path / "cache")
    assert set(before) == {"in_2", "block_2", "out_1", "in_0", "out_3"}
    train = ["--epochs", "1", "--max-steps-per-epoch", "2", "--cache-teacher"]
    assert run_in_process(retrain_single_block, ["--block", "2", "--block_heads", "4", *train, *common]) == 0
    assert run_in_process(retrain_merge, ["--block", "0", *train, *common]) == 0
    assert _files(tmp_path / "cache") == before  # read, not rebuilt, and nothing added
    # the features built with the teacher spread over the map are those of the teacher on one device
    plain = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--cache-dir", str(tmp_path / "plain"),
             "--out", str(tmp_path / "out"), "--cache-only", *DATA]
    assert run_in_process(retrain_single_block, ["--block", "2", *plain]) == 0
    (a,), (b,) = [d for d in (tmp_path / "cache").iterdir()], [d for d in (tmp_path / "plain").iterdir()]
    assert a.name == b.name and np.array_equal(np.load(a / "block_2.npy"), np.load(b / "block_2.npy"))


@pytest.mark.parametrize("given,expected", [
    ("nope.json", "no such file"),
    ("[1]", "must map module names to devices"),
    ('{"model.layers.0": "cpu"}', "no device for model.embed_tokens, model.layers.1"),
    ('{"": "disk"}', "not supported here"),
    ("somewhere", "must be auto, balanced, sequential or a JSON file"),
    # issue 34 (6): before, "Torch not compiled with CUDA enabled" and "this is a bug" once the teacher had loaded
    ('{"model.embed_tokens": "cpu", "model.layers.1": "cuda:99", "lm_head": 0}', "module 'model.layers.1' is placed "
     "on 'cuda:99' (and 1 more modules): "),
    ('{"": "gpu7"}', "module '(the whole model)' is placed on 'gpu7': not a device"),
])
def test_bad_device_maps_are_one_line(tiny_llama, tiny_corpus, tmp_path, capsys, given, expected):
    arg = given
    if given.startswith(("[", "{")):
        arg = str(tmp_path / "map.json")
        (tmp_path / "map.json").write_text(given)
    argv = ["--block", "0", "--cache-only", "--teacher-device-map", arg, "--teacher", str(tiny_llama), "--data-dir",
            str(tiny_corpus), "--out", str(tmp_path / "out"), *DATA]
    try:
        code = run_in_process(retrain_single_block, argv)  # a map refused once the teacher is loaded
    except SystemExit as e:  # a map refused by argparse, before anything is loaded
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1] and "--teacher-device-map" in err[-1] and "Traceback" not in "\n".join(err)
    assert not list(tmp_path.glob("out/blocks_*"))


def test_device_map_devices_are_checked_before_the_teacher_loads(tiny_llama, monkeypatch):
    """Issue 34 (6): a device torch does not see, or a GPU index beyond those it sees, is named with its module by
    the library too (here a machine with one CUDA device is pretended: no test machine is assumed to have one)."""
    import torch

    from utils import api, session
    from utils.runtime import device_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(session, "load_teacher", None)  # never reached
    assert device_problem("cuda:0") is None and device_problem(0) is None and device_problem("cpu") is None
    assert "torch sees 1 CUDA device(s), cuda:0..0" in device_problem("cuda:5")
    with pytest.raises(api.SettingError, match=r"module 'model.layers.2' is placed on 5: there is no such device"):
        api.load_teacher(str(tiny_llama), device="cpu", teacher_device_map={"model.layers.2": 5, "": "cpu"})


def test_cache_features_from_python_refuses_what_it_cannot_build(tiny_llama, tmp_path):
    from utils import api

    cfg = api.SessionConfig(teacher=str(tiny_llama), device="cpu")
    with pytest.raises(api.SettingError, match="`units` must be blocks or pairs"):
        api.cache_features(cfg, units="heads", cache_dir=str(tmp_path))
    with pytest.raises(api.SettingError, match="a pair starts at 0..2"):
        api.cache_features(cfg, units="pairs", layers=[3], cache_dir=str(tmp_path))
