"""Named evaluation texts: each scored exactly as the test split is, kept per name in results.json, the printed
table and tensorboard; bad names and paths refused before any work."""
from __future__ import annotations

import json

import pytest
import torch

from models.compress import clone_model
from utils import api
from utils.errors import SettingError
from utils.evaluation.metrics import EvalResult, token_scores
from utils.evaluation.report import report_text
from utils.evaluation.texts import COST_KEYS, EvalText, parse_text
from helpers import make_sentences

# what depends on the text alone (not on timings or on the models' sizes)
SAME = ("teacher_perplexity", "student_perplexity", "perplexity_ratio", "teacher_top1", "student_top1",
        "student_top5", "agreement_top1", "kl_teacher_student", "teacher_overconfidence", "student_overconfidence",
        "hidden_cosine", "predicted_tokens", "sentences", "teacher_entropy")


def _student(teacher, seed: int = 0):
    """The teacher with every weight moved a little: a student that differs everywhere."""
    g = torch.Generator().manual_seed(seed)
    student = clone_model(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student.eval()


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A corpus whose test split is one file, that same file as a text, and a folder of two more documents."""
    root = tmp_path_factory.mktemp("texts")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, n, seed in (("train", 40, 1), ("valid", 20, 2), ("test", 48, 3)):
        (corpus / f"{name}.txt").write_text("\n".join(make_sentences(n, seed)))  # no last newline: one stream
    other = root / "other"
    other.mkdir()
    (other / "a.txt").write_text("\n".join(make_sentences(30, 7)))
    (other / "b.md").write_text("\n".join(make_sentences(20, 8)))
    return corpus, other


@pytest.mark.parametrize("teacher", ["tiny_llama", "tiny_teacher"])
def test_a_text_scores_as_the_test_split_and_each_is_kept(teacher, texts, tmp_path, request):
    corpus, other = texts
    s = api.load_teacher(str(request.getfixturevalue(teacher)),
                         data=api.DataConfig(data_dir=str(corpus), seq_len=16, batch_size=8), device="cpu")
    given = (EvalText("same", str(corpus / "test.txt")), EvalText("other", str(other)))
    ev = api.evaluate(s, _student(s.teacher), evaluation=api.EvalConfig(texts=given), out=tmp_path / "ev")
    same = ev.texts["same"]["metrics"]
    for k in SAME:
        if k in ev.metrics:
            assert same[k] == pytest.approx(ev.metrics[k], rel=1e-6, abs=1e-9), k
    assert not set(COST_KEYS) & set(same)
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert list(res["texts"]) == ["same", "other"]
    o = res["texts"]["other"]
    assert o["path"] == str(other) and o["documents"] == 2
    if teacher == "tiny_llama":  # windows of the documents in order; every window but the last is full
        assert o["windows"] == -(-o["tokens"] // 16) and o["metrics"]["predicted_tokens"] == o["tokens"] - o["windows"]
        assert same["perplexity_ratio"] == pytest.approx(same["student_perplexity"] / same["teacher_perplexity"])
    else:  # one sentence per line
        assert o["sentences"] == 50 == o["metrics"]["sentences"]
    table = report_text(EvalResult(ev.metrics, ev.rows, ev.notes, ev.texts))
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith(("| test ", "| same", "| other"))]
    assert rows == ["| test", "| same", "| other"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path / "ev" / "tb")).Reload().Tags()["scalars"]
    assert ("texts/other/agreement_top1" in tags and "texts/same/agreement_top1" in tags
            and "test/agreement_top1" in tags)


def test_overconfidence_is_the_per_token_one(tiny_llama, texts):
    """compare_models' NLL − entropy (summed counts) equals TokenScores.overconfidence (token by token)."""
    corpus, _ = texts
    s = api.load_teacher(str(tiny_llama), data=api.DataConfig(data_dir=str(corpus), seq_len=16, batch_size=8),
                         device="cpu")
    student = _student(s.teacher)
    loader, _ = s.loader(s.sentences("test"), shuffle=False)
    from utils.evaluation.metrics import compare_models

    m = compare_models(s.teacher, student, loader, tokenizer=s.tokenizer, device=s.device, keep_rows=False).metrics
    sc = token_scores(s.teacher, {"s": student}, loader, device=s.device)
    assert m["teacher_overconfidence"] == pytest.approx(sc.overconfidence(), abs=1e-5)
    assert m["student_overconfidence"] == pytest.approx(sc.overconfidence("s"), abs=1e-5)


def test_bad_texts_are_refused_before_any_work(tiny_llama, texts, tmp_path):
    corpus, other = texts
    cfg = api.SessionConfig(teacher=str(tmp_path / "no_teacher"), data=api.DataConfig(data_dir=str(corpus)))
    with pytest.raises(SettingError, match="'a' is given twice"):  # before the (missing) teacher is looked at
        api.evaluate(cfg, tmp_path / "m", out=tmp_path / "ev", evaluation=api.EvalConfig(
            texts=(EvalText("a", str(other)), EvalText("a", str(corpus)))))
    with pytest.raises(SettingError, match="neither a file nor a folder"):
        api.evaluate(cfg, tmp_path / "m", out=tmp_path / "ev",
                     evaluation=api.EvalConfig(texts=(EvalText("a", str(tmp_path / "nothing")),)))
    for name in ("1st", "a-b", "", "é"):
        with pytest.raises(SettingError, match="not a simple identifier"):
            EvalText(name, str(other))
    with pytest.raises(SettingError, match="NAME=PATH"):
        parse_text(str(other))
    assert parse_text(f"code={other}") == EvalText("code", str(other))
