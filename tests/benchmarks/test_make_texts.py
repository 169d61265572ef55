"""bench/make_texts.py: code and prose text folders from what is installed, train and eval disjoint by file."""
from __future__ import annotations

import json

from utils.cli.run import run_main
from utils.data.text import read_documents


def test_quick_sets_are_disjoint_by_file_and_nothing_is_empty(tmp_path, capsys):
    from bench import make_texts

    out = tmp_path / "texts"
    assert run_main(make_texts.main, make_texts.build_parser(), ["--out", str(out), "--quick"]) == 0
    listed = json.loads((out / "texts.json").read_text())
    assert set(listed) == {"code", "prose"}
    printed = capsys.readouterr().out
    for name, parts in listed.items():
        train, evaluation = set(parts["train"]), set(parts["eval"])
        assert train and evaluation and not train & evaluation  # no document in both parts
        assert all(make_texts.part_of(d, 0.2) == "eval" for d in evaluation)  # decided by the name alone
        texts = {}
        for part in ("train", "eval"):
            docs = read_documents(out / name / part)  # what --train-text / --eval-text read
            assert len(docs) == len(parts[part]) and all(d.text.strip() for d in docs)
            texts[part] = {d.text for d in docs}
            assert f"| {name} | {part} | {len(docs):,} |" in printed
        assert not texts["train"] & texts["eval"]  # no text in both parts either
    assert all(not d.startswith(("test/", "tests/")) and "/test_" not in "/" + d for d in
               listed["code"]["train"] + listed["code"]["eval"])
    assert not list(out.glob(".*.tmp"))  # written to temporary folders, renamed when complete


def test_the_english_check_and_the_description_of_a_distribution():
    from bench import make_texts

    english = "This is a small library for the parsing of dates, and it can be used with any of your programs. " * 5
    assert make_texts.is_english(english, 0.15)
    assert not make_texts.is_english("Dies ist eine kleine Bibliothek zum Lesen von Datumsangaben. " * 10, 0.15)
    assert not make_texts.is_english("def f(x):\n    return x + 1\n" * 20, 0.15)
    meta = "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n\nThe long description.\nSecond line.\n"
    assert make_texts.metadata_description(meta) == "The long description.\nSecond line.\n"
