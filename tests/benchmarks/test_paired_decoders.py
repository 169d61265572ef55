"""bench/paired_decoders.py: saved decoder students against a reference on the same test tokens."""
from __future__ import annotations

import json

import pytest

from models import load_teacher
from models.hf import weights_hash
from models.compress import clone_model, drop_every_second
from utils.cli.run import run_main
from utils.training.students import save_model


def test_students_are_compared_token_by_token(tiny_llama, tiny_corpus, tmp_path, capsys):
    from bench import paired_decoders

    teacher, _ = load_teacher(str(tiny_llama))
    meta = {"teacher": str(tiny_llama), "teacher_hash": weights_hash(teacher)}
    save_model(clone_model(teacher), tmp_path / "same", meta)
    save_model(clone_model(drop_every_second(teacher)[0]), tmp_path / "half", meta)
    argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--seq-len", "16", "--test-fraction", "1",
            "--models", f"same={tmp_path / 'same'}", f"half={tmp_path / 'half'}", "--reference", "same",
            "--out", str(tmp_path / "out"), "--hf-check"]
    parser = paired_decoders.build_parser()
    assert run_main(lambda a: paired_decoders.main(a, parser), parser, argv) == 0
    res = json.loads((tmp_path / "out" / "paired.json").read_text())
    n = res["tokens"]
    # the teacher's own copy: its perplexity, full agreement; the half model is tested against it on every token
    assert res["rows"]["same"]["perplexity"] == res["rows"]["teacher"]["perplexity"]
    assert res["rows"]["same"]["agreement"] == 1.0 and set(res["tests"]) == {"half"}
    assert res["rows"]["same"]["overconfidence"] == res["rows"]["teacher"]["overconfidence"]
    assert res["rows"]["half"]["entropy"] > 0
    t = res["tests"]["half"]
    assert t["nll_sign"]["a_lower"] + t["nll_sign"]["a_higher"] + t["nll_sign"]["ties"] == n
    assert t["agreement_mcnemar"]["only_b"] == n - round(res["rows"]["half"]["agreement"] * n)
    assert t["agreement_mcnemar"]["only_a"] == 0 and 0 <= t["nll_t_tokens"]["p"] <= 1
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| half |"))
    assert row.count("(") == 4  # a p-value for each test: t over tokens, t over windows, sign, McNemar
    assert f"{res['rows']['half']['overconfidence']:+.4f}" in row.split("|")[5]  # NLL − entropy, after KL
    # plain transformers on the exported models (both keep one layer shape: plain LlamaForCausalLM), same windows
    hf = res["transformers"]
    assert all(h["export"].startswith("LlamaForCausalLM") for h in hf.values())
    assert all(h["relative_difference"] < 1e-4 and h["tokens"] == n for h in hf.values())


def test_a_reference_that_is_not_a_model_is_refused(tiny_llama, tiny_corpus, tmp_path, capsys):
    from bench import paired_decoders

    parser = paired_decoders.build_parser()
    argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--models", f"a={tmp_path}",
            "--reference", "b"]
    with pytest.raises(SystemExit) as e:  # argparse's refusal, as from the command line
        run_main(lambda a: paired_decoders.main(a, parser), parser, argv)
    assert e.value.code == 2
    assert "--reference 'b' is not one of the --models names ['a']" in capsys.readouterr().err


def test_a_confirmation_skips_the_sentences_a_bench_scored(tiny_llama, tiny_corpus, tmp_path, capsys):
    from bench import paired_decoders

    teacher, _ = load_teacher(str(tiny_llama))
    save_model(clone_model(drop_every_second(teacher)[0]), tmp_path / "half",
               {"teacher": str(tiny_llama), "teacher_hash": weights_hash(teacher)})
    parser = paired_decoders.build_parser()

    def run(out: str, *extra: str) -> int:
        argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--seq-len", "16", "--models",
                f"half={tmp_path / 'half'}", "--reference", "half", "--out", str(tmp_path / out), *extra]
        return run_main(lambda a: paired_decoders.main(a, parser), parser, argv)

    def scored(out: str) -> dict:
        return json.loads((tmp_path / out / "paired.json").read_text())

    assert run("first", "--test-sentences", "40") == 0 and run("rest", "--skip-test-sentences", "40") == 0
    assert run("all", "--test-fraction", "1") == 0
    first, rest, whole = scored("first"), scored("rest"), scored("all")
    assert rest["skipped_test_sentences"] == 40 and rest["test_fraction"] is None
    # the 24 sentences after the first 40 (of 64): fewer tokens than the first 40, and other tokens than all 64
    assert 0 < rest["tokens"] < first["tokens"] < whole["tokens"]
    assert rest["rows"]["half"]["perplexity"] != whole["rows"]["half"]["perplexity"]
    assert "after the first 40 test sentences" in (tmp_path / "rest" / "paired.md").read_text()
    capsys.readouterr()
    assert run("none", "--skip-test-sentences", "64") == 1  # nothing left to score: a one-line error
    assert "the test split has 64 sentences; cannot skip the first 64" in capsys.readouterr().err


def test_each_named_text_gets_its_own_paired_tests(tiny_llama, tiny_corpus, tmp_path, capsys):
    """--eval-text: per text the table and the paired tests, on that text's own windows; a text that is the test
    split itself gives the test split's numbers."""
    from bench import paired_decoders

    teacher, _ = load_teacher(str(tiny_llama))
    meta = {"teacher": str(tiny_llama), "teacher_hash": weights_hash(teacher)}
    save_model(clone_model(teacher), tmp_path / "same", meta)
    save_model(clone_model(drop_every_second(teacher)[0]), tmp_path / "half", meta)
    lines = (tiny_corpus / "test.txt").read_text().splitlines()
    (tmp_path / "test_again.txt").write_text("\n".join(lines))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("\n".join(reversed(lines)))
    argv = ["--teacher", str(tiny_llama), "--data-dir", str(tiny_corpus), "--seq-len", "16", "--test-fraction", "1",
            "--models", f"same={tmp_path / 'same'}", f"half={tmp_path / 'half'}", "--reference", "same",
            "--out", str(tmp_path / "out"), "--eval-text", f"again={tmp_path / 'test_again.txt'}",
            "--eval-text", f"other={tmp_path / 'other'}"]
    parser = paired_decoders.build_parser()
    assert run_main(lambda a: paired_decoders.main(a, parser), parser, argv) == 0
    res = json.loads((tmp_path / "out" / "paired.json").read_text())
    assert list(res["texts"]) == ["again", "other"]
    again, other = res["texts"]["again"], res["texts"]["other"]
    assert again["tokens"] == res["tokens"]
    for name, row in res["rows"].items():
        assert again["rows"][name] == pytest.approx(row, rel=1e-6), name
    assert again["tests"]["half"]["nll_sign"] == res["tests"]["half"]["nll_sign"]
    assert set(other["tests"]) == {"half"} and other["rows"]["half"]["perplexity"] != res["rows"]["half"]["perplexity"]
    out = capsys.readouterr().out
    assert "Text other (" in out and sum(line.startswith("| half |") for line in out.splitlines()) == 3
    # --eval-text-items: each named text on its first N windows only, the test split untouched
    argv[argv.index(str(tmp_path / "out"))] = str(tmp_path / "first2")
    assert run_main(lambda a: paired_decoders.main(a, parser), parser, [*argv, "--eval-text-items", "2"]) == 0
    first2 = json.loads((tmp_path / "first2" / "paired.json").read_text())
    assert first2["rows"] == res["rows"] and other["windows"] > 2
    assert {t["windows"] for t in first2["texts"].values()} == {2} and first2["texts"]["other"]["items_limit"] == 2
    assert first2["texts"]["other"]["tokens"] < other["tokens"]
    # --skip-eval-text-items: the windows after those, a confirmation on text the first run did not score
    argv[argv.index(str(tmp_path / "first2"))] = str(tmp_path / "next2")
    assert run_main(lambda a: paired_decoders.main(a, parser), parser,
                    [*argv, "--eval-text-items", "2", "--skip-eval-text-items", "2"]) == 0
    next2 = json.loads((tmp_path / "next2" / "paired.json").read_text())
    assert next2["rows"] == res["rows"] and next2["texts"]["other"]["skipped_items"] == 2
    assert {t["windows"] for t in next2["texts"].values()} == {2}
    assert next2["texts"]["other"]["rows"]["half"] != first2["texts"]["other"]["rows"]["half"]
    assert "2 windows of 16 after its first 2" in (tmp_path / "next2" / "paired.md").read_text()


def test_students_chat_replies_are_compared_with_the_teachers(tiny_chat_llama, tiny_corpus, tmp_path, capsys,
                                                               monkeypatch):
    """--chat-prompts: the teacher answers once; its own copy matches it on every reply, the half model is tested
    against that copy on the prompts and on the teacher's reply tokens."""
    from bench import paired_decoders
    import utils.evaluation.chat as chat

    teacher, _ = load_teacher(str(tiny_chat_llama))
    meta = {"teacher": str(tiny_chat_llama), "teacher_hash": weights_hash(teacher)}
    save_model(clone_model(teacher), tmp_path / "same", meta)
    save_model(clone_model(drop_every_second(teacher)[0]), tmp_path / "half", meta)
    prompts = ["the cat sees the dog", "the red bird", "the queen likes the song"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    real, answered = chat.answer, []
    monkeypatch.setattr(chat, "answer", lambda model, *a, **kw: answered.append(model) or real(model, *a, **kw))
    argv = ["--quick", "--teacher", str(tiny_chat_llama), "--data-dir", str(tiny_corpus), "--models",
            f"same={tmp_path / 'same'}", f"half={tmp_path / 'half'}", "--reference", "same", "--out",
            str(tmp_path / "out"), "--chat-prompts", str(tmp_path / "p.jsonl"), "--chat-max-new-tokens", "6"]
    parser = paired_decoders.build_parser()
    assert run_main(lambda a: paired_decoders.main(a, parser), parser, argv) == 0
    c = json.loads((tmp_path / "out" / "paired.json").read_text())["chat"]
    assert len(answered) == 3  # the teacher, then each model once
    same, half = c["rows"]["same"], c["rows"]["half"]
    assert same["exact_match"] == 1.0 and same["teacher_forced"]["agreement_top1"] == 1.0
    assert half["teacher_forced"]["kl_teacher_student"] > 0 and set(c["tests"]) == {"half"}
    t, n = c["tests"]["half"], half["teacher_forced"]["tokens"]
    assert t["first8_match"]["only_a"] == 0 and t["first8_match"]["only_b"] == round((1 - half["first8_match"]) * 3)
    assert t["agreement"]["only_b"] == n - round(half["teacher_forced"]["agreement_top1"] * n)
    assert t["nll_sign"]["a_lower"] + t["nll_sign"]["a_higher"] + t["nll_sign"]["ties"] == n
    assert len((tmp_path / "out" / "chat" / "half" / "chat_replies.jsonl").read_text().splitlines()) == 3
    assert any(line.startswith("| half | ") and line.count("(") == 4 for line in
               capsys.readouterr().out.split("Chat:")[1].splitlines())
