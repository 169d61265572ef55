"""bench/make_mlm_teacher.py (the English MLM teacher's recipe) and bench/prepare_wikitext2.py, on a tiny encoder."""
from __future__ import annotations

import json

import torch

from bench.make_mlm_teacher import build
from bench.prepare_wikitext2 import prepare, source_lines, teacher_split
from helpers import make_sentences
from models import load_teacher


def test_teacher_rebuilt_from_encoder_and_text(tiny_encoder, tmp_path):
    src = tmp_path / "sentences.txt"
    src.write_text("\n".join(make_sentences(70, seed=5) + ["too short", ""]) + "\n")
    lines = source_lines(src)
    assert len(lines) == 70  # lines under 4 words are dropped, as in the recipe
    info = build(str(tiny_encoder), lines, tmp_path / "teacher", sentences=50, held_out=20, rounds=1, head_epochs=2,
                 finetune_steps=3, batch=8, seq_len=16)
    assert info["sentences"] == 50 and info["held_out"] == 20 and info["finetune_steps"] == 3
    assert json.loads((tmp_path / "teacher" / "provenance.json").read_text())["heldout_top1"] == info["heldout_top1"]
    teacher, _ = load_teacher(tmp_path / "teacher")
    encoder, _ = load_teacher(tiny_encoder)
    assert teacher.has_mlm_head and not encoder.has_mlm_head
    # the encoder was trained (fine-tuning step), and the same split feeds prepare_wikitext2
    emb = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(teacher.state_dict()[emb], encoder.state_dict()[emb])
    split = prepare(lines, tmp_path / "split", train=50, valid=20)
    assert (split / "train.txt").read_text().splitlines() == teacher_split(lines, 50, 20)["train"]
