"""MiniLMv2 self-attention relation distillation: the definition, across head counts, and that training lowers it."""
from __future__ import annotations

import json
import math

import pytest
import torch

import finetune_merged
import retrain_single_block
from models import load_teacher
from models.compress import compress_attention, random_attention
from utils.cli.run import flags_in_errors, run_main
from utils.training.losses import attention_vectors, relation_heads_for, relation_loss
from utils.training.tasks import BlockDistill, block_relation_heads


def _hand_relation_kl(s: torch.Tensor, t: torch.Tensor, n_valid: list[int], heads: int) -> float:
    """KL(teacher || student) of relation rows, written out with loops: mean over relation heads and real rows."""
    total, rows = 0.0, 0
    for b in range(s.shape[0]):
        n = n_valid[b]
        for i in range(n):
            row = 0.0
            for h in range(heads):
                def dist(x: torch.Tensor) -> list[float]:
                    d = x.shape[-1] // heads
                    v = x[b, :n, h * d:(h + 1) * d].double()
                    e = [math.exp(float(v[i] @ v[j]) / math.sqrt(d)) for j in range(n)]
                    z = sum(e)
                    return [a / z for a in e]
                p, q = dist(t), dist(s)
                row += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
            total += row / heads
            rows += 1
    return total / rows


def test_relation_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    B, T = 2, 5
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    t = {k: torch.randn(B, T, 12, generator=g) for k in ("query", "key", "value")}
    s = {k: torch.randn(B, T, 6, generator=g) for k in ("query", "key", "value")}  # other size: only D / R differs
    got = relation_loss(s, t, valid, heads=3).item()
    want = sum(_hand_relation_kl(s[k], t[k], [5, 3], 3) for k in ("query", "key", "value"))
    assert got == pytest.approx(want, rel=1e-5)
    # padding content does not matter
    for k in s:
        s[k][1, 3:] = 100.0
    assert relation_loss(s, t, valid, heads=3).item() == pytest.approx(want, rel=1e-5)
    # zero for identical relations, whatever the vector size
    assert relation_loss(t, t, valid, heads=3).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="relation heads do not divide"):
        relation_loss(s, t, valid, heads=4)


def test_relation_heads_default():
    assert relation_heads_for(384, 128, 12) == 8  # MiniLM 12x32 teacher, 4x32 student
    assert relation_heads_for(384, 192, 12) == 12
    assert relation_heads_for(768, 384, 12) == 12
    assert relation_heads_for(32, 8, 4) == 4


def _tiny(tiny_teacher):
    teacher, tok = load_teacher(str(tiny_teacher), torch.device("cpu"))
    teacher.eval().requires_grad_(False)
    ids = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 14, 15, 3, 0, 0]])
    att = (ids != 0).long()
    x = teacher.hidden_before(ids, att, 1)
    return teacher, ids, att, x


def test_relations_across_head_counts(tiny_teacher):
    teacher, ids, att, x = _tiny(tiny_teacher)
    cfg, t_attn = teacher.config, teacher.layers[1].attention  # 4 heads of 8
    valid = att.bool()
    t_vec = attention_vectors(t_attn, x)
    copy, _ = compress_attention(t_attn, cfg, num_heads=4, head_dim=8)
    assert relation_loss(attention_vectors(copy, x), t_vec, valid, heads=4).item() == pytest.approx(0.0, abs=1e-5)
    for heads, head_dim in ((2, 8), (1, 8), (2, 4), (8, 8)):
        student = random_attention(t_attn, cfg, num_heads=heads, head_dim=head_dim)
        r = block_relation_heads(t_attn, student, None)
        loss = relation_loss(attention_vectors(student, x), t_vec, valid, heads=r)
        assert torch.isfinite(loss) and loss.item() > 0
    with pytest.raises(ValueError, match="--relation-heads 3 must divide"), flags_in_errors():
        block_relation_heads(t_attn, random_attention(t_attn, cfg, num_heads=2, head_dim=8), 3)


def test_training_on_relations_lowers_them(tiny_teacher):
    teacher, ids, att, x = _tiny(tiny_teacher)
    torch.manual_seed(0)
    student = random_attention(teacher.layers[1].attention, teacher.config, num_heads=2, head_dim=8)
    task = BlockDistill(teacher, {1: student}, ["relations"])
    batch = {"input_ids": ids, "attention_mask": att, "index": torch.arange(2)}
    task.eval()
    with torch.no_grad():
        before = task(batch)[0].item()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    task.train()
    for _ in range(40):
        loss, _ = task(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    task.eval()
    with torch.no_grad():
        after = task(batch)[0].item()
    assert after < 0.5 * before
    assert task.rel_heads == {1: 4}  # 2 heads of 8 vs 4 of 8: 16 and 32 dims, both split into 4 relation heads


def _common(teacher, corpus):
    return ["--teacher", str(teacher), "--data-dir", str(corpus), "--device", "cpu", "--batch-size", "16"]


def test_scripts_take_relation_losses(tiny_teacher, tiny_corpus, tmp_path):
    c = _common(tiny_teacher, tiny_corpus)
    p = retrain_single_block.build_parser()
    argv = c + ["--block", "all", "--heads", "2", "--loss-on", "output+relations", "--relation-weight", "0.5",
                "--epochs", "1", "--out", str(tmp_path), "--run-name", "rel", "--cache-teacher",
                "--cache-dir", str(tmp_path / "cache")]
    assert run_main(lambda a: retrain_single_block.main(a, p), p, argv) == 0
    meta = json.loads((tmp_path / "rel" / "block_0" / "best" / "meta.json").read_text())
    assert meta["loss_on"] == ["output", "relations"] and meta["relation_weight"] == 0.5
    assert meta["relation_heads"] == "auto"
    bad = c + ["--block", "0", "--heads", "2", "--loss-on", "relations", "--relation-heads", "3", "--epochs", "1",
               "--out", str(tmp_path), "--run-name", "bad"]
    assert run_main(lambda a: retrain_single_block.main(a, p), p, bad) == 1
    fp = finetune_merged.build_parser()
    argv = c + ["--merged", str(tmp_path / "rel"), "--epochs", "1", "--relation-weight", "1", "--out",
                str(tmp_path), "--run-name", "ft"]
    assert run_main(finetune_merged.main, fp, argv) == 0
    meta = json.loads((tmp_path / "ft" / "model" / "best" / "meta.json").read_text())
    assert meta["relation_weight"] == 1.0
