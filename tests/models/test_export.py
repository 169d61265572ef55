"""Every student exports to a Hugging Face folder that loads without this repository, and to ONNX.

The exported folders are loaded in ONE subprocess whose cwd is a temporary folder and whose PYTHONPATH is empty, so
neither ``models`` nor ``utils`` can be imported there: only transformers and the folder's own files.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import SENTENCE, load_decoders_elsewhere, load_elsewhere, make_hf_teacher, model_inputs, perturb
from models import BertForMaskedLM, LayerSpec, ModelConfig, load_teacher
from models.compress import clone_model, compose, compress_attention, init_attention, init_merged_layer
from models.export import ExportError, check_writable_target, export_pretrained


def _students(teacher: BertForMaskedLM) -> dict[str, BertForMaskedLM]:
    """Teacher: 3 layers, hidden 32, 8 heads of 4, ffn 64."""
    cfg = teacher.config
    out = {}
    blocks = {i: compress_attention(l.attention, cfg, num_heads=4, head_dim=4)[0]
              for i, l in enumerate(teacher.layers)}
    out["blocks_4_heads"] = clone_model(compose(teacher, blocks=blocks))
    mixed = {0: compress_attention(teacher.layers[0].attention, cfg, num_heads=4, head_dim=4)[0],
             1: compress_attention(teacher.layers[1].attention, cfg, num_heads=2, head_dim=6)[0]}  # layer 2: 8 x 4
    out["mixed_heads"] = clone_model(compose(teacher, blocks=mixed))
    spec = LayerSpec(4, 8, 48, [0, 1], "merged")  # 3 layers -> 2, the merged one with its own shape
    layer, _ = init_merged_layer(cfg, spec, teacher.layers[0], second=teacher.layers[1], mode="average")
    out["merged_3_to_2"] = clone_model(compose(teacher, merges={0: (layer, spec)}))
    plain = LayerSpec(8, 4, 64, [1, 2], "merged")  # every layer keeps the teacher's attention shape
    layer, _ = init_merged_layer(cfg, plain, teacher.layers[1], second=teacher.layers[2], mode="first")
    out["merged_plain"] = clone_model(compose(teacher, merges={1: (layer, plain)}))
    pruned = ModelConfig.from_dict(cfg.to_dict())
    pruned.layers = [LayerSpec(8, 4, f, [i], "pruned") for i, f in enumerate((64, 40, 24))]
    out["pruned_ffn"] = perturb(BertForMaskedLM(pruned), seed=1)
    enc = ModelConfig.from_dict({**cfg.to_dict(), "has_mlm_head": False})
    enc.layers = [LayerSpec(2, 8, 64, [0], "block"), LayerSpec(8, 4, 32, [1], "pruned")]
    out["encoder_only"] = perturb(BertForMaskedLM(enc), seed=2)
    return {k: m.eval() for k, m in out.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    teacher, tok = load_teacher(make_hf_teacher(tmp / "teacher", layers=3, hidden=32, heads=8, ffn=64))
    students = _students(teacher)
    x = model_inputs(teacher.config.vocab_size)
    torch.save(x, tmp / "inputs.pt")
    cases, kinds = {}, {}
    for name, m in students.items():
        folder, kinds[name] = export_pretrained(m, tmp / name, tok)
        cases[name] = {"dir": str(folder), "inputs": str(tmp / "inputs.pt"), "out": str(tmp / f"{name}.pt"),
                       "mlm": m.has_mlm_head, "remote": "Compact" in kinds[name]}
    run = load_elsewhere(cases, tmp)
    line = next(l for l in run.stdout.splitlines() if l.startswith("REPORT "))
    return {"students": students, "tok": tok, "x": x, "cases": cases, "kinds": kinds,
            "report": json.loads(line[len("REPORT "):])}


@pytest.mark.parametrize("name", ["blocks_4_heads", "mixed_heads", "merged_3_to_2", "merged_plain", "pruned_ffn",
                                  "encoder_only"])
@pytest.mark.slow
def test_export_loads_elsewhere_with_same_outputs(exported, name):
    model, case, x = exported["students"][name], exported["cases"][name], exported["x"]
    with torch.no_grad():
        ours = model(x["ids"], x["mask"])
    ours = ours.logits if model.has_mlm_head else ours.last_hidden_state
    theirs = torch.load(case["out"])
    real = x["mask"].bool()
    assert theirs.shape == ours.shape
    assert (theirs - ours)[real].abs().max() <= 1e-5
    report = exported["report"][name]
    if name == "merged_plain":  # the teacher's attention shape everywhere: a plain BERT, no remote code
        assert report["class"] == "BertForMaskedLM" and not case["remote"]
        config = json.loads((Path(case["dir"]) / "config.json").read_text())
        assert config["model_type"] == "bert" and "auto_map" not in config
    else:
        assert case["remote"] and report["class"].startswith("CompactBert")
        config = json.loads((Path(case["dir"]) / "config.json").read_text())
        # a plain BertConfig (the tokenizer loads without remote code); plain BERT classes refuse these shapes
        assert config["model_type"] == "bert" and "AutoModel" in config["auto_map"]
        assert "AutoConfig" not in config["auto_map"]
        assert [(p["num_heads"], p["head_dim"], p["intermediate_size"]) for p in config["layer_plan"]] == [
            (s.num_heads, s.head_dim, s.intermediate_size) for s in model.config.layers]
    if model.has_mlm_head:  # the fill-mask pipeline ranks tokens as our logits do
        tok = exported["tok"]
        enc = tok(SENTENCE, return_tensors="pt")
        pos = int((enc["input_ids"][0] == tok.mask_token_id).nonzero())
        with torch.no_grad():
            top = model(enc["input_ids"], enc["attention_mask"]).logits[0, pos].topk(3).indices.tolist()
        assert report["fill"] == top


@pytest.mark.slow
@pytest.mark.parametrize("name", ["blocks_4_heads", "mixed_heads", "merged_3_to_2", "pruned_ffn", "encoder_only"])
def test_onnx_matches_ours(exported, name, tmp_path):
    pytest.importorskip("onnxruntime")
    from models.onnx_export import encoder_path, export_onnx

    model = exported["students"][name]
    done = export_onnx(model, tmp_path / "model.onnx")  # raises when ONNX Runtime differs by more than 1e-4
    assert set(done) == ({"encoder", "masked-LM"} if model.has_mlm_head else {"encoder"})
    if model.has_mlm_head:
        assert done["encoder"][0] == encoder_path(tmp_path / "model.onnx")
    assert all(diff <= 1e-4 for _, diff in done.values())


def test_export_targets_checked_before_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        check_writable_target(tmp_path / "a_file", "--export-hf folder", is_dir=True)
    with pytest.raises(ExportError, match="cannot be created"):
        check_writable_target(tmp_path / "a_file" / "sub" / "m.onnx", "--export-onnx file", is_dir=False)
    with pytest.raises(ExportError, match="is a folder"):
        check_writable_target(tmp_path, "--export-onnx file", is_dir=False)
    assert check_writable_target(tmp_path / "new" / "dir", "--export-hf folder",
                                 is_dir=True) == tmp_path / "new" / "dir"


def test_finetune_refuses_unwritable_export_before_training(tiny_teacher, tiny_corpus, tmp_path, capsys):
    import finetune_merged
    from utils.cli.run import run_main

    (tmp_path / "a_file").write_text("x")
    argv = ["--teacher", str(tiny_teacher), "--data-dir", str(tiny_corpus), "--drop-every-second", "--out",
            str(tmp_path / "runs"), "--export-hf", str(tmp_path / "a_file" / "hf")]
    assert run_main(finetune_merged.main, finetune_merged.build_parser(), argv) == 1
    assert "--export-hf folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was trained


# ---- decoders -----------------------------------------------------------------------------------------------------
def _decoder_students(teacher) -> dict:
    """Teacher: 4 layers, hidden 48, 6 query heads over 2 KV heads of 8, SwiGLU 64."""
    cfg, t = teacher.config, teacher.layers
    heads = {0: init_attention(t[0].block, cfg, LayerSpec(6, 8, 64, [0], attention="gqa", num_kv_heads=1))[0],
             2: init_attention(t[2].block, cfg, LayerSpec(4, 8, 64, [2], attention="gqa", num_kv_heads=2))[0],
             3: init_attention(t[3].block, cfg, LayerSpec(0, 0, 64, [3], attention="linear"))[0]}
    no_attn = LayerSpec(0, 0, 32, [1], "layer", attention="none")
    dropped = LayerSpec(0, 0, 0, [3], "dropped", attention="none")
    merged = LayerSpec(6, 8, 48, [1, 2], "merged", attention="gqa", num_kv_heads=2)
    return {
        "heterogeneous": compose(teacher, blocks=heads,
                                 layers={1: (init_merged_layer(cfg, no_attn, t[1], mode="first")[0], no_attn)}),
        "merged_and_dropped": compose(
            teacher, merges={1: (init_merged_layer(cfg, merged, t[1], second=t[2], mode="first")[0], merged)},
            layers={3: (init_merged_layer(cfg, dropped, t[3], mode="first")[0], dropped)}),
        "teacher_shape": clone_model(teacher),
    }


@pytest.fixture(scope="module")
def decoder_exported(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("decoder_export")
    teacher, tok = load_teacher(tiny_llama)
    students = {k: clone_model(m).eval() for k, m in _decoder_students(teacher).items()}
    ids, mask = model_inputs(teacher.config.vocab_size).values()
    x = {"ids": ids, "mask": mask, "prompt": ids[:2, :5]}
    torch.save(x, tmp / "inputs.pt")
    cases, kinds = {}, {}
    for name, m in students.items():
        folder, kinds[name] = export_pretrained(m, tmp / name, tok)
        cases[name] = {"dir": str(folder), "inputs": str(tmp / "inputs.pt"), "out": str(tmp / f"{name}.pt"),
                       "remote": "Compact" in kinds[name]}
    return {"students": students, "x": x, "cases": cases, "kinds": kinds, "report": load_decoders_elsewhere(cases, tmp)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["heterogeneous", "merged_and_dropped", "teacher_shape"])
def test_decoder_export_loads_elsewhere_and_generates_like_ours(decoder_exported, name):
    model, case, x = decoder_exported["students"][name], decoder_exported["cases"][name], decoder_exported["x"]
    theirs = torch.load(case["out"])
    with torch.no_grad():
        ours = model(x["ids"], x["mask"]).logits
    real = x["mask"].bool()
    assert (theirs["logits"] - ours)[real].abs().max() <= 1e-5
    assert torch.equal(theirs["generated"], model.generate(x["prompt"], 10))  # transformers' KV cache included
    cls = decoder_exported["report"][name]["class"]
    assert cls == ("LlamaForCausalLM" if name == "teacher_shape" else "CompactLlamaForCausalLM")
    assert case["remote"] == (name != "teacher_shape")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["heterogeneous", "merged_and_dropped"])
def test_decoder_onnx_matches_ours(decoder_exported, name, tmp_path):
    pytest.importorskip("onnxruntime")
    from models.onnx_export import export_onnx

    done = export_onnx(decoder_exported["students"][name], tmp_path / "model.onnx")
    assert set(done) == {"encoder", "causal-LM"} and all(diff <= 1e-4 for _, diff in done.values())
