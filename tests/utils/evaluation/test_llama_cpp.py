"""utils.evaluation.llama_cpp.gguf_nll: llama.cpp's per-token NLL of a GGUF, window by window, against ours on the
same windows (skips without llama-cpp-python)."""
from __future__ import annotations

import pytest
import torch

from helpers import decoder_student, heterogeneous_units, make_decoder_teacher, make_sentences
from models import load_teacher
from models.gguf_export import export_gguf
from utils.evaluation.llama_cpp import gguf_nll

pytest.importorskip("gguf")


def test_gguf_nll_is_our_per_token_nll_window_by_window(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
    teacher, tok = load_teacher(make_decoder_teacher(tmp_path / "t", layers=6, tokenizer="bpe"))
    student = decoder_student(teacher, heterogeneous_units(64))
    path, _ = export_gguf(student, tmp_path / "s.gguf", tok, gguf_type="f32")
    ids = tok(" ".join(make_sentences(12, seed=5)))["input_ids"]
    windows = [ids[:40], ids[40:64], ids[64:100]]  # windows of unequal length, each from an empty cache
    theirs = gguf_nll(path, windows)
    with torch.no_grad():
        ours = torch.cat([torch.nn.functional.cross_entropy(student(torch.tensor([w])).logits[0, :-1].double(),
                                                            torch.tensor(w[1:]), reduction="none") for w in windows])
    assert len(theirs) == len(ours) == sum(len(w) - 1 for w in windows)
    assert torch.allclose(torch.tensor(theirs, dtype=torch.float64), ours, atol=2e-3, rtol=0)
    # a window scored alone gives the same numbers: nothing carried over from the window before
    assert gguf_nll(path, windows[1:2]) == pytest.approx(theirs[39:62], abs=1e-6)
