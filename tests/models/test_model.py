"""Swapping blocks, merging layers, saving and reloading, Hugging Face export, legacy checkpoint names."""
from __future__ import annotations

import pytest
import torch

from helpers import make_hf_teacher
from models import BertAttention, BertLayer, LayerSpec, export_hf, hf_export_problem, load_teacher
from models.compress import clone_model, compose, compress_attention, init_merged_layer
from utils.training.students import load_model, save_model


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_swap_and_merge_then_reload_identical(tiny_teacher, tmp_path):
    teacher, _ = load_teacher(tiny_teacher)
    cfg = teacher.config
    model = clone_model(teacher)
    attn = BertAttention(cfg, 2, 5)
    model.replace_attention(0, attn)
    spec = LayerSpec(3, 6, 40, [0, 1], "merged")
    model.merge_layers(0, BertLayer(cfg, spec), spec)
    assert len(model.layers) == 1 and model.config.layers[0].num_heads == 3
    ids, mask = _batch(cfg.vocab_size)
    save_model(model.eval(), tmp_path / "m", {"teacher": "tiny"})
    again, meta = load_model(tmp_path / "m")
    assert meta["config"]["layers"][0]["origin"] == [0, 1]
    with torch.no_grad():
        a, b = model(ids, mask), again(ids, mask)
    assert torch.equal(a.logits, b.logits)
    assert again.config.describe() == model.config.describe()


def test_swapped_block_changes_only_that_layer(tiny_teacher):
    teacher, _ = load_teacher(tiny_teacher)
    ids, mask = _batch(teacher.config.vocab_size)
    new, note = compress_attention(teacher.layers[1].attention, teacher.config, num_heads=2, head_dim=8)
    view = compose(teacher, blocks={1: new})
    assert view.config.layers[1].num_heads == 2 and teacher.config.layers[1].num_heads == 4
    with torch.no_grad():
        t = teacher(ids, mask, output_hidden_states=True)
        s = view(ids, mask, output_hidden_states=True)
    assert torch.equal(t.hidden_states[1], s.hidden_states[1])  # layer 0 untouched
    assert not torch.allclose(t.hidden_states[2], s.hidden_states[2])
    assert "kept heads" in note


def test_compress_attention_full_shape_is_exact(tiny_teacher):
    teacher, _ = load_teacher(tiny_teacher)
    attn = teacher.layers[0].attention
    new, _ = compress_attention(attn, teacher.config, num_heads=attn.num_heads, head_dim=attn.head_dim)
    x = torch.randn(2, 7, teacher.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(new.eval().contribution(x)[0], attn.contribution(x)[0], atol=1e-6)


def test_svd_head_dim_reduction_beats_truncation(tiny_teacher):
    """The low-rank projection approximates the block better than keeping the first d coordinates of each head."""
    teacher, _ = load_teacher(tiny_teacher)
    attn = teacher.layers[0].attention
    x = torch.randn(4, 9, teacher.config.hidden_size)
    with torch.no_grad():
        ref = attn.contribution(x)[0]
        svd, note = compress_attention(attn, teacher.config, num_heads=attn.num_heads, head_dim=attn.head_dim // 2)
        err_svd = (svd.eval().contribution(x)[0] - ref).norm()
        naive = BertAttention(teacher.config, attn.num_heads, attn.head_dim // 2).eval()
        d, dt = attn.head_dim // 2, attn.head_dim
        rows = torch.cat([torch.arange(h * dt, h * dt + d) for h in range(attn.num_heads)])
        for name in ("query", "key", "value"):
            getattr(naive.self, name).weight.copy_(getattr(attn.self, name).weight[rows])
            getattr(naive.self, name).bias.copy_(getattr(attn.self, name).bias[rows])
        naive.output.dense.weight.copy_(attn.output.dense.weight[:, rows])
        naive.output.dense.bias.copy_(attn.output.dense.bias)
        err_naive = (naive.contribution(x)[0] - ref).norm()
    assert "SVD" in note
    assert err_svd < err_naive


def test_merged_layer_init_modes(tiny_teacher):
    teacher, _ = load_teacher(tiny_teacher)
    cfg = teacher.config
    spec = LayerSpec(4, 8, 64, [0, 1], "merged")
    x = torch.randn(2, 5, cfg.hidden_size)
    first, _ = init_merged_layer(cfg, spec, teacher.layers[0], second=teacher.layers[1], mode="first")
    second, _ = init_merged_layer(cfg, spec, teacher.layers[0], second=teacher.layers[1], mode="second")
    with torch.no_grad():
        assert torch.allclose(first.eval()(x), teacher.layers[0](x), atol=1e-6)
        assert torch.allclose(second.eval()(x), teacher.layers[1](x), atol=1e-6)
    avg, _ = init_merged_layer(cfg, spec, teacher.layers[0], second=teacher.layers[1], mode="average")
    w = (teacher.layers[0].intermediate.dense.weight + teacher.layers[1].intermediate.dense.weight) / 2
    assert torch.allclose(avg.intermediate.dense.weight, w)
    with pytest.raises(ValueError, match="first, second, average or random"):
        init_merged_layer(cfg, spec, teacher.layers[0], second=teacher.layers[1], mode="middle")


def test_merge_last_layer_refused(tiny_teacher):
    teacher, _ = load_teacher(tiny_teacher)
    spec = LayerSpec(4, 8, 64, [1, 2], "merged")
    with pytest.raises(IndexError, match="cannot merge layer 1"):
        clone_model(teacher).merge_layers(1, BertLayer(teacher.config, spec), spec)


def test_hf_export_round_trip(tiny_teacher, tmp_path):
    from transformers import BertForMaskedLM

    teacher, tok = load_teacher(tiny_teacher)
    model = clone_model(teacher)
    spec = LayerSpec(4, 8, 64, [0, 1], "merged")
    layer, _ = init_merged_layer(teacher.config, spec, teacher.layers[0], second=teacher.layers[1], mode="average")
    model.merge_layers(0, layer, spec)
    export_hf(model.eval(), tmp_path / "hf", tok)
    hf = BertForMaskedLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids, mask = _batch(teacher.config.vocab_size)
    with torch.no_grad():
        diff = (hf(input_ids=ids, attention_mask=mask).logits - model(ids, mask).logits)[mask.bool()].abs().max()
    assert diff < 1e-4
    model.replace_attention(0, BertAttention(teacher.config, 2, 8))
    assert "heads x head_dim" in hf_export_problem(model.config)
    with pytest.raises(ValueError, match="cannot export"):
        export_hf(model, tmp_path / "hf2")


def test_legacy_gamma_beta_names_load(tmp_path):
    """Old TF-converted checkpoints (bert-base-uncased) name LayerNorm parameters gamma/beta."""
    from safetensors.torch import load_file, save_file

    folder = make_hf_teacher(tmp_path / "t")
    sd = load_file(str(folder / "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in sd.items()}
    assert any(k.endswith("gamma") for k in renamed)
    ref, _ = load_teacher(folder)
    save_file(renamed, str(folder / "model.safetensors"))
    old, _ = load_teacher(folder)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, old.state_dict()[k]), k
