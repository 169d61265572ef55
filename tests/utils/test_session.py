"""utils/session.py: how a run reads its text for the teacher's task (by documents for a decoder, by sentences for a
masked LM) and a decoder's training mixture (its size, its names in the run setup and the teacher cache key)."""
from __future__ import annotations

import pytest

from helpers import make_sentences
from utils import api
from utils.session import resolve_data
from utils.storage.features import TeacherCache


def _llama(tiny_llama, corpus, **data):
    return api.load_teacher(str(tiny_llama), device="cpu",
                            data=api.DataConfig(data_dir=str(corpus), seq_len=16, batch_size=4, **data))


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    (folder / "replies.jsonl").write_text("".join(f'{{"text": "{s}"}}\n' for s in make_sentences(60, seed=9)))
    return folder


def test_split_by_resolves_per_task_and_bert_keeps_its_sentence_split(tiny_teacher, tiny_llama, tiny_corpus):
    assert _llama(tiny_llama, tiny_corpus).data.split_by == "documents"
    bert = api.load_teacher(str(tiny_teacher), device="cpu", data=api.DataConfig(data_dir=str(tiny_corpus)))
    assert bert.data.split_by == "sentences"
    from utils.data.text import load_sentences

    assert load_sentences(bert.data, "test") == load_sentences(api.DataConfig(data_dir=str(tiny_corpus)), "test")
    with pytest.raises(api.SettingError, match="`split_by` must be one of sentences, documents"):
        resolve_data(api.DataConfig(split_by="words"), "causal")


def test_mixture_is_as_large_as_the_split_and_changes_setup_and_cache_key(tiny_llama, tiny_corpus, chat):
    plain = _llama(tiny_llama, tiny_corpus)
    mixed = _llama(tiny_llama, tiny_corpus, train_texts=(api.TrainText("chat", str(chat), 1.0),))
    base, mix = plain.first_sentences("train", 100), mixed.first_sentences("train", 100)
    assert abs(mix.tokens - base.tokens) <= 16  # the same budget, shared by weight
    assert abs(mix.shares["chat"]["tokens"] - mix.shares["data"]["tokens"]) <= 16
    setup = mixed.training_setup(mix)
    assert setup["data_hash"] != plain.training_setup(base)["data_hash"]
    assert setup["train_texts"] == [{"name": "chat", "path": str(chat), "weight": 1.0}]
    assert "train_texts" not in plain.training_setup(base)  # runs without a mixture resume as before

    def key(s, ds):
        return TeacherCache("unused", s.teacher, teacher_hash=s.teacher_hash, token_ids=ds.ids,
                            tokenizer_name=s.teacher_name, seq_len=16).key

    assert key(plain, base) != key(mixed, mix)
    heavier = _llama(tiny_llama, tiny_corpus, train_texts=(api.TrainText("chat", str(chat), 3.0),))
    assert key(heavier, heavier.first_sentences("train", 100)) != key(mixed, mix)
    only = _llama(tiny_llama, tiny_corpus, train_texts=(api.TrainText("chat", str(chat)),), data_weight=0.0)
    assert set(only.first_sentences("valid", None).shares) == {"chat"}  # valid is the mixture too
    assert plain.first_sentences("test", None).ids == mixed.first_sentences("test", None).ids  # test is not


@pytest.mark.parametrize("data, task, match", [
    (dict(train_texts=(api.TrainText("a", "x"),)), "mlm", "`train_texts` is a decoder's training mixture"),
    (dict(train_texts=(api.TrainText("a", "x"), api.TrainText("a", "y"))), "causal", r"each name once, got \['a'\]"),
    (dict(train_texts=(api.TrainText("a", "x", float("nan")),)), "causal", "weights must be finite numbers > 0"),
    (dict(train_texts=(api.TrainText("data", "x"),)), "causal", "not 'data'"),
    (dict(data_weight=0.0), "causal", "`data_weight` must be"),
])
def test_bad_mixtures_are_refused_naming_the_setting(data, task, match):
    with pytest.raises(api.SettingError, match=match):
        resolve_data(api.DataConfig(**data), task)


def test_refit_probe_is_the_first_windows_and_leaves_the_global_rng_alone(tiny_llama, tiny_corpus):
    import torch

    s = _llama(tiny_llama, tiny_corpus)
    train = s.sentences("train")
    torch.manual_seed(3)
    probe = s.refit_probe(train, 40)  # 40 tokens: three windows of 16
    drawn_after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(1), drawn_after)  # the runs that draw next draw the same
    assert probe["input_ids"].shape == (3, 16)
    assert torch.equal(probe["input_ids"], s.global_batch(train, 3)["input_ids"])
    assert s.refit_probe(train, 0) is None
    with pytest.raises(ValueError, match="ffn_refit_tokens must be >= 0, got -1"):
        s.refit_probe(train, -1)
