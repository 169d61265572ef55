"""finetune_merged.py --teacher-topk K (api.finetune with ``FinetuneLoss.teacher_topk``): a decoder's heal reads the
teacher's top-k next tokens from a cache written once per training window. At k = vocabulary it heals to the
weights the live teacher gives; the teacher runs in no training step, and a second run reuses the cache; a bad k is
refused in one line."""
from __future__ import annotations

import logging

import pytest
import torch

from helpers import common_args, in_process, run_parallel
from utils import api


@pytest.fixture(scope="module")
def session(tiny_llama, tiny_corpus):
    return api.load_teacher(str(tiny_llama), data=api.DataConfig(data_dir=str(tiny_corpus), batch_size=8, seq_len=32),
                            device="cpu")


def _heal(session, out, topk: int | None, cache_dir=None) -> tuple[dict[str, torch.Tensor], int]:
    """A 2-epoch heal of the teacher without its last layer: the best weights, and the teacher's forward passes."""
    teacher, calls = session.teacher, []
    hook = teacher.register_forward_pre_hook(lambda m, a: calls.append(1) if m is teacher else None)
    try:
        done = api.finetune(session, checkpoints=[], drop_layers=[3], out=out, cache_dir=cache_dir,
                            objective=api.FinetuneLoss(teacher_topk=topk),
                            train=api.TrainConfig(epochs=2, lr=2e-3, max_steps_per_epoch=3))
    finally:
        hook.remove()
    return done.model.state_dict(), len(calls)


def test_a_heal_from_the_whole_vocabulary_cache_gives_the_live_teachers_weights(session, tmp_path):
    vocab = session.teacher.config.vocab_size
    live, live_calls = _heal(session, tmp_path / "live", None)
    cached, cached_calls = _heal(session, tmp_path / "cached", vocab)
    assert live.keys() == cached.keys()
    worst = max(float((live[k].float() - cached[k].float()).abs().max()) for k in live)
    assert worst < 1e-5
    # the cache pass reads every window once; then no training step (3 per epoch) runs the teacher
    windows = len(session.sentences("train"))
    assert cached_calls == live_calls - 2 * 3 + -(-windows // session.data.batch_size)
    files = sorted((tmp_path / "cached" / "cache").glob("*/top*.npy"))
    assert [f.name for f in files] == [f"top{vocab}_t1_ids.npy", f"top{vocab}_t1_logp.npy"]


def test_a_second_heal_reuses_the_cache(session, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _, first = _heal(session, tmp_path / "a", 8, cache_dir=tmp_path / "cache")
    files = sorted((tmp_path / "cache").glob("*/top8_t1_*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    caplog.clear()
    _, second = _heal(session, tmp_path / "b", 8, cache_dir=tmp_path / "cache")
    assert [f.stat().st_mtime_ns for f in files] == stamps and len(files) == 2
    assert second == first - -(-len(session.sentences("train")) // session.data.batch_size)  # no cache pass
    assert "top8_t1_ids, top8_t1_logp (" in caplog.text and "all reused" in caplog.text


def test_a_bad_k_is_refused_in_one_line(tiny_llama, tiny_teacher, tiny_corpus, tmp_path, capsys):
    args = ["--drop-layers", "3", "--out", str(tmp_path), "--epochs", "1"]
    code, err = in_process("finetune_merged", common_args(tiny_llama, tiny_corpus) + args + ["--teacher-topk", "0"],
                           capsys)
    assert code == 2 and "--teacher-topk" in err and "Traceback" not in err
    code, err = in_process("finetune_merged", common_args(tiny_llama, tiny_corpus) + args +
                           ["--teacher-topk", "100000"], capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert line.split(": error: ")[1].startswith("--teacher-topk must be a whole number from 1 to the teacher's "
                                                 "vocabulary size") and line.endswith("got 100000")
    code, err = in_process("finetune_merged", common_args(tiny_teacher, tiny_corpus) +
                           ["--drop-every-second", "--out", str(tmp_path), "--teacher-topk", "8"], capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.split(": error: ")[1].startswith("--teacher-topk caches next-token")
    code, err = in_process("finetune_merged", common_args(tiny_llama, tiny_corpus) + args +
                           ["--teacher-topk", "8", "--hidden-weight", "1"], capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.endswith("no hidden-state or relation term (on: hidden)")
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.slow
def test_heals_started_together_build_the_cache_once(tiny_llama, tiny_corpus, tmp_path):
    """Two finetune_merged.py --teacher-topk jobs at once on one --cache-dir: one builds, the other waits and reads."""
    def job(name: str) -> tuple[str, list]:
        return "finetune_merged.py", common_args(tiny_llama, tiny_corpus) + [
            "--drop-layers", "3", "--epochs", "1", "--max-steps-per-epoch", "2", "--seq-len", "32", "--out",
            tmp_path / name, "--cache-dir", tmp_path / "cache", "--teacher-topk", "8"]

    runs = run_parallel([job("a"), job("b")])
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    logs = [r.stderr for r in runs]
    assert sum("; built top8_t1_ids, top8_t1_logp" in x for x in logs) == 1
    assert sum("all reused" in x for x in logs) == 1
    assert len(list((tmp_path / "cache").glob("*/top8_t1_*.npy"))) == 2
