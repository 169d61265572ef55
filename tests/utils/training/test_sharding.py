"""utils/training/sharding.py in one process: the settings it refuses, the sharded resume point's round trip (DCP
without a process group), and what it measures. The sharded runs themselves are in tests/scripts/test_fsdp.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.errors import SettingError
from utils.storage.checkpoint import CheckpointError
from utils.training import sharding
from utils.training.loop import TrainConfig, Trainer, Unit

CPU = torch.device("cpu")


class Tiny(nn.Module):
    """A whole model in the shape the sharding expects: ``layers`` (a ModuleList) and a head."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _stepped(seed: int) -> tuple[Tiny, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("settings, device, message", [
    ({"fsdp": True, "dtype": "bf16"}, CPU, "`dtype` bf16 needs a GPU"),
    ({"dtype": "bf16"}, torch.device("cuda"), "`dtype` bf16 is the mixed precision of `fsdp`"),
    ({"fsdp": True, "dtype": "fp16"}, CPU, "`dtype` must be one of fp32, bf16"),
])
def test_settings_that_do_not_go_together_are_refused(settings, device, message):
    with pytest.raises(SettingError, match=message):
        sharding.check_settings(TrainConfig(**settings), device)


def test_only_whole_models_are_sharded(tmp_path):
    """A block unit (no ``layers``) under --fsdp is refused naming the unit, before any optimizer exists."""
    lin = nn.Linear(4, 1)
    unit = Unit("block_3", lin, tmp_path / "block_3", {"kind": "block"})
    with pytest.raises(SettingError, match=r"units \['block_3'\] are not whole models"):
        Trainer(lin, [unit], TrainConfig(fsdp=True), run_dir=tmp_path, device=CPU, evaluate=dict)
    assert TrainConfig(fsdp=True, activation_checkpointing=True).unsharded() == TrainConfig()


def test_shards_round_trip_into_another_model_and_optimizer(tmp_path):
    model, opt = _stepped(0)
    digest = sharding.write_shards(model, opt, tmp_path / "shards", stamp="run:1")
    other, other_opt = _stepped(1)  # other weights and other AdamW moments
    sharding.read_shards(other, other_opt, tmp_path / "shards", expected=digest)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    for p, q in zip(model.parameters(), other.parameters()):
        assert all(torch.equal(opt.state[p][k], other_opt.state[q][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert sharding.full_state_dict(other).keys() == model.state_dict().keys()  # unsharded: the module's own


def test_shards_of_another_save_are_refused(tmp_path):
    model, opt = _stepped(0)
    sharding.write_shards(model, opt, tmp_path / "a", stamp="run:1")
    other = sharding.write_shards(model, opt, tmp_path / "b", stamp="run:2")  # the same layout, another save
    with pytest.raises(CheckpointError, match="not the ones its train_state.pt was saved with"):
        sharding.read_shards(model, opt, tmp_path / "a", expected=other)
    with pytest.raises(CheckpointError, match="has no .metadata"):
        sharding.read_shards(model, opt, tmp_path / "missing", expected=other)
    for f in (tmp_path / "b").glob("*.distcp"):
        f.write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match="cannot be read as the sharded resume point"):
        sharding.read_shards(model, opt, tmp_path / "b", expected=other)


def test_local_bytes_count_parameters_and_adam_moments():
    model, opt = _stepped(0)
    n = sum(p.numel() for p in model.parameters())
    assert sharding.local_bytes(model, opt) == {"parameters": 4 * n, "optimizer": 8 * n}  # fp32; the step counts not


def test_activation_checkpointing_recomputes_the_same_gradients():
    """A checkpointed layer runs its forward again in the backward pass and gives the same gradients."""
    torch.manual_seed(0)
    plain, x = Tiny(), torch.randn(8, 4)
    ckpt = Tiny()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for layer in ckpt.layers:
        inner = layer.forward
        layer.forward = sharding._checkpointed(lambda *a, inner=inner: calls.append(1) or inner(*a))
    plain(x).pow(2).mean().backward()
    ckpt(x).pow(2).mean().backward()
    assert len(calls) == 4  # each of the 2 layers: the forward, then its recomputation
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), ckpt.parameters()))
    with torch.no_grad():
        ckpt(x)
    assert len(calls) == 6  # no gradients recorded: one plain forward per layer
