"""A sensitivity map stopped after some units (a kill -9, here an error raised between two options) and continued
with ``resume``: the units it finished are reused, and their entries equal an uninterrupted map's, validation loss
included (issue 34.8: they said ``val_loss: null``)."""
from __future__ import annotations

import json

import pytest

import utils.planning.sensitivity as sensitivity
from utils import api
from utils.storage.checkpoint import read_meta

TIMED = ("latency_saved_ms", "unit_ms", "train_s_option")  # wall-clock numbers: they differ from run to run


class Killed(Exception):
    """Stands for the kill -9 between two options."""


def _map(tiny_teacher, tiny_corpus, out, **train):
    session = api.SessionConfig(teacher=str(tiny_teacher), device="cpu",
                                data=api.DataConfig(data_dir=str(tiny_corpus), batch_size=16))
    config = api.MapConfig(options=("heads", "ffn"), heads_set=[2], latency_reps=1, latency_batch=2,
                           eval_sentences=16, valid_batches=1)
    return api.sensitivity_map(session, config=config, out=out,
                               train=api.TrainConfig(epochs=1, max_steps_per_epoch=2, **train))


def _entries(smap: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMED} for e in smap["entries"]]


def test_a_resumed_map_keeps_the_metrics_of_the_units_it_reused(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
    whole = _map(tiny_teacher, tiny_corpus, tmp_path / "whole")
    real, calls = sensitivity.train_units, []

    def killed_at_the_second_option(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise Killed(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "train_units", killed_at_the_second_option)
    with pytest.raises(Killed):
        _map(tiny_teacher, tiny_corpus, tmp_path / "cut", resume=True)
    monkeypatch.undo()
    resumed = _map(tiny_teacher, tiny_corpus, tmp_path / "cut", resume=True)
    assert len(whole["entries"]) == 4 and all(e["val_loss"] is not None for e in resumed["entries"])
    assert _entries(resumed) == _entries(whole)


def test_a_map_whose_first_resume_save_was_cut_short_starts_that_option_again(tiny_teacher, tiny_corpus, tmp_path,
                                                                              monkeypatch):
    """A full disk while an option's units save their first resume point, one after the other: the first unit has
    one, the second none. Before, every --resume refused ("not trained together") until the folder was removed by
    hand; now the option's units start again from scratch and the map equals an uninterrupted one."""
    import errno

    import utils.training.loop as loop

    whole = _map(tiny_teacher, tiny_corpus, tmp_path / "whole")
    real = loop.save_checkpoint

    def full_disk_at_the_second_units_resume_point(directory, *args, **kwargs):
        if str(directory).endswith("block_1/resume"):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", full_disk_at_the_second_units_resume_point)
    with pytest.raises(OSError):
        _map(tiny_teacher, tiny_corpus, tmp_path / "cut", resume=True)
    monkeypatch.undo()
    units = tmp_path / "cut" / "units" / "heads_2"
    assert (units / "block_0" / "resume" / "meta.json").is_file() and not (units / "block_1" / "resume").exists()
    resumed = _map(tiny_teacher, tiny_corpus, tmp_path / "cut", resume=True)
    assert _entries(resumed) == _entries(whole)
    assert {read_meta(units / f"block_{i}" / "resume")["run_id"] for i in (0, 1)} == {
        json.loads((units / "block_0" / "run.json").read_text())["run_id"]}  # one run's points, the new run's


def test_a_resumed_maps_units_are_not_refit_again(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
    """Units that continue from their resume points do not need their start: a resumed map skips the refit of its
    narrower feed-forward units (a teacher pass over the probe each time) and still says how they started."""
    first = _map(tiny_teacher, tiny_corpus, tmp_path, resume=True, ffn_refit_tokens=64)
    ffn = [e for e in first["entries"] if e["option"].startswith("ffn")]
    assert ffn and all("output projection refit on" in e["init"] for e in ffn)
    for f in (tmp_path / "units").glob("ffn*/measured.json"):
        f.unlink()  # measured again: the entries' notes come from the resumed units
    refit: list[int] = []
    rank = sensitivity.neuron_rankings
    monkeypatch.setattr(sensitivity, "neuron_rankings", lambda t, probe, layers, **kw: (
        refit.extend(layers if kw.get("keep_inputs") else []), rank(t, probe, layers, **kw))[1])
    again = _map(tiny_teacher, tiny_corpus, tmp_path, resume=True, ffn_refit_tokens=64)
    assert refit == [] and _entries(again) == _entries(first)
