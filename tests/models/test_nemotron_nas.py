"""Decoder students in the DeciLM / Nemotron-NAS layout (``--hf-layout nemotron-nas``): block configs and weight
names as vLLM and llama.cpp's converter read them, the folder loaded by transformers (trust_remote_code, a clean
process) with our logits and greedy tokens, what the layout cannot express refused in one line with nothing written,
and — where a llama.cpp tree (LLAMA_CPP_DIR) and llama-cpp-python are there — the folder turned into GGUF by
llama.cpp's own converter running as ours does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (check_runs_as_ours, decoder_student, heterogeneous_units, llama_cpp_convert, llama_cpp_model,
                     load_decoders_elsewhere, make_decoder_teacher, make_sentences, model_inputs)
from models import LayerSpec, load_teacher
from models.export import ExportError
from models.nemotron_nas import export_nemotron_nas

# teacher: 6 layers, hidden 48, 6 query heads over 2 KV heads of 8, SwiGLU 512 (on the layout's FFN grid)
UNITS = heterogeneous_units(512)
ATTENTION_ONLY = {5: LayerSpec(6, 8, 0, [5], "layer", attention="gqa", num_kv_heads=2)}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_teacher(make_decoder_teacher(tmp_path_factory.mktemp("nas_teacher"), layers=6, ffn=512,
                                             tokenizer="bpe"))


@pytest.fixture(scope="module")
def exported(teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nas_export")
    model, tok = teacher
    students = {"heterogeneous": decoder_student(model, UNITS),
                "attention_only": decoder_student(model, ATTENTION_ONLY)}
    ids, mask = model_inputs(model.config.vocab_size).values()
    torch.save({"ids": ids, "mask": mask, "prompt": ids[:2, :5]}, tmp / "inputs.pt")
    cases = {}
    for name, m in students.items():
        folder, _ = export_nemotron_nas(m, tmp / name, tok)
        cases[name] = {"dir": str(folder), "inputs": str(tmp / "inputs.pt"), "out": str(tmp / f"{name}.pt"),
                       "remote": True}
    return {"students": students, "cases": cases, "tmp": tmp, "report": load_decoders_elsewhere(cases, tmp)}


def test_block_configs_and_weight_names_are_the_layouts(exported):
    folder = Path(exported["cases"]["heterogeneous"]["dir"])
    config = json.loads((folder / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["DeciLMForCausalLM"], "nemotron-nas")
    attn = [b["attention"] for b in config["block_configs"]]
    ffn = [b["ffn"] for b in config["block_configs"]]
    assert [a["n_heads_in_group"] for a in attn] == [6, None, None, 3, None, 3]
    assert [a["no_op"] for a in attn] == [False, True, False, False, True, False] and attn[2]["replace_with_linear"]
    assert [f["ffn_mult"] for f in ffn] == [16.0, 16.0, 16.0, 8.0, None, 16.0] and ffn[4]["no_op"]
    keys = load_file(str(folder / "model.safetensors"))
    assert "model.layers.2.self_attn.linear_attn.weight" in keys and "model.layers.2.input_layernorm.weight" in keys
    assert not any(k.startswith(("model.layers.1.input_layernorm", "model.layers.4.")) for k in keys)
    assert "model.layers.1.post_attention_layernorm.weight" in keys
    assert {"modeling_nemotron_nas.py", "modeling_compact_llama.py", "llama.py"} <= {p.name for p in folder.iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["heterogeneous", "attention_only"])
def test_transformers_loads_the_folder_with_our_logits_and_tokens(exported, name):
    model, case = exported["students"][name], exported["cases"][name]
    x, theirs = torch.load(case["inputs"]), torch.load(case["out"])
    with torch.no_grad():
        ours = model(x["ids"], x["mask"]).logits
    assert (theirs["logits"] - ours)[x["mask"].bool()].abs().max() <= 1e-5
    assert torch.equal(theirs["generated"], model.generate(x["prompt"], 10))
    assert exported["report"][name]["class"] == "DeciLMForCausalLM"


@pytest.mark.parametrize("unit, expected", [
    (LayerSpec(4, 8, 512, [3], "block", attention="gqa", num_kv_heads=2), "layer 3: 4 query heads of 8"),
    (LayerSpec(6, 8, 320, [3], "pruned", attention="gqa", num_kv_heads=2), "layer 3: FFN width 320 is off"),
])
def test_what_the_layout_cannot_express_is_refused_naming_the_layer(unit, expected, teacher, tmp_path):
    model, tok = teacher
    with pytest.raises(ExportError) as e:
        export_nemotron_nas(decoder_student(model, {3: unit}), tmp_path / "nas", tok)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_qwen2_student_is_refused_for_its_biases(tmp_path):
    model, tok = load_teacher(make_decoder_teacher(tmp_path / "q", model_type="qwen2", ffn=512, tokenizer="bpe"))
    with pytest.raises(ExportError, match="it has no biases"):
        export_nemotron_nas(model, tmp_path / "nas", tok)
    assert not (tmp_path / "nas").exists()


@pytest.mark.slow
def test_llama_cpps_converter_turns_the_folder_into_a_gguf_that_runs_as_ours(exported, teacher):
    model, tok = exported["students"]["heterogeneous"], teacher[1]
    out = llama_cpp_convert(Path(exported["cases"]["heterogeneous"]["dir"]), exported["tmp"] / "converted.gguf")
    llm = llama_cpp_model(out)
    try:
        check_runs_as_ours(llm, model, tok(" ".join(make_sentences(8, seed=11)))["input_ids"][:96])
    finally:
        llm.close()


def test_the_config_reads_block_configs_as_vllm_does(exported):
    import importlib.util

    folder = Path(exported["cases"]["heterogeneous"]["dir"])
    spec = importlib.util.spec_from_file_location("models.modeling_nemotron_nas", folder / "modeling_nemotron_nas.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.DeciLMConfig(**json.loads((folder / "config.json").read_text()))
    assert config.block_configs[0].attention.n_heads_in_group == 6 and config.block_configs[4].ffn.no_op
    assert json.loads(config.to_json_string())["block_configs"][3]["ffn"]["ffn_mult"] == 8.0
    assert "student" not in config.to_dict()


def test_our_loader_reads_the_folder_back_as_a_teacher_with_identical_logits(exported):
    folder = exported["cases"]["heterogeneous"]["dir"]
    model, tok = load_teacher(folder)
    student = exported["students"]["heterogeneous"]
    assert [s.describe() for s in model.config.layers] == [s.describe() for s in student.config.layers]
    ids = torch.tensor([tok(" ".join(make_sentences(4, seed=5)))["input_ids"][:40]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, student(ids).logits)
