"""The data pipeline: sentence splitting, local splits, deterministic masks and batches, BERT masking."""
from __future__ import annotations

import pytest
import torch

from helpers import make_tokenizer
from utils.data.batches import BucketBatchSampler, Collator, TokenizedSentences, make_loader
from utils.data.masking import bert_mlm_mask
from utils.data.text import DataConfig, DataError, load_sentences, split_sentences


def test_split_sentences_drops_headings_and_splits_paragraphs():
    lines = [" = Valkyria Chronicles = ", "", " The game began in 2010 . It was a hit ! Fans liked it a lot . ",
             " = = Plot = = ", "Short ."]
    assert split_sentences(lines) == ["The game began in 2010 .", "It was a hit !", "Fans liked it a lot ."]


def test_single_file_split_by_ratio_is_deterministic(tmp_path):
    (tmp_path / "all.txt").write_text("\n".join(f"sentence number {i} is here ." for i in range(100)))
    spec = DataConfig(data_dir=str(tmp_path), split_ratio=(0.8, 0.1, 0.1), seed=3)
    parts = {s: load_sentences(spec, s) for s in ("train", "valid", "test")}
    assert [len(p) for p in parts.values()] == [80, 10, 10]
    assert not set(parts["train"]) & set(parts["test"])
    assert parts["test"] == load_sentences(spec, "test")
    assert load_sentences(spec, "test", fraction=0.5) == parts["test"][:5]


def test_eval_masks_are_seeded_and_never_special(tmp_path, tiny_corpus):
    tok = make_tokenizer(tmp_path / "tok")
    sents = load_sentences(DataConfig(data_dir=str(tiny_corpus)), "test")
    a = TokenizedSentences(sents, tok, seq_len=8, mask_seed=5)
    b = TokenizedSentences(sents, tok, seq_len=8, mask_seed=5)
    c = TokenizedSentences(sents, tok, seq_len=8, mask_seed=6)
    assert a.mask_positions == b.mask_positions != c.mask_positions
    special = set(tok.all_special_ids)
    for ids, p in zip(a.ids, a.mask_positions):
        assert len(ids) <= 8 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert ids[p] not in special
    assert a.truncated > 0  # long sentences were cut, keeping [CLS]/[SEP]


def test_batches_padded_per_batch_and_deterministic(tmp_path, tiny_corpus):
    tok = make_tokenizer(tmp_path / "tok")
    ds = TokenizedSentences(load_sentences(DataConfig(data_dir=str(tiny_corpus)), "train"), tok, 40, mask_seed=0)
    l1, s1 = make_loader(ds, tok, 16, shuffle=True, seed=1)
    l2, s2 = make_loader(ds, tok, 16, shuffle=True, seed=1)
    s1.set_epoch(2), s2.set_epoch(2)
    b1, b2 = list(l1), list(l2)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b1, b2))
    s2.set_epoch(3)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b1, list(l2)))
    for b in b1:
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == lengths.max()  # padded to the batch's longest, not to seq_len
        rows = torch.arange(len(lengths))
        assert (b["masked_input_ids"][rows, b["mask_pos"]] == tok.mask_token_id).all()
        assert torch.equal(b["target"], b["input_ids"][rows, b["mask_pos"]])
    assert sorted(i for b in b1 for i in b["index"].tolist()) == list(range(len(ds)))


def test_sampler_ranks_partition_global_batches():
    lengths = [5 + (i % 7) for i in range(50)]
    single = list(BucketBatchSampler(lengths, 8, seed=0))
    r0 = list(BucketBatchSampler(lengths, 4, seed=0, num_replicas=2, rank=0))
    r1 = list(BucketBatchSampler(lengths, 4, seed=0, num_replicas=2, rank=1))
    assert len(r0) == len(r1)
    for full, a, b in zip(single, r0, r1):
        assert sorted(a + b) == sorted(full)


def test_evaluation_sampler_gives_every_rank_as_many_batches():
    """A sharded model's forward is a collective: in evaluation order, a last global batch smaller than the number of
    ranks (here 1 sentence for 3 ranks) joins the one before, so no rank runs a batch the others do not."""
    lengths = [5] * 13  # global batches of 6: 6, 6 and 1
    ranks = [list(BucketBatchSampler(lengths, 2, shuffle=False, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(r) for r in ranks] == [2, 2, 2]
    assert sorted(i for r in ranks for b in r for i in b) == list(range(13))  # every sentence, once
    assert [len(b) for b in ranks[0]] == [2, 3]


def test_bert_masking_statistics_and_specials(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    ids = torch.randint(5, len(tok), (400, 30))
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    att = torch.ones_like(ids)
    att[:, 25:] = 0
    g = torch.Generator().manual_seed(0)
    masked, labels = bert_mlm_mask(ids, att, special_ids=tok.all_special_ids, mask_token_id=tok.mask_token_id,
                                   vocab_size=len(tok), generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 25:].any()
    assert (chosen.sum(1) >= 1).all()
    frac = chosen[:, 1:25].float().mean().item()
    assert 0.13 < frac < 0.18
    to_mask = (masked[chosen] == tok.mask_token_id).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.75 < to_mask < 0.85 and 0.07 < unchanged < 0.16


def test_bad_text_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_sentences(DataConfig(data_dir=str(tmp_path / "empty")), "train")
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "train.txt").write_text(" = Title = \n = = Section = = \n\n")
    with pytest.raises(DataError, match="no usable sentence"):
        load_sentences(DataConfig(data_dir=str(tmp_path / "heads")), "train")
    with pytest.raises(DataError, match="valid.txt"):
        load_sentences(DataConfig(data_dir=str(tmp_path / "heads")), "valid")


def test_non_utf8_bytes_replaced_and_reported(tmp_path, caplog):
    (tmp_path / "train.txt").write_bytes(b"the cat sat on the mat \xff\xfe today .\nanother fine sentence here .\n")
    with caplog.at_level("WARNING"):
        sents = load_sentences(DataConfig(data_dir=str(tmp_path)), "train")
    assert len(sents) == 2 and "\ufffd" in sents[0]
    assert sum("not valid UTF-8" in r.message for r in caplog.records) == 1
    assert "2 bytes" in caplog.text


def test_collator_without_eval_mask(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    batch = Collator(tok.pad_token_id)([{"index": 0, "input_ids": [2, 7, 3]}, {"index": 1, "input_ids": [2, 3]}])
    assert batch["input_ids"].tolist() == [[2, 7, 3], [2, 3, tok.pad_token_id]]
    assert "masked_input_ids" not in batch


def test_read_documents_keeps_files_articles_and_jsonl_lines_whole_and_in_order(tmp_path):
    from utils.data.text import read_documents

    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "a.py").write_text("def f():\n    return 1\n")
    (src / "b" / "c.md").write_text("# Title\n\nSome prose.\n")
    (src / "skip.bin").write_bytes(b"\x00\x01")
    (src / "empty.txt").write_text("  \n")
    docs = read_documents(src)
    assert [d.name for d in docs] == ["a.py", "b/c.md"]
    assert docs[0].text == "def f():\n    return 1\n"  # short lines and indentation are kept
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(" = One = \n first .\n = = Part = = \n more .\n = Two = \n second .\n")
    assert [d.text for d in read_documents(wiki)] == [" = One = \n first .\n = = Part = = \n more .\n",
                                                        " = Two = \n second .\n"]
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"text": "hi"}\n\n{"text": "there"}\n')
    assert [(d.name, d.text) for d in read_documents(chat)] == [("chat.jsonl#0", "hi"), ("chat.jsonl#1", "there")]


def test_read_documents_refuses_what_holds_no_text(tmp_path):
    from utils.data.text import DataError, read_documents

    with pytest.raises(DataError, match="neither a file nor a folder"):
        read_documents(tmp_path / "missing")
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match="holds no text"):
        read_documents(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match="line 1"):
        read_documents(bad)


def _documents_source(folder):
    """A folder of documents: two prose files and a Python file (indentation, short lines, a blank line)."""
    folder.mkdir()
    (folder / "a.txt").write_text("first article starts here .\nit goes on .\n")
    (folder / "b.txt").write_text("second article .\n" * 5)
    (folder / "c.py").write_text("def f(x):\n    if x:\n        return 1\n\n    return 0\n")
    (folder / "d.txt").write_text("the last document .\n" * 3)
    return folder


def test_split_by_documents_is_disjoint_in_order_and_keeps_every_line(tmp_path):
    src = _documents_source(tmp_path / "docs")
    spec = DataConfig(data_dir=str(src), split_by="documents", split_ratio=(0.5, 0.25, 0.25))
    parts = {s: load_sentences(spec, s) for s in ("train", "valid", "test")}
    assert all(parts.values())
    whole = [line for f in sorted(src.iterdir()) for line in f.read_text().splitlines()]
    assert parts["train"] + parts["valid"] + parts["test"] == whole  # in order, nothing dropped or shuffled
    assert "    if x:" in whole and "" in whole  # code keeps its indentation and blank line
    code = whole.index("def f(x):")
    assert any(whole[code:code + 5] == p[i:i + 5] for p in parts.values() for i in range(len(p)))  # one split
    assert load_sentences(spec, "test") == parts["test"]


def test_split_by_documents_reads_split_files_and_titled_articles(tmp_path, tiny_corpus):
    spec = DataConfig(data_dir=str(tiny_corpus), split_by="documents")
    assert load_sentences(spec, "valid") == (tiny_corpus / "valid.txt").read_text().splitlines()
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("".join(f" = Article {k} = \nline {k} of text .\nmore of {k} .\n" for k in range(10)))
    parts = [load_sentences(DataConfig(data_dir=str(wiki), split_by="documents"), s) for s in ("train", "valid",
                                                                                                   "test")]
    assert [len(p) // 3 for p in parts] == [8, 1, 1]  # whole articles, titles kept
    assert parts[1] == [" = Article 8 = ", "line 8 of text .", "more of 8 ."]


def test_cut_documents_gives_every_part_a_document_and_cuts_one_document_by_lines():
    from utils.data.text import Document, cut_documents

    docs = [Document("big", "x " * 1000), Document("s1", "a"), Document("s2", "b")]
    assert [[d.name for d in p] for p in cut_documents(docs, (0.8, 0.1, 0.1), what="t")] == [["big"], ["s1"],
                                                                                              ["s2"]]
    one = [Document("one", "".join(f"line {i}\n" for i in range(10)))]
    parts = cut_documents(one, (0.8, 0.2), what="t")
    assert ["".join(d.text for d in p) for p in parts] == ["".join(f"line {i}\n" for i in range(8)),
                                                          "line 8\nline 9\n"]
    with pytest.raises(DataError, match="too few"):
        cut_documents([Document("x", "one line")], (0.5, 0.5), what="t")


def test_mixture_shares_tokens_by_weight_deterministically(tmp_path):
    from helpers import make_decoder_tokenizer, make_sentences
    from utils.data.batches import MixedWindows, TokenWindows

    tok = make_decoder_tokenizer(tmp_path / "tok")
    a = TokenWindows(make_sentences(300, 1), tok, 16)
    b = TokenWindows(make_sentences(40, 2), tok, 16)
    mix = MixedWindows({"a": (a, 3.0), "b": (b, 1.0)}, 2000, seed=0)
    got = {name: v["tokens"] for name, v in mix.shares.items()}
    assert abs(got["a"] - 1500) <= 8 and abs(got["b"] - 500) <= 8  # within half a window
    assert mix.tokens == sum(got.values())
    assert mix.shares["b"]["passes"] > 1  # b has fewer tokens than its share: its windows repeat
    assert mix.ids == MixedWindows({"a": (a, 3.0), "b": (b, 1.0)}, 2000, seed=0).ids
    assert mix.ids != MixedWindows({"a": (a, 3.0), "b": (b, 1.0)}, 2000, seed=1).ids
    b_ids = {tuple(x) for x in b.ids}
    first = [tuple(x) in b_ids for x in mix.ids[:20]]  # interleaved: a leading run is the mixture too
    assert 3 <= sum(first) <= 7
    assert "passes" in mix.describe()


def test_hub_wikitext2_read_by_documents_keeps_articles_and_titles(tmp_path, monkeypatch):
    """The Hub path offline: the parquet files the cache would give, read as articles (titles and blank lines kept)
    for decoders, as sentences for the masked LM."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from utils.data import text

    rows = ["", " = Alpha = \n", "", " Alpha is a thing . It has parts . \n", "", " = = History = = \n", "",
            " It began early . \n", "", " = Beta = \n", "", " Beta was a place . \n"]
    f = tmp_path / "valid-00000.parquet"
    pq.write_table(pa.table({"text": rows}), f)
    monkeypatch.setattr(text, "wikitext2_parquet_files", lambda split: [f])
    docs = text.wikitext2_documents("valid")
    assert [d.text.splitlines()[0] for d in docs] == [" = Alpha = ", " = Beta = "]
    lines = load_sentences(DataConfig(split_by="documents"), "valid")
    assert lines[:4] == [" = Alpha = ", "", " Alpha is a thing . It has parts . ", ""]
    assert " = = History = = " in lines and lines[-1] == " Beta was a place . "
    assert load_sentences(DataConfig(), "valid") == ["Alpha is a thing .", "It has parts .", "It began early .",
                                                    "Beta was a place ."]


def test_first_items_of_an_evaluation_text(tmp_path):
    """``first(n)``: the first n windows (sentences with their masks) in text order, the text itself untouched."""
    from helpers import make_decoder_tokenizer, make_sentences
    from utils.data.batches import TokenWindows

    win = TokenWindows(make_sentences(100, 3), make_decoder_tokenizer(tmp_path / "tok"), 16)
    part = win.first(3)
    assert part.ids == win.ids[:3] and part.tokens == sum(len(x) for x in win.ids[:3]) and len(win) > 3
    assert win.first(None) is win and win.first(len(win) + 5) is win
    sents = TokenizedSentences(make_sentences(20, 4), make_tokenizer(tmp_path / "mlm"), 16)
    few = sents.first(5)
    assert few.ids == sents.ids[:5] and few.mask_positions == sents.mask_positions[:5] and len(sents) == 20
    # after the first `skip`: the next n, or the rest; skipping everything is an error naming the count
    later = win.first(2, skip=3)
    assert later.ids == win.ids[3:5] and later.tokens == sum(len(x) for x in win.ids[3:5])
    assert win.first(None, skip=1).ids == win.ids[1:]
    rest = sents.first(None, skip=15)
    assert rest.ids == sents.ids[15:] and rest.mask_positions == sents.mask_positions[15:]
    with pytest.raises(DataError, match="the text has 20 sentences; cannot skip the first 20"):
        sents.first(3, skip=20)
