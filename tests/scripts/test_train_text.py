"""--train-text end to end on a tiny decoder: a unit trains on the mixture, its run.json names the mixture, and a
resume with a changed mixture is refused in one line (the setup differs)."""
from __future__ import annotations

import json

from helpers import common_args, in_process, make_sentences


def test_a_unit_trains_on_a_mixture_and_a_changed_mixture_does_not_resume(tiny_llama, tiny_corpus, tmp_path, capsys):
    chat = tmp_path / "chat"
    chat.mkdir()
    (chat / "replies.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in make_sentences(80, seed=4)))
    argv = [*common_args(tiny_llama, tiny_corpus), "--seq-len", "16", "--block", "0", "--kv-heads", "1", "--epochs",
            "1", "--out", str(tmp_path / "out"), "--run-name", "mix"]
    code, err = in_process("retrain_single_block", [*argv, "--train-text", f"chat={chat}:2"], capsys)
    assert code == 0, err
    (run_json,) = (tmp_path / "out" / "mix").rglob("run.json")
    setup = json.loads(run_json.read_text())["setup"]
    assert setup["train_texts"] == [{"name": "chat", "path": str(chat), "weight": 2.0}] and setup["data_weight"] == 1
    code, err = in_process("retrain_single_block", [*argv, "--train-text", f"chat={chat}:3", "--resume"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: --resume: the training setup differs") and "train_texts:" in last
