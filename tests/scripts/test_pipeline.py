"""End to end on tiny models, through the scripts' own entry points (in-process, so it stays fast)."""
from __future__ import annotations

import json

import pytest
import torch

import eval_merge_layer
import eval_merged_12
import finetune_merged
import retrain_merge
import retrain_single_block
from utils import assemble
from utils.training.students import load_model
from helpers import common_args
from helpers import run_in_process as _run


def test_blocks_assemble_evaluate(tiny_teacher, tiny_corpus, tmp_path, capsys):
    c = common_args(tiny_teacher, tiny_corpus)
    assert _run(retrain_single_block, c + ["--block", "all", "--heads", "2", "--head-dim", "4", "--epochs", "2",
                                           "--out", str(tmp_path), "--run-name", "r", "--cache-teacher",
                                           "--cache-dir", str(tmp_path / "cache"), "--print-samples"]) == 0
    out = capsys.readouterr().out
    assert "GT:" in out and "TEACHER:" in out  # --print_samples
    for i in (0, 1):
        meta = json.loads((tmp_path / "r" / f"block_{i}" / "best" / "meta.json").read_text())
        assert meta["kind"] == "block" and meta["layer"] == i and meta["num_heads"] == 2 and meta["head_dim"] == 4
    for i in (0, 1):  # each block owns its state: tensorboard log, run record, resume point
        unit = tmp_path / "r" / f"block_{i}"
        assert (unit / "tb").is_dir() and (unit / "resume" / "meta.json").is_file()
        assert json.loads((unit / "run.json").read_text())["unit"] == f"block_{i}"
    assert assemble.main(["--teacher", str(tiny_teacher), "--blocks", str(tmp_path / "r"),
                          "--out", str(tmp_path / "asm")]) == 0
    assert _run(eval_merged_12, c + ["--model", str(tmp_path / "asm"), "--out", str(tmp_path / "ev"),
                                     "--judge", str(tiny_teacher), "--percentage_data", "0.5"]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]
    assert res["sentences"] == 32  # half of the 64 test sentences
    for k in ("teacher_top1", "student_top10", "agreement_top1", "kl_teacher_student", "hidden_cosine",
              "teacher_in_judge_top1", "student_in_judge_top10", "student_latency_ms_per_batch"):
        assert k in res
    assert res["teacher_in_judge_top1"] == 1.0  # the judge is the teacher itself
    assert res["student_params"] < res["teacher_params"]
    lines = (tmp_path / "ev" / "predictions.tsv").read_text().splitlines()
    assert len(lines) == 33 and lines[0].startswith("index\ttrue\tteacher\tstudent\tjudge_top10")


def test_teacher_without_mlm_head_end_to_end(tiny_encoder, tiny_corpus, tmp_path, capsys):
    c = common_args(tiny_encoder, tiny_corpus)
    assert _run(retrain_single_block, c + ["--block", "all", "--heads", "2", "--epochs", "1", "--out", str(tmp_path),
                                           "--run-name", "r"]) == 0
    assert assemble.main(["--teacher", str(tiny_encoder), "--blocks", str(tmp_path / "r"),
                          "--out", str(tmp_path / "asm")]) == 0
    assert _run(eval_merged_12, c + ["--model", str(tmp_path / "asm"), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "no masked-LM head" in out
    payload = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert "hidden_cosine" in payload["metrics"] and "teacher_top1" not in payload["metrics"]
    # MLM-only objectives refuse with a clear message
    assert _run(retrain_single_block, c + ["--block", "0", "--loss-on", "mlm", "--out", str(tmp_path)]) == 1
    assert "masked-LM head" in capsys.readouterr().err


def test_merge_eval_conditioned_finetune_export(tmp_path, tiny_corpus, capsys):
    from helpers import make_hf_teacher
    from transformers import BertForMaskedLM

    teacher = make_hf_teacher(tmp_path / "t4", layers=4)
    c = common_args(teacher, tiny_corpus)
    assert _run(retrain_merge, c + ["--block", "0", "--block_heads", "4", "--block_d_k", "8", "--epochs", "1",
                                    "--out", str(tmp_path), "--run-name", "m"]) == 0
    assert _run(eval_merge_layer, c + ["--block", "0", "--block_heads", "4", "--block_d_k", "8",
                                       "--search", str(tmp_path / "m"), "--out", str(tmp_path / "evm")]) == 0
    res = json.loads((tmp_path / "evm" / "results.json").read_text())
    assert res["pair"] == [0, 1] and res["metrics"]["student_params"] < res["metrics"]["teacher_params"]
    # conditioned: pair (2, 3) is trained on the output of the model whose pair (0, 1) is merged
    assert _run(retrain_merge, c + ["--block", "2", "--conditioned", "--conditioned-on", str(tmp_path / "m"),
                                    "--init", "average", "--epochs", "1", "--out", str(tmp_path),
                                    "--run-name", "m"]) == 0
    meta = json.loads((tmp_path / "m" / "merge_2" / "best" / "meta.json").read_text())
    assert meta["conditioned"] and meta["layers"] == [2, 3]
    # all pairs, conditioned, with the teacher cache: pair (0, 1) reads its input from the cache, (2, 3) from it
    assert _run(retrain_merge, c + ["--block", "all-pairs", "--conditioned", "--cache-teacher", "--cache-dir",
                                    str(tmp_path / "cache"), "--epochs", "1", "--out", str(tmp_path),
                                    "--run-name", "mc"]) == 0
    assert {p.parent.parent.name for p in (tmp_path / "mc").rglob("best/meta.json")} == {"merge_0", "merge_2"}
    # a later pair without its earlier ones is refused
    capsys.readouterr()
    assert _run(retrain_merge, c + ["--block", "2", "--conditioned", "--conditioned-on", str(tmp_path / "empty_run"),
                                    "--epochs", "1", "--out", str(tmp_path)]) == 1
    hf_dir = tmp_path / "hf"
    assert _run(finetune_merged, c + ["--merged", str(tmp_path / "m"), "--epochs", "2", "--out", str(tmp_path),
                                      "--hidden-weight", "0.5", "--export-hf", str(hf_dir)]) == 0
    best = tmp_path / "finetune_merged" / "model" / "best"
    meta = json.loads((best / "meta.json").read_text())
    assert [l["origin"] for l in meta["config"]["layers"]] == [[0, 1], [2, 3]]
    assert json.loads((tmp_path / "finetune_merged" / "eval"
                       / "results.json").read_text())["metrics"]["sentences"] == 64
    # the Hugging Face export loads with from_pretrained and gives the same outputs
    model, _ = load_model(best)
    hf = BertForMaskedLM.from_pretrained(str(hf_dir)).eval()
    ids = torch.randint(5, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids).logits).abs().max() < 1e-4


def test_bad_block_is_argparse_error(tiny_teacher, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _run(retrain_single_block, ["--block", "7", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "layers 0..1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
