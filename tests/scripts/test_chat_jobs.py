"""Chat end to end (issue 32): eval_merged_12.py and plan_student.py --chat-prompts on a tiny instruct decoder, a
masked-LM teacher refused in one line, and write_teacher_text.py (records, the same bytes on a rerun, resumed after an
interrupted chunk and after SIGTERM)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, in_process, last_line, restored_logging, run_in_process, script_cmd, script_env
from utils.data.text import read_documents
from utils.storage.checkpoint import read_meta

PROMPTS = ["the cat sees the dog", "the old king builds the ship", "the red bird", "the queen likes the song",
           "the army follows the king"]


def _prompt_file(folder: Path, prompts: list[str] = PROMPTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return f


@pytest.fixture(scope="module")
def chat_student(tiny_chat_llama, tmp_path_factory):
    """A model checkpoint of the chat teacher with one layer's feed-forward part perturbed."""
    from models import load_teacher, weights_hash
    from utils.training.students import save_model

    teacher, _ = load_teacher(tiny_chat_llama)
    h = weights_hash(teacher)
    with torch.no_grad():
        teacher.layers[2].mlp.down_proj.weight.mul_(3.0)
    return save_model(teacher, tmp_path_factory.mktemp("student") / "model",
                      {"teacher": str(tiny_chat_llama), "teacher_hash": h, "sources": []})


def _common(teacher: Path, corpus: Path) -> list[str]:
    return ["--teacher", str(teacher), "--data-dir", str(corpus), "--device", "cpu", "--seq-len", "16"]


def test_eval_merged_12_compares_chat_replies(tiny_chat_llama, tiny_corpus, chat_student, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = [*_common(tiny_chat_llama, tiny_corpus), "--model", str(chat_student), "--out", str(out), "--max-batches",
            "1", "--chat-prompts", str(_prompt_file(tmp_path)), "--chat-max-new-tokens", "6", "--chat-batch-size", "2"]
    code, err = in_process("eval_merged_12", argv, capsys)
    assert code == 0, err[-3000:]
    chat = json.loads((out / "results.json").read_text())["chat"]
    assert chat["prompts"] == len(PROMPTS) and chat["max_new_tokens"] == 6
    assert chat["end_of_turn"] == {"ids": [34], "tokens": ["<|im_end|>"], "from": "generation_config.json eos_token_id"}
    assert 0 <= chat["exact_match"] <= 1 and chat["teacher_forced"]["tokens"] > 0
    assert chat["teacher_forced"]["kl_teacher_student"] > 0  # the perturbed layer shows on the teacher's replies
    assert len((out / "chat_replies.jsonl").read_text().splitlines()) == len(PROMPTS)
    assert "| prompt | teacher | student |" in (out / "chat.md").read_text()


def test_plan_student_compares_the_healed_student_chat(tiny_chat_llama, tiny_corpus, tmp_path, capsys):
    import plan_student
    from utils import api

    data = api.DataConfig(data_dir=str(tiny_corpus), seq_len=16, batch_size=8)
    api.sensitivity_map(api.SessionConfig(teacher=str(tiny_chat_llama), device="cpu", data=data),
                        config=api.MapConfig(options=("kv", "drop"), max_train_sentences=32, eval_sentences=16,
                                             valid_batches=1, latency_reps=2, latency_batch=1),
                        train=api.TrainConfig(epochs=1, max_steps_per_epoch=1), out=tmp_path / "map")
    prompts = _prompt_file(tmp_path)
    argv = [*_common(tiny_chat_llama, tiny_corpus), "--batch-size", "8", "--out", str(tmp_path), "--run-name", "p",
            "--map", str(tmp_path / "map"), "--target-kv-cache", "1/2", "--ft-epochs", "1", "--ft-max-steps", "1",
            "--max-steps-per-epoch", "1", "--max-train-sentences", "32", "--chat-prompts", str(prompts),
            "--chat-max-new-tokens", "6"]
    with restored_logging():
        assert run_in_process(plan_student, argv) == 0
    chat = json.loads((tmp_path / "p" / "results.json").read_text())["chat"]
    assert chat["prompts_file"] == str(prompts) and chat["prompts"] == len(PROMPTS) and chat["max_new_tokens"] == 6
    assert chat["teacher_forced"]["tokens"] > 0 and chat["teacher_forced"]["kl_teacher_student"] > 0
    assert len((tmp_path / "p" / "chat_replies.jsonl").read_text().splitlines()) == len(PROMPTS)
    assert "| prompt | teacher | student |" in (tmp_path / "p" / "chat.md").read_text()
    assert "| first 8 tokens equal |" in capsys.readouterr().out  # the printed report has the chat table
    # --ft-keep-start with a heal that only does harm (lr 1: every weight moved by ~1): the composed student is kept
    keep = [*argv[:argv.index("--chat-prompts")], "--ft-lr", "1", "--ft-keep-start"]
    keep[keep.index("p")] = "k"
    with restored_logging():
        assert run_in_process(plan_student, keep) == 0
    (best,) = (tmp_path / "k").glob("**/model/best")
    meta, last = read_meta(best), read_meta(best.parent / "last")
    assert meta["build"]["heal"]["keep_start"] is True and meta["epoch"] == 0 and last["epoch"] == 1
    assert last["metrics"]["loss"] > meta["metrics"]["loss"]


@pytest.mark.parametrize("module", ["eval_merged_12", "write_teacher_text", "plan_student"])
def test_a_masked_lm_teacher_has_no_chat(tiny_teacher, tiny_corpus, tmp_path, capsys, module):
    argv = ["--teacher", str(tiny_teacher), "--data-dir", str(tiny_corpus), "--device", "cpu", "--out",
            str(tmp_path / "o")]
    argv += {"eval_merged_12": ["--model", str(tmp_path / "none"), "--chat-prompts", "default"],
             "plan_student": ["--target-params", "1e6", "--chat-prompts", "default"]}.get(module, [])
    code, err = in_process(module, argv, capsys)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "an encoder (masked-LM teacher) has no chat" in last_line(err)
    assert sum("error:" in line for line in err.splitlines()) == 1


def _write(teacher: Path, out: Path, prompts: Path, capsys, *extra: str) -> tuple[int, str]:
    return in_process("write_teacher_text", ["--teacher", str(teacher), "--device", "cpu", "--out", str(out),
                                             "--prompts", str(prompts), "--samples-per-prompt", "2", "--chunk-size",
                                             "3", "--batch-size", "2", "--max-new-tokens", "8", *extra], capsys)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_teacher_text_is_written_resumed_and_reproducible(tiny_chat_llama, tmp_path, capsys, monkeypatch):
    import utils.evaluation.teacher_text as tt

    prompts = _prompt_file(tmp_path)
    code, err = _write(tiny_chat_llama, tmp_path / "a", prompts, capsys)
    assert code == 0, err[-3000:]
    full = _files(tmp_path / "a")
    assert sorted(full) == ["chunk-00000.jsonl", "chunk-00001.jsonl", "chunk-00002.jsonl", "chunk-00003.jsonl",
                            "teacher_text.json"]
    docs = read_documents(tmp_path / "a")
    assert len(docs) == 2 * len(PROMPTS)
    assert docs[0].text.startswith("<|im_start|>user\nthe cat sees the dog<|im_end|>\n<|im_start|>assistant\n")
    assert docs[0].text != docs[len(PROMPTS)].text  # the second sample of a prompt is sampled anew

    # a run stopped after its second chunk (as by a signal in the third), then the same command again
    real, calls = tt.answer, []

    def stopping(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            from utils.stops import Stopped
            raise Stopped("stopped by SIGTERM while not training: nothing to save", 143)
        return real(*a, **kw)

    monkeypatch.setattr(tt, "answer", stopping)
    b = tmp_path / "b"
    b.mkdir()
    (b / "chunk-00002.jsonl.tmp.elsewhere.1.deadbeef").write_text('{"text": "half')  # a killed writer's leftover
    code, err = _write(tiny_chat_llama, b, prompts, capsys)
    assert code == 143 and "stopped by SIGTERM" in last_line(err)
    assert sorted(p.name for p in b.glob("*.jsonl")) == ["chunk-00000.jsonl", "chunk-00001.jsonl"]
    monkeypatch.setattr(tt, "answer", real)
    code, err = _write(tiny_chat_llama, b, prompts, capsys)
    assert code == 0, err[-3000:]
    assert {k: v for k, v in _files(b).items() if ".tmp." not in k} == full  # the same bytes as one whole run

    # other settings into the same folder: refused in one line naming the difference; --force starts over
    code, err = _write(tiny_chat_llama, b, prompts, capsys, "--seed", "1")
    assert code == 2 and "seed: 0 there, 1 now" in last_line(err)
    code, err = _write(tiny_chat_llama, b, prompts, capsys, "--seed", "1", "--force")
    assert code == 0 and _files(b)["chunk-00000.jsonl"] != full["chunk-00000.jsonl"]


@pytest.mark.slow
def test_teacher_text_stops_on_sigterm_and_resumes(tiny_chat_llama, tmp_path):
    """A real SIGTERM while it writes: exit 143 with its one line, no partial file under a chunk's name; the rerun
    completes the folder."""
    out, prompts = tmp_path / "t", _prompt_file(tmp_path)
    cmd = script_cmd("write_teacher_text.py", "--teacher", tiny_chat_llama, "--device", "cpu", "--out", out,
                     "--prompts", prompts, "--samples-per-prompt", "40", "--chunk-size", "5", "--max-new-tokens", "16")
    p = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "chunk-00000.jsonl").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-3000:]
    assert "Traceback" not in err and last_line(err).startswith("stopped by SIGTERM")
    written = sorted(out.glob("chunk-*.jsonl"))
    assert 0 < len(written) < 40 and not list(out.glob("*.tmp.*"))
    assert all(len(f.read_text().splitlines()) == 5 for f in written)
    r = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(out.glob("chunk-*.jsonl"))) == 40 and f"{len(written)} already there" in r.stdout
