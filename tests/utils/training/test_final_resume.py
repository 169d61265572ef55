"""TrainConfig.keep_final_resume: a finished run keeps its resume point (a later run may grow ``epochs``) unless told
not to, when it removes it (and the previous point) and keeps ``best`` and ``last``; a run stopped part-way keeps its
point either way (a plan's heal, which never continues a finished run, turns it off)."""
from __future__ import annotations

import dataclasses

import pytest

from helpers import STEPS, Toy, toy_batches, toy_trainer


def _without_final_resume(trainer):
    trainer.cfg = dataclasses.replace(trainer.cfg, keep_final_resume=False)
    return trainer


def test_a_finished_run_keeps_its_resume_point_by_default(tmp_path):
    trainer, _ = toy_trainer(tmp_path, epochs=2)
    trainer.fit(toy_batches())
    resume = tmp_path / "toy" / "resume"
    assert (resume / "meta.json").is_file() and (resume / "train_state.pt").is_file()


def test_without_keep_final_resume_a_finished_run_removes_it_and_keeps_best_and_last(tmp_path):
    trainer, task = toy_trainer(tmp_path, epochs=2)
    metrics = _without_final_resume(trainer).fit(toy_batches())
    unit = tmp_path / "toy"
    assert task.calls == 2 * STEPS and metrics["toy/loss"] > 0
    assert not (unit / "resume").exists() and not (unit / "resume.old").exists()
    assert not any(p.name.startswith("resume") for p in unit.iterdir())
    assert (unit / "best" / "meta.json").is_file() and (unit / "last" / "meta.json").is_file()


def test_a_run_grown_from_a_kept_point_continues_and_then_removes_it(tmp_path):
    from utils.storage.checkpoint import read_meta

    first, _ = toy_trainer(tmp_path, epochs=1)
    first.fit(toy_batches())
    assert (tmp_path / "toy" / "resume" / "meta.json").is_file()
    grown, task = toy_trainer(tmp_path, epochs=2, resume=True)
    _without_final_resume(grown).fit(toy_batches())
    assert grown.start_epoch == 1 and task.calls == STEPS  # only the new epoch trained
    assert not (tmp_path / "toy" / "resume").exists()
    assert read_meta(tmp_path / "toy" / "last")["epoch"] == 2


def test_a_run_stopped_part_way_keeps_its_point_without_keep_final_resume(tmp_path):
    from utils.training.loop import TrainingDiverged
    from utils.storage.checkpoint import read_meta

    trainer, _ = toy_trainer(tmp_path, Toy(nan_loss_at=STEPS + 2), epochs=3)  # stops in the second epoch
    with pytest.raises(TrainingDiverged):
        _without_final_resume(trainer).fit(toy_batches())
    assert read_meta(tmp_path / "toy" / "resume")["epoch"] == 1
