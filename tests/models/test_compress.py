"""models/compress.py: a narrower feed-forward part's output projection refit by least squares on probe inputs, for
both families (Llama's gated MLP without bias, BERT's with one)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models import load_teacher
from models.compress import init_merged_layer, neuron_scores, refit_down_proj


def _ffn_error(layer, teacher_layer, a: torch.Tensor) -> float:
    """Relative squared error of ``layer``'s feed-forward output against ``teacher_layer``'s on inputs ``a``."""
    with torch.no_grad():
        want = teacher_layer.neurons(a) @ teacher_layer.down_proj.weight.T
        got = layer.neurons(a) @ layer.down_proj.weight.T
    return ((got - want).pow(2).sum() / want.pow(2).sum()).item()


def _narrow(family_teacher, width: int):
    """The teacher with layer 1's second half of neurons near-copies of its first half (as trained models have
    correlated neurons; independent random ones leave nothing to recover), and a spec keeping ``width`` of them."""
    ours, _ = load_teacher(family_teacher)
    cfg = ours.config
    t = ours.layers[1]
    torch.manual_seed(1)
    with torch.no_grad():
        for lin in (t.up_proj, t.gate_proj):
            if lin is not None:
                half = lin.out_features // 2
                lin.weight[half:] = lin.weight[:half] * (1 + 0.05 * torch.randn_like(lin.weight[:half]))
                if lin.bias is not None:
                    lin.bias[half:] = lin.bias[:half]
    return ours, cfg, dataclasses.replace(cfg.layers[1], intermediate_size=width, origin=[1], kind="layer")


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_teacher"])
def test_refit_beats_the_copy_on_unseen_inputs_and_keeps_neurons_and_bias(family, request):
    ours, cfg, spec = _narrow(request.getfixturevalue(family), 32)
    t = ours.layers[1]
    torch.manual_seed(0)
    fit_on, unseen = torch.randn(2000, cfg.hidden_size), torch.randn(500, cfg.hidden_size)
    score = neuron_scores(t, fit_on)
    copied, note = init_merged_layer(cfg, spec, t, mode="first", neuron_score=score)
    refit, refit_note = init_merged_layer(cfg, spec, t, mode="first", neuron_score=score, ffn_inputs=fit_on)
    assert "top 32 of" in note and "refit on 2000 tokens" in refit_note and "refit" not in note
    for name in ("up_proj", "gate_proj"):  # the same neurons; only the output projection moves
        a, b = getattr(copied, name, None), getattr(refit, name, None)
        if a is not None:
            assert torch.equal(a.weight, b.weight)
    assert not torch.equal(copied.down_proj.weight, refit.down_proj.weight)
    if refit.down_proj.bias is not None:
        assert torch.equal(refit.down_proj.bias, t.down_proj.bias)
    assert _ffn_error(refit, t, unseen) < 0.8 * _ffn_error(copied, t, unseen)
    assert _ffn_error(refit, t, fit_on) < _ffn_error(copied, t, fit_on)


def test_ridge_shrinks_towards_the_copy_and_refuses_bad_requests(tiny_llama):
    ours, cfg, spec = _narrow(tiny_llama, 24)
    t = ours.layers[1]
    few = torch.randn(8, cfg.hidden_size)  # fewer tokens than kept neurons
    copied, _ = init_merged_layer(cfg, spec, t, mode="first")
    held, _ = init_merged_layer(cfg, spec, t, mode="first")
    refit_down_proj(t, held, few, ridge=1e6)
    assert torch.allclose(held.down_proj.weight, copied.down_proj.weight, atol=1e-4)
    loose, _ = init_merged_layer(cfg, spec, t, mode="first")
    refit_down_proj(t, loose, few, ridge=1e-3)
    assert _ffn_error(loose, t, few) < 0.1 * _ffn_error(copied, t, few)  # it does fit what it saw
    with pytest.raises(ValueError, match="ridge must be positive"):
        refit_down_proj(t, loose, few, ridge=0)
    merged = dataclasses.replace(spec, origin=[1, 2], kind="merged")
    with pytest.raises(ValueError, match="single-layer unit"):
        init_merged_layer(cfg, merged, t, second=ours.layers[2], mode="first", ffn_inputs=few)
    full, note = init_merged_layer(cfg, cfg.layers[1], t, mode="first", ffn_inputs=few)
    assert note.endswith("ffn copied") and torch.equal(full.down_proj.weight, t.down_proj.weight)
