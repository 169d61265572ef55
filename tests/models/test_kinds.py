"""The attention-kind registry (models/kinds.py): the command line's shape flags come from the records, and a new
kind is its record, its module and its initialiser: defined here, in this test file, it gets its --attention choice,
spec checks, training, checkpoint and assembly with no other change, and is gone again once unregistered."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn

import retrain_single_block
from helpers import common_args, in_process, model_inputs
from models import LayerSpec, compress, kinds, llama
from utils.cli.commands import assemble_main
from utils.training.students import load_model


def test_shape_flags_come_from_the_records():
    p = retrain_single_block.build_parser()
    attention = p._option_string_actions["--attention"]
    assert list(attention.choices) == list(kinds.KINDS)
    for kind in kinds.KINDS.values():
        assert kind.summary in attention.help
        if kind.flag is not None:
            action = p._option_string_actions[kind.flag.name]
            assert action.dest == kind.flag.field and kind.flag.help in action.help
    args = p.parse_args(["--block", "0", "--kv-heads", "2"])
    assert args.num_kv_heads == 2 and args.attention is None
    from utils.cli.configs import unit_shape

    assert unit_shape(args).attention_fields() == {"num_heads": None, "head_dim": None, "attention": "gqa",
                                                   "num_kv_heads": 2}


# ---- a demonstration kind, defined here and nowhere else -----------------------------------------------------------
class MeanAttention(llama.LlamaBlock):
    """Each head's output is the mean of its values over the tokens up to its own: no queries, no keys."""

    kind = "mean"

    def __init__(self, cfg: llama.LlamaConfig, num_heads: int, head_dim: int):
        super().__init__(cfg)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.v_proj = nn.Linear(cfg.hidden_size, num_heads * head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def shape(self) -> dict:
        return {"num_heads": self.num_heads, "head_dim": self.head_dim, "attention": "mean"}

    def contribution(self, x, ctx=None, need_trace=False):
        if need_trace:
            raise ValueError("a mean block has no attention distributions")
        v = self.v_proj(self.input_layernorm(x))
        seen = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=v.dtype)[None, :, None]
        return self.o_proj(v.cumsum(1) / seen), None


@torch.no_grad()
def init_mean(teacher, cfg, spec, *, importance=None):
    """The teacher's most important heads' values and output columns (as a multi-head block keeps them)."""
    new = compress.random_block(teacher, cfg, spec)
    mha, note = compress.init_mha(teacher, cfg, LayerSpec(spec.num_heads, spec.head_dim, 1, spec.origin),
                                  importance=importance)
    new.v_proj.load_state_dict(mha.v_proj.state_dict())
    new.o_proj.load_state_dict(mha.o_proj.state_dict())
    return new, f"{note}; values and output kept"


@contextlib.contextmanager
def mean_kind():
    kinds.register(kinds.AttentionKind("mean", "demonstration: each head averages its values over the tokens so far"))
    kinds.implements(llama.ATTENTION, "mean")(MeanAttention)
    kinds.implements(compress.INITIALISERS, "mean")(init_mean)
    try:
        yield
    finally:
        kinds.unregister("mean", llama.ATTENTION, compress.INITIALISERS)


def test_a_new_kind_is_its_record_module_and_initialiser(tiny_llama, tiny_corpus, tmp_path, capsys):
    argv = common_args(tiny_llama, tiny_corpus) + ["--block", "1", "--epochs", "3", "--lr", "2e-3", "--seq-len", "32",
                                                   "--save-checkpoint-every", "1", "--out", str(tmp_path)]
    with mean_kind():
        assert "mean" in retrain_single_block.build_parser()._option_string_actions["--attention"].choices
        code, err = in_process("retrain_single_block", argv + ["--attention", "mean", "--kv-heads", "2"], capsys)
        assert code == 2 and "--kv-heads does not apply to --attention mean" in err.splitlines()[-1]
        code, err = in_process("retrain_single_block", argv + ["--attention", "mean"], capsys)
        assert code == 0, err[-2000:]
        unit = tmp_path / "blocks_h6_d8_mean_output_mse" / "block_1"
        first, last = (json.loads((unit / d / "meta.json").read_text()) for d in ("epoch_1", "last"))
        assert last["spec"]["attention"] == "mean" and last["metrics"]["loss"] < first["metrics"]["loss"]
        assert last["init"].startswith("teacher: kept heads")
        assert assemble_main(["--teacher", str(tiny_llama), "--blocks", str(unit.parent), "--out",
                              str(tmp_path / "asm")]) == 0
        model, _ = load_model(tmp_path / "asm")
        assert [s.attention for s in model.config.layers] == ["gqa", "mean", "gqa", "gqa"]
        assert isinstance(model.layers[1].block, MeanAttention)
        ids, mask = model_inputs(model.config.vocab_size).values()
        with torch.no_grad():
            assert torch.isfinite(model(ids, mask).logits).all()
    assert "mean" not in kinds.KINDS and "mean" not in llama.ATTENTION and "mean" not in compress.INITIALISERS
    with pytest.raises(ValueError, match="unknown attention kind 'mean'"):
        LayerSpec(6, 8, 64, [1], attention="mean")
    code, err = in_process("retrain_single_block", argv + ["--attention", "mean"], capsys)
    assert code == 2 and "invalid choice: 'mean'" in err
