"""bench/plans.py --chat-prompts: every student's greedy chat replies against the teacher's (generated once for all),
with the paired chat tests per target; an encoder teacher is said to have no chat, and the bench goes on."""
from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

from helpers import small_map
from utils.cli.run import run_main

PROMPTS = ["the cat sees the dog", "the old king builds the ship", "the red bird", "the queen likes the song"]


def test_the_bench_compares_every_student_chat_with_the_teacher_generated_once(tiny_chat_llama, tiny_corpus,
                                                                               tmp_path, monkeypatch):
    from bench import plans
    import utils.evaluation.chat as chat

    small_map(tiny_chat_llama, tiny_corpus, tmp_path / "map")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    real, answered = chat.answer, []

    def counted(model, *a, **kw):
        answered.append(model)
        return real(model, *a, **kw)

    monkeypatch.setattr(chat, "answer", counted)
    read = []  # each student is read from its folder once: scored, chatted and timed while in memory

    def reading(folder, *a, **kw):
        read.append(str(folder))
        return real_load(folder, *a, **kw)

    real_load = plans.load_model
    monkeypatch.setattr(plans, "load_model", reading)
    argv = ["--quick", "--teacher", str(tiny_chat_llama), "--data-dir", str(tiny_corpus), "--out", str(tmp_path),
            "--run-name", "b", "--map", str(tmp_path / "map"), "--targets", "none", "--kv-targets", "0.5",
            "--device", "cpu", "--chat-prompts", str(tmp_path / "prompts.jsonl"), "--chat-max-new-tokens", "6"]
    assert run_main(plans.main, plans.build_parser(), argv) == 0
    res = json.loads((tmp_path / "b" / "plans.json").read_text())
    c = res["chat"]
    plans_scored = {row["plan"] for row in res["rows"]}
    assert set(c["metrics"]) == plans_scored and c["prompts"] == len(PROMPTS) and c["reply_tokens"] > 0
    # the teacher answered once, every distinct student once: no model generated twice
    assert len(answered) == len(plans_scored) + 1 == len({id(m) for m in answered})
    assert len(read) == len(set(read)) == len(plans_scored)
    for m in c["metrics"].values():
        assert 0 <= m["first8_match"] <= 1 and 0 <= m["teacher_forced"]["agreement_top1"] <= 1
        assert m["teacher_forced"]["tokens"] == c["reply_tokens"]
    rivals = {row["method"] for row in res["rows"]} - {"planned", "planned, untrained"}
    assert {x["against"] for x in c["tests"]} == rivals and {"ShortGPT", "SLEB"} <= rivals
    for x in c["tests"]:
        assert x["first8_match"]["only_a"] + x["first8_match"]["only_b"] <= len(PROMPTS)
        assert x["nll_sign"]["a_lower"] + x["nll_sign"]["a_higher"] + x["nll_sign"]["ties"] == c["reply_tokens"]
    md = (tmp_path / "b" / "plans.md").read_text()
    assert "| planned vs ShortGPT | " in md.split("### Chat at KV 0.5")[1]
    for plan in plans_scored:  # each model's replies beside the teacher's, in its folder
        folder = tmp_path / "b" / f"model_{hashlib.sha1(plan.encode()).hexdigest()[:10]}"
        assert len((folder / "chat" / "chat_replies.jsonl").read_text().splitlines()) == len(PROMPTS)


def test_an_encoder_teacher_has_no_chat_and_the_bench_goes_on(capsys):
    from bench import plans

    args = plans.build_parser().parse_args(["--map", "m", "--chat-prompts", "default"])
    assert plans.bench_chat_config(SimpleNamespace(args=args, causal=False)) is None
    assert capsys.readouterr().out.strip().splitlines() == [
        "chat: an encoder (masked-LM teacher) has no chat; --chat-prompts is left out"]
    assert plans.bench_chat_config(SimpleNamespace(args=args, causal=True)).prompts == "default"
