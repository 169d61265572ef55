"""Grouped-query attention blocks (``--kv-heads``): the module against a hand computation, the initialiser, training,
and the whole path retrain -> assemble -> evaluate -> export (remote code in a clean subprocess, ONNX)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import eval_merged_12
import retrain_single_block
from helpers import common_args, load_elsewhere, make_hf_teacher, model_inputs, perturb
from helpers import run_in_process as _run
from models import BertAttention, LayerSpec, load_teacher
from models.bert import extended_mask
from models.compress import init_attention
from utils import assemble
from utils.training.students import load_model


def _hand_gqa(attn: BertAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The block output written out: query head h reads key/value head h // (heads / kv_heads)."""
    s = attn.self
    H, G, d = s.num_heads, s.num_kv_heads, s.head_dim
    B, T, _ = x.shape
    q = (x @ s.query.weight.T + s.query.bias).view(B, T, H, d)
    k = (x @ s.key.weight.T + s.key.bias).view(B, T, G, d)
    v = (x @ s.value.weight.T + s.value.bias).view(B, T, G, d)
    heads = []
    for h in range(H):
        g = h // (H // G)
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, g]) / math.sqrt(d)
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, :, g])
    return torch.cat(heads, dim=-1) @ attn.output.dense.weight.T + attn.output.dense.bias


def test_spec_rules_and_round_trip():
    spec = LayerSpec(4, 8, 64, [0], "block", attention="gqa", num_kv_heads=2)
    assert LayerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.shape_tag() == "h4_d8_kv2" and "num_kv_heads=2" in spec.attention_note()
    with pytest.raises(ValueError, match="divide"):
        LayerSpec(4, 8, 64, [0], attention="gqa", num_kv_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LayerSpec(4, 8, 64, [0], attention="gqa")
    old = {"num_heads": 4, "head_dim": 8, "intermediate_size": 64, "origin": [0], "kind": "block"}  # before specs
    assert LayerSpec.from_dict(old).attention == "mha"


def test_gqa_block_matches_hand_computation(tiny_teacher):
    teacher, _ = load_teacher(tiny_teacher)
    cfg = teacher.config
    spec = LayerSpec(4, 6, 64, [0], "block", attention="gqa", num_kv_heads=2)
    attn, _ = init_attention(teacher.layers[0].attention, cfg, spec, init="random")
    attn.eval()
    assert type(attn.self).__name__ == "GroupedQuerySelfAttention"  # chosen from the spec
    assert attn.self.key.out_features == 2 * 6 and attn.self.query.out_features == 4 * 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, cfg.hidden_size, generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        fast, _ = attn.contribution(x, extended_mask(mask))
        slow, trace = attn.contribution(x, extended_mask(mask), need_trace=True)
        hand = _hand_gqa(attn, x, mask)
    real = mask.bool()
    assert (fast - hand)[real].abs().max() < 1e-5
    assert (slow - hand)[real].abs().max() < 1e-5
    assert trace.probs.shape == (3, 4, 7, 7)


def test_gqa_init_from_teacher(tiny_teacher):
    teacher, _ = load_teacher(tiny_teacher)
    cfg, t_attn = teacher.config, teacher.layers[1].attention.eval()
    x = torch.randn(2, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = t_attn.contribution(x)
        # one key/value head per query head and the teacher's head_dim: the teacher's block itself
        same, note = init_attention(t_attn, cfg, LayerSpec(4, 8, 64, [1], attention="gqa", num_kv_heads=4))
        assert (same.eval().contribution(x)[0] - want).abs().max() < 1e-5 and "mean" in note
        err = {}
        for kv, d in ((2, 8), (2, 4), (1, 8)):
            spec = LayerSpec(4, d, 64, [1], attention="gqa", num_kv_heads=kv)
            for how in ("teacher", "random"):
                got, _ = init_attention(t_attn, cfg, spec, init=how)
                err[kv, d, how] = float((got.eval().contribution(x)[0] - want).pow(2).mean())
    for kv, d in ((2, 8), (2, 4), (1, 8)):  # pooled heads start nearer the teacher than a random block
        assert err[kv, d, "teacher"] < err[kv, d, "random"], err


def test_gqa_block_trains(tiny_teacher):
    teacher, _ = load_teacher(tiny_teacher)
    cfg, t_attn = teacher.config, teacher.layers[0].attention.eval()
    spec = LayerSpec(4, 8, 64, [0], attention="gqa", num_kv_heads=2)
    student, _ = init_attention(t_attn, cfg, spec, init="random")
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 10, cfg.hidden_size, generator=g)
    with torch.no_grad():
        target, _ = t_attn.contribution(x)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(student.contribution(x)[0], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_gqa_retrain_assemble_evaluate_export(tiny_teacher, tiny_corpus, tmp_path):
    c = common_args(tiny_teacher, tiny_corpus)
    assert _run(retrain_single_block, c + ["--block", "all", "--heads", "4", "--kv-heads", "2", "--epochs", "2",
                                           "--init", "teacher", "--head-dim", "6", "--out", str(tmp_path)]) == 0
    run = tmp_path / "blocks_h4_d6_kv2_output_mse"
    for i in (0, 1):
        meta = json.loads((run / f"block_{i}" / "best" / "meta.json").read_text())
        assert meta["spec"]["attention"] == "gqa" and meta["spec"]["num_kv_heads"] == 2
        assert meta["metrics"]  # validation loss recorded
    # a --kv-heads that does not match the starting checkpoint is refused, one line
    assert _run(retrain_single_block, c + ["--block", "0", "--kv-heads", "1", "--model-checkpoint", str(run),
                                           "--out", str(tmp_path / "other")]) == 1
    assert assemble.main(["--teacher", str(tiny_teacher), "--blocks", str(run), "--out", str(tmp_path / "asm"),
                          "--export-hf", str(tmp_path / "hf"), "--export-onnx", str(tmp_path / "m.onnx")]) == 0
    model, _ = load_model(tmp_path / "asm")
    assert [s.attention for s in model.config.layers] == ["gqa", "gqa"]
    assert [s.num_kv_heads for s in model.config.layers] == [2, 2]
    assert _run(eval_merged_12, c + ["--model", str(tmp_path / "asm"), "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]
    assert res["student_params"] < res["teacher_params"] and "agreement_top1" in res
    assert any(tmp_path.glob("m*.onnx"))  # written, and checked against ours (1e-4) by the exporter itself


@pytest.mark.slow
def test_gqa_export_parity(tmp_path):
    teacher, tok = load_teacher(make_hf_teacher(tmp_path / "teacher", layers=2, hidden=32, heads=8, ffn=64))
    cfg = teacher.config
    blocks = {0: init_attention(teacher.layers[0].attention, cfg,
                                LayerSpec(8, 4, 64, [0], attention="gqa", num_kv_heads=2))[0],
              1: init_attention(teacher.layers[1].attention, cfg,
                                LayerSpec(4, 6, 64, [1], attention="gqa", num_kv_heads=1))[0]}
    from models.compress import clone_model, compose
    from models.export import export_pretrained

    model = perturb(clone_model(compose(teacher, blocks=blocks)), seed=4)
    folder, kind = export_pretrained(model, tmp_path / "hf", tok)
    assert kind.startswith("CompactBertForMaskedLM")
    x = model_inputs(cfg.vocab_size)
    torch.save(x, tmp_path / "inputs.pt")
    case = {"gqa": {"dir": str(folder), "inputs": str(tmp_path / "inputs.pt"), "out": str(tmp_path / "out.pt"),
                    "mlm": True, "remote": True}}
    load_elsewhere(case, tmp_path)
    with torch.no_grad():
        ours = model(x["ids"], x["mask"]).logits
    theirs = torch.load(tmp_path / "out.pt")
    assert (theirs - ours)[x["mask"].bool()].abs().max() <= 1e-5
    pytest.importorskip("onnxruntime")
    from models.onnx_export import export_onnx

    done = export_onnx(model, tmp_path / "model.onnx")  # raises when ONNX Runtime differs by more than 1e-4
    assert all(diff <= 1e-4 for _, diff in done.values())
