"""TrainConfig.keep_start (--keep-start, --ft-keep-start): the starting weights are validated and stay ``best``
unless an epoch beats them, with a warning when none does; without it ``best`` is always a trained epoch."""
from __future__ import annotations

import logging

import torch

from helpers import Toy, toy_batches


def _trainer(run_dir, *, lr: float, keep_start: bool = True):
    from utils.training.loop import TrainConfig, Trainer, Unit

    task = Toy()
    unit = Unit("toy", task.lin, run_dir / "toy", {"kind": "block", "teacher_hash": "teacher-a", "num_heads": 1,
                                                   "head_dim": 4, "hidden_size": 4, "layer": 0})
    cfg = TrainConfig(epochs=2, lr=lr, warmup=0.0, seed=0, clip=0.0, keep_start=keep_start)
    return Trainer(task, [unit], cfg, run_dir=run_dir, device=torch.device("cpu"), evaluate=task.evaluate), task


def _weights(folder) -> dict[str, torch.Tensor]:
    from utils.storage.checkpoint import load_checkpoint

    sd, meta, _ = load_checkpoint(folder)
    return {"weights": sd, "meta": meta}


def test_a_run_that_only_makes_validation_worse_returns_its_start_and_says_so(tmp_path, caplog):
    trainer, task = _trainer(tmp_path, lr=5.0)  # AdamW steps of ~5 per weight: validation only gets worse
    start = {k: v.clone() for k, v in task.lin.state_dict().items()}
    start_loss = task.evaluate()["toy/loss"]
    with caplog.at_level(logging.INFO):
        trainer.fit(toy_batches())
    best, last = _weights(tmp_path / "toy" / "best"), _weights(tmp_path / "toy" / "last")
    assert best["meta"]["epoch"] == 0 and best["meta"]["metrics"]["loss"] == start_loss
    assert all(torch.equal(best["weights"][k], start[k]) for k in start)
    assert last["meta"]["epoch"] == 2 and last["meta"]["metrics"]["loss"] > start_loss
    assert "no epoch beat the starting weights" in caplog.text and "start (before the first step)" in caplog.text


def test_a_run_that_helps_replaces_its_start_without_a_warning(tmp_path, caplog):
    trainer, task = _trainer(tmp_path, lr=1e-2)
    start_loss = task.evaluate()["toy/loss"]
    with caplog.at_level(logging.INFO):
        trainer.fit(toy_batches())
    best = _weights(tmp_path / "toy" / "best")
    assert best["meta"]["epoch"] >= 1 and best["meta"]["metrics"]["loss"] < start_loss
    assert "no epoch beat" not in caplog.text


def test_without_keep_start_best_is_a_trained_epoch_even_when_worse(tmp_path, caplog):
    trainer, task = _trainer(tmp_path, lr=5.0, keep_start=False)
    start_loss = task.evaluate()["toy/loss"]
    with caplog.at_level(logging.INFO):
        trainer.fit(toy_batches())
    best = _weights(tmp_path / "toy" / "best")
    assert best["meta"]["epoch"] >= 1 and best["meta"]["metrics"]["loss"] > start_loss
    assert "start (before the first step)" not in caplog.text
