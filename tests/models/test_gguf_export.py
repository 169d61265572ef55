"""Decoder students exported to GGUF: the file's metadata and tensors read back with gguf-py, the refusals (one line,
nothing written), and — where llama-cpp-python is installed — llama.cpp's logits, greedy tokens and perplexity
against ours at f32, on tiny Llama and Qwen2 teachers with a heterogeneous student."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from helpers import (check_runs_as_ours, decoder_student, heterogeneous_units, llama_cpp_convert, llama_cpp_logits,
                     llama_cpp_model, make_decoder_teacher, make_sentences, perplexity)
from models import LayerSpec, load_teacher
from models.compress import clone_model
from models.export import ExportError
from models.gguf_export import ZERO_FFN, export_gguf

gguf = pytest.importorskip("gguf")

# teacher: 6 layers, hidden 48, 6 query heads over 2 KV heads of 8, SwiGLU 64; layer 5: fewer heads, no FFN
UNITS = {**heterogeneous_units(64), 5: LayerSpec(4, 8, 0, [5], "layer", attention="gqa", num_kv_heads=2)}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def decoder(request, tmp_path_factory):
    """(model_type, teacher, tokenizer, heterogeneous student) on a tiny teacher with a byte-level BPE tokenizer."""
    folder = make_decoder_teacher(tmp_path_factory.mktemp(request.param), model_type=request.param, layers=6,
                                  tokenizer="bpe")
    teacher, tok = load_teacher(folder)
    return request.param, teacher, tok, decoder_student(teacher, UNITS)


def fields(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (GGML type name, shape as PyTorch has it)}) of a GGUF file."""
    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))) for t in r.tensors}
    return meta, tensors


def test_heterogeneous_student_is_written_as_deci_with_per_layer_sizes(decoder, tmp_path):
    model_type, _, tok, student = decoder
    out, what = export_gguf(student, tmp_path / "s.gguf", tok, gguf_type="f32")
    meta, tensors = fields(out)
    assert what == "deci, 5 layers, f32" and meta["general.architecture"] == "deci"
    assert meta["deci.block_count"] == 5  # the dropped layer is not written
    assert meta["deci.attention.head_count"] == [6, 0, 6, 6, 4]
    assert meta["deci.attention.head_count_kv"] == [1, 0, 0, 2, 2]  # 0 with heads: the linear layer
    assert meta["deci.feed_forward_length"] == [64, 64, 64, 32, ZERO_FFN]
    assert meta["deci.attention.key_length"] == 8
    assert "blk.1.attn_norm.weight" not in tensors and tensors["blk.2.attn_output.weight"][1] == (48, 48)
    assert tensors["blk.0.attn_k.weight"][1] == (8, 48) and tensors["blk.4.attn_q.weight"][1] == (32, 48)
    assert (tensors["blk.3.ffn_down.weight"][1], tensors["blk.4.ffn_down.weight"][1]) == ((48, 32), (48, ZERO_FFN))
    assert ("blk.0.attn_q.bias" in tensors) == (model_type == "qwen2")
    r = gguf.GGUFReader(str(out))
    zero = next(t for t in r.tensors if t.name == "blk.4.ffn_down.weight")
    assert not zero.data.any()  # the attention-only layer's feed-forward part adds nothing


def test_tokenizer_special_tokens_and_chat_template_are_carried_over(decoder, tmp_path):
    model_type, teacher, tok, student = decoder
    meta, _ = fields(export_gguf(student, tmp_path / "s.gguf", tok)[0])
    # transformers 5 gives a Qwen2 tokenizer Qwen2's own split whatever its tokenizer.json says; 4.x keeps GPT-2's
    qwen2_split = '"Split"' in tok.backend_tokenizer.to_str()
    assert qwen2_split == (model_type == "qwen2" and type(tok).__name__ == "Qwen2Tokenizer")
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "qwen2" if qwen2_split else "gpt-2")
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == teacher.config.vocab_size and tokens[:len(tok)] == tok.convert_ids_to_tokens(range(len(tok)))
    types = meta["tokenizer.ggml.token_type"]
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[len(tok)] == gguf.TokenType.UNUSED and tokens[len(tok)] == f"[PAD{len(tok)}]"
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.ggml.merges"][0].count(" ") == 1
    assert meta["tokenizer.chat_template"] == tok.chat_template


def test_students_of_the_teacher_shape_are_the_plain_architecture(decoder, tmp_path):
    model_type, teacher, tok, _ = decoder
    shortgpt = decoder_student(teacher, {4: UNITS[4], 5: LayerSpec(0, 0, 0, [5], "dropped", attention="none")})
    for name, model, layers in (("teacher", teacher, 6), ("shortgpt", shortgpt, 4)):
        meta, tensors = fields(export_gguf(model, tmp_path / f"{name}.gguf", tok)[0])
        assert meta["general.architecture"] == model_type  # llama.cpp's llama / qwen2
        assert meta[f"{model_type}.block_count"] == layers and meta[f"{model_type}.attention.head_count_kv"] == 2
        assert tensors["blk.0.attn_q.weight"][0] == "F16" and tensors["output_norm.weight"][0] == "F32"


def test_q8_0_quantizes_the_rows_that_split_into_blocks(decoder, tmp_path):
    _, _, tok, student = decoder
    meta, tensors = fields(export_gguf(student, tmp_path / "q.gguf", tok, gguf_type="q8_0")[0])
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tensors["blk.0.ffn_down.weight"][0] == "Q8_0"  # rows of 64
    assert tensors["blk.0.ffn_gate.weight"][0] == "F16"  # rows of 48: not whole blocks of 32


def test_a_first_layer_without_attention_is_written_as_a_zero_linear_attention(decoder, tmp_path):
    _, teacher, tok, _ = decoder
    student = decoder_student(teacher, {0: LayerSpec(0, 0, 64, [0], "layer", attention="none")})
    out, _ = export_gguf(student, tmp_path / "s.gguf", tok)
    meta, _ = fields(out)
    assert meta["deci.attention.head_count"][:2] == [6, 6] and meta["deci.attention.head_count_kv"][:2] == [0, 2]
    zero = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "blk.0.attn_output.weight")
    assert not zero.data.any()  # llama.cpp reads the head size from layer 0; the layer still adds nothing


@pytest.mark.parametrize("case", ["head_dim", "linear_bias", "tokenizer", "bert", "gguf_type"])
def test_what_llama_cpp_cannot_run_is_refused_in_one_line_and_nothing_is_written(case, decoder, tiny_llama,
                                                                                 tiny_teacher, tmp_path):
    _, teacher, tok, student = decoder
    kwargs = {}
    if case == "head_dim":
        student = decoder_student(teacher, {3: LayerSpec(6, 4, 64, [3], "block", attention="gqa", num_kv_heads=2)})
        expected = "layer 3: attention with head_dim 4"
    elif case == "linear_bias":
        student = clone_model(student)
        student.config = dataclasses.replace(student.config, attention_bias=True)
        expected = "layer 2: linear attention with a bias"
    elif case == "tokenizer":
        student, tok = load_teacher(tiny_llama)  # a word-level tokenizer
        expected = "this one is WordLevel"
    elif case == "bert":
        student, tok = load_teacher(tiny_teacher)
        expected = "writes decoders of the Llama family"
    else:
        kwargs, expected = {"gguf_type": "q4_k"}, "`gguf_type` must be one of f32, f16, q8_0"
    with pytest.raises(ExportError) as e:
        export_gguf(student, tmp_path / "s.gguf", tok, **kwargs)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_api_export_refuses_before_writing_any_target(decoder, tmp_path):
    from utils.api import export

    _, teacher, tok, _ = decoder
    student = decoder_student(teacher, {3: LayerSpec(6, 4, 64, [3], "block", attention="gqa", num_kv_heads=2)})
    with pytest.raises(ExportError, match="layer 3"):
        export(student, tok, hf_dir=tmp_path / "hf", gguf_file=tmp_path / "s.gguf")
    assert list(tmp_path.iterdir()) == []  # not even the Hugging Face folder


def test_a_failed_write_leaves_nothing_under_the_final_name(decoder, tmp_path, monkeypatch):
    import models.gguf_export as ge

    _, _, tok, student = decoder
    calls = []

    def failing(w, gguf_type):
        calls.append(w)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return stored(w, gguf_type)

    stored = ge.stored
    monkeypatch.setattr(ge, "stored", failing)
    (tmp_path / "s.gguf").write_bytes(b"previous")
    with pytest.raises(OSError):
        export_gguf(student, tmp_path / "s.gguf", tok)
    assert [p.name for p in tmp_path.iterdir()] == ["s.gguf"] and (tmp_path / "s.gguf").read_bytes() == b"previous"


# ---- llama.cpp itself ---------------------------------------------------------------------------------------------
STUDENTS = {  # beyond the heterogeneous one: plain architecture; deci with a zero linear attention in layer 0
    "layer_removal": {4: UNITS[4], 5: LayerSpec(0, 0, 0, [5], "dropped", attention="none")},
    "attention_free_first": {0: LayerSpec(0, 0, 64, [0], "layer", attention="none"), 3: UNITS[3]},
}


@pytest.fixture()
def llama_cpp():
    """Opens GGUF files in llama.cpp (``llama_cpp_model``), closes them after the test."""
    opened = []

    def load(path: Path):
        opened.append(llama_cpp_model(path))
        return opened[-1]
    yield load
    for llm in opened:
        llm.close()


@pytest.mark.parametrize("name", ["heterogeneous", *STUDENTS])
def test_llama_cpp_runs_the_student_as_we_do(name, decoder, llama_cpp, tmp_path):
    _, teacher, tok, student = decoder
    student = student if name == "heterogeneous" else decoder_student(teacher, STUDENTS[name])
    llm = llama_cpp(export_gguf(student, tmp_path / "s.gguf", tok, gguf_type="f32")[0])
    text = " ".join(make_sentences(8, seed=11))
    ids = tok(text)["input_ids"][:96]
    assert llm.tokenize(text.encode(), add_bos=False, special=False)[:96] == ids  # the tokenizer carried over
    check_runs_as_ours(llm, student, ids)


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_llama_cpp_runs_the_stored_types(gguf_type, decoder, llama_cpp, tmp_path):
    _, _, tok, student = decoder
    llm = llama_cpp(export_gguf(student, tmp_path / "s.gguf", tok, gguf_type=gguf_type)[0])
    ids = tok(" ".join(make_sentences(8, seed=12)))["input_ids"][:96]
    theirs = llama_cpp_logits(llm, ids)
    with torch.no_grad():
        ours = student(torch.tensor([ids])).logits[0]
    assert abs(perplexity(theirs, ids) / perplexity(ours, ids) - 1) <= 0.02


# ---- llama.cpp's own converter (its source tree: LLAMA_CPP_DIR, e.g. llama-cpp-python's vendor/llama.cpp) --------
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type, kw", [
    ("f32", {}), ("q8_0", {}),
    ("f32", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500.0, "tie_word_embeddings": True}),
    ("f32", {"model_type": "qwen2"}),
], ids=["f32", "q8_0", "llama3-rope-tied", "qwen2"])
def test_a_teacher_shape_student_is_the_file_llama_cpps_converter_writes(gguf_type, kw, tmp_path):
    from models.export import export_pretrained

    teacher, tok = load_teacher(make_decoder_teacher(tmp_path / "t", tokenizer="bpe", **kw))
    export_pretrained(teacher, tmp_path / "hf", tok)
    llama_cpp_convert(tmp_path / "hf", tmp_path / "theirs.gguf", gguf_type)
    ours = gguf.GGUFReader(str(export_gguf(teacher, tmp_path / "ours.gguf", tok, gguf_type=gguf_type)[0]))
    theirs = gguf.GGUFReader(str(tmp_path / "theirs.gguf"))
    mine = {t.name: t for t in ours.tensors}
    assert sorted(mine) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:  # Q/K permuted as llama.cpp wants them, stored in the same types
        assert mine[t.name].tensor_type == t.tensor_type and (mine[t.name].data == t.data).all(), t.name
    # the converter adds a size label; for qwen2 it leaves out head sizes and the vocabulary size (llama.cpp derives
    # them); the converter's pre-tokenizer here is patched, ours follows the split transformers gives a Qwen2
    named = ("general.name", "general.size_label", "GGUF.kv_count", "tokenizer.ggml.pre", "qwen2.attention.key_length",
             "qwen2.attention.value_length", "qwen2.rope.dimension_count", "qwen2.vocab_size")
    meta = {k: f.contents() for k, f in ours.fields.items() if k not in named}
    assert meta == {k: f.contents() for k, f in theirs.fields.items() if k not in named}


def test_a_model_without_any_kv_cache_is_refused(decoder, tmp_path):
    """llama.cpp cannot create a context for a model whose layers cache no keys and values (it fails to allocate an
    empty KV cache): refused in one line, nothing written."""
    _, teacher, tok, _ = decoder
    no_kv = {i: LayerSpec(0, 0, 64, [i], "block", attention="linear") for i in range(5)}
    no_kv[5] = LayerSpec(0, 0, 64, [5], "layer", attention="none")
    with pytest.raises(ExportError, match="needs one layer whose attention caches keys and values"):
        export_gguf(decoder_student(teacher, no_kv), tmp_path / "s.gguf", tok)
    assert not (tmp_path / "s.gguf").exists()
