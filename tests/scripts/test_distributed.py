"""Data parallelism under torchrun: 2 CPU processes (gloo) against one process on the same global batch.

One process with --batch-size 16 and two processes with --batch-size 8 see the same global batches (the sampler
builds global batches and deals them out), and each rank's loss is weighted by its share of the global token count,
so the trained weights agree up to float rounding. Evaluation sums counts over ranks: a two-process evaluation
reports the same counts and the same per-sentence predictions as a single process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import ROOT, make_hf_teacher, write_corpus

# measured on 2 CPU cores: max |single - two processes| ~1e-8; without the per-rank token weighting ~1e-5
WEIGHT_TOL = 1e-6
TEST_SENTENCES = 41  # odd, and not a multiple of the global batch: the two ranks get unequal shares

pytestmark = [pytest.mark.slow,  # torchrun: several processes per test
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with the gloo backend is not available in this build")]


def _torchrun(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _in_process(module_name: str, argv: list[str]) -> None:
    """A plain single-process run of a script's main, as ``python script.py ...`` would do it."""
    import importlib

    mod = importlib.import_module(module_name)
    parser = mod.build_parser()
    main = mod.main if module_name == "eval_merged_12" else (lambda a: mod.main(a, parser))
    from utils.cli.run import run_main

    assert run_main(main, parser, argv) == 0


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # no dropout: each rank draws its own dropout masks, so only deterministic training can match bit for bit
    teacher = make_hf_teacher(root / "teacher", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # 125 training sentences: 7 global batches of 16 and a last one of 13, split 7 / 6 between the ranks
    corpus = write_corpus(root / "corpus", n_train=125, n_valid=37, n_test=TEST_SENTENCES)
    return root, teacher, corpus


def test_two_processes_train_like_one_and_resume(setup):
    root, teacher, corpus = setup
    common = ["--teacher", str(teacher), "--data-dir", str(corpus), "--block", "all", "--heads", "2",
              "--seq-len", "16", "--device", "cpu", "--lr", "1e-3", "--schedule", "constant", "--warmup", "0",
              "--run-name", "run"]
    # one process, global batch 16, two epochs
    _in_process("retrain_single_block", [*common, "--batch-size", "16", "--epochs", "2", "--out", str(root / "one")])
    # two processes x batch 8: one epoch, then resumed for the second (constant schedule: same LR either way)
    first = _torchrun("retrain_single_block.py", [*common, "--batch-size", "8", "--epochs", "1",
                                                  "--out", str(root / "two")])
    second = _torchrun("retrain_single_block.py", [*common, "--batch-size", "8", "--epochs", "2", "--resume",
                                                   "--out", str(root / "two")])
    assert "continuing at epoch 2" in second.stderr

    # rank 0 alone prints, logs at INFO and writes (one tensorboard file per launch, not per process)
    for proc in (first, second):
        assert proc.stdout.count("results written to") == 1
        assert proc.stderr.count("INFO teacher ") == 1
    for block in ("block_0", "block_1"):  # each unit logs to its own folder
        assert len(list((root / "two" / "run" / block / "tb").glob("events.out.tfevents.*"))) == 2

    worst = 0.0
    for block in ("block_0", "block_1"):
        one = _weights(root / "one" / "run" / block / "last")
        two = _weights(root / "two" / "run" / block / "last")
        assert one.keys() == two.keys()
        worst = max(worst, max((one[k] - two[k]).abs().max().item() for k in one))
        m1 = json.loads((root / "one" / "run" / block / "last" / "meta.json").read_text())
        m2 = json.loads((root / "two" / "run" / block / "last" / "meta.json").read_text())
        assert m2["epoch"] == 2
        # validation loss: per-rank (loss x tokens, tokens) sums, all-reduced, divided once
        assert m2["metrics"]["loss"] == pytest.approx(m1["metrics"]["loss"], rel=1e-5)
    print(f"max |weight difference| one process vs two processes (with resume): {worst:.2e}")
    assert worst < WEIGHT_TOL


def test_two_process_evaluation_counts_add_up(setup):
    root, teacher, corpus = setup
    common = ["--teacher", str(teacher), "--data-dir", str(corpus), "--seq-len", "16", "--device", "cpu"]
    # fine-tune under torchrun; its final test-split comparison runs on both ranks and is reduced
    _torchrun("finetune_merged.py", [*common, "--drop-every-second", "--epochs", "1", "--batch-size", "8",
                                     "--run-name", "ft", "--out", str(root / "ft")])
    two_dir = root / "ft" / "ft" / "eval"
    # the same model evaluated by one process with the global batch size
    _in_process("eval_merged_12", [*common, "--batch-size", "16", "--model", str(root / "ft" / "ft" / "model" / "best"),
                                   "--out", str(root / "eval_one")])
    one = json.loads((root / "eval_one" / "results.json").read_text())["metrics"]
    two = json.loads((two_dir / "results.json").read_text())["metrics"]

    assert two["sentences"] == one["sentences"] == TEST_SENTENCES
    count_keys = [k for k in one if k.endswith(("_top1", "_top5", "_top10"))] + ["agreement_top1"]
    assert "student_top1" in count_keys
    for k in count_keys:  # fractions of correct sentences: the counts themselves must agree exactly
        assert round(two[k] * TEST_SENTENCES) == round(one[k] * TEST_SENTENCES), k
        assert two[k] == pytest.approx(one[k], abs=1e-12), k
    for k in ("hidden_cosine", "hidden_mse", "kl_teacher_student"):  # float sums: only the order of addition differs
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-9), k
    # every rank's sentences make it into the predictions file, in a single process's order
    assert (two_dir / "predictions.tsv").read_text() == (root / "eval_one" / "predictions.tsv").read_text()
    assert len((two_dir / "predictions.tsv").read_text().splitlines()) == TEST_SENTENCES + 1
