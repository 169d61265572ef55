"""Combined losses balanced by construction: the scale of an added term, its record, its reuse on resume."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import common_args, in_process
from models import load_teacher
from models.compress import compress_attention
from models.llama import LlamaAttention
from utils.data.batches import TokenizedSentences, make_loader
from utils.data.text import DataConfig, load_sentences
from utils.training.losses import attention_vectors, relation_loss
from utils.training.tasks import (BALANCE_RATIO, BALANCED, BlockDistill, ModelDistill, balance_terms,
                                  block_relation_heads)


@pytest.fixture(scope="module")
def tiny(tiny_teacher, tiny_corpus):
    """The tiny teacher, 2-head students of every block (kept heads), and the first training batch (the probe)."""
    teacher, tok = load_teacher(tiny_teacher)
    teacher.eval().requires_grad_(False)
    ds = TokenizedSentences(load_sentences(DataConfig(data_dir=str(tiny_corpus)), "train"), tok, 40)
    probe = next(iter(make_loader(ds, tok, 16, shuffle=False)[0]))
    return teacher, probe


def _blocks(teacher) -> dict:
    return {i: compress_attention(l.attention, teacher.config, num_heads=2, head_dim=8)[0]
            for i, l in enumerate(teacher.layers)}


def test_scale_is_the_ratio_of_the_terms_at_the_start(tiny):
    teacher, probe = tiny
    blocks = _blocks(teacher)
    assert BlockDistill(teacher, blocks, ["output", "relations"]).balance_ratio == BALANCE_RATIO  # the default
    task = BlockDistill(teacher, blocks, ["output", "relations"], balance_ratio=1.0)
    assert task.term_weights == {"output": 1.0, "relations": BALANCED} and task.balances()
    with pytest.raises(RuntimeError, match="balanced but has no scale yet"):
        task.unit_losses(probe, None)
    task.train()  # the scales are measured in eval mode (no dropout) and the mode is given back
    got = balance_terms(task, probe)
    assert task.training
    ids, att = probe["input_ids"], probe["attention_mask"]
    valid = att.bool()
    for i, block in blocks.items():
        # by hand: the block-output MSE (mean over real tokens of the mean squared feature error) and the relation
        # KL (its definition is checked by hand in test_relations.py), both on the teacher's input to layer i
        x = teacher.hidden_before(ids, att, i)
        with torch.no_grad():
            s_out = block.eval().contribution(x, teacher.context(att))[0]
            t_out = teacher.layers[i].attention.contribution(x, teacher.context(att))[0]
            per_token = (s_out - t_out).pow(2).mean(-1)
            mse = float(per_token[valid].sum() / valid.sum())
            rel = float(relation_loss(attention_vectors(block, x), attention_vectors(teacher.layers[i].attention, x),
                                      valid, heads=block_relation_heads(teacher.layers[i].attention, block, None)))
        rec = got[f"block_{i}"]
        assert rec["anchor"] == "output" and rec["by"] == "start"
        assert rec["start"]["output"] == pytest.approx(mse, rel=1e-5)
        assert rec["start"]["relations"] == pytest.approx(rel, rel=1e-5)
        assert rec["scales"]["relations"] == pytest.approx(mse / rel, rel=1e-5)
        assert rec["probe"]["sequences"] == ids.shape[0] and rec["probe"]["tokens"] == int(att.sum())
    # deterministic: a second task from the same start gives the same scales to the bit
    again = balance_terms(BlockDistill(teacher, _blocks(teacher), ["output", "relations"], balance_ratio=1.0), probe)
    assert {u: r["scales"] for u, r in again.items()} == {u: r["scales"] for u, r in got.items()}
    # a ratio R: the term starts at R times the output term
    tenth = balance_terms(BlockDistill(teacher, _blocks(teacher), ["output", "relations"], balance_ratio=0.1), probe)
    for unit, rec in tenth.items():
        assert rec["ratio"] == 0.1
        assert rec["scales"]["relations"] == pytest.approx(0.1 * got[unit]["scales"]["relations"], rel=1e-12)
    with pytest.raises(ValueError, match="balance_ratio"):
        BlockDistill(teacher, _blocks(teacher), ["output", "relations"], balance_ratio=0.0)


def test_combined_loss_is_the_weighted_sum_of_its_terms(tiny):
    teacher, probe = tiny
    for weight in (BALANCED, 0.5):
        task = BlockDistill(teacher, _blocks(teacher), ["output", "scores", "relations"], relation_weight=weight,
                            score_weight=weight).eval()
        balance_terms(task, probe)
        terms, losses = task.unit_terms(probe, None), task.unit_losses(probe, None)
        for unit, (t, n) in terms.items():
            scales = task.balance[unit]["scales"] if weight == BALANCED else {"scores": 0.5, "relations": 0.5}
            want = t["output"] + scales["scores"] * t["scores"] + scales["relations"] * t["relations"]
            assert losses[unit][0].item() == pytest.approx(want.item(), rel=1e-6) and losses[unit][1] == n
            if weight == BALANCED:  # at the start every term weighs what the output term does
                for term in ("scores", "relations"):
                    assert (scales[term] * t[term]).item() == pytest.approx(BALANCE_RATIO * t["output"].item(),
                                                                            rel=1e-5)
        # validation reports each term beside the combined loss
        metrics = task.evaluate([probe])
        assert set(metrics) == {f"block_{i}/{k}" for i in range(2) for k in ("loss", "output", "scores", "relations")}
    # one term alone has nothing to balance: its weight is 1
    alone = BlockDistill(teacher, _blocks(teacher), ["relations"])
    assert alone.term_weights == {"relations": 1.0} and not alone.balances() and balance_terms(alone, probe) == {}


def test_balanced_fine_tune_term_is_the_ratio_of_the_kl_at_the_start(tiny, tiny_teacher):
    teacher, probe = tiny
    from models.compress import clone_model, drop_every_second
    from utils.data.masking import lm_targets

    _, tok = load_teacher(tiny_teacher)
    student = clone_model(drop_every_second(teacher)[0])
    task = ModelDistill(teacher, student, lm_targets(tok, teacher), relation_weight=BALANCED, kl_weight=2.0)
    rec = balance_terms(task, probe)["model"]
    assert rec["anchor"] == "kl"
    assert rec["scales"]["relations"] == pytest.approx(BALANCE_RATIO * 2.0 * rec["start"]["kl"]
                                                       / rec["start"]["relations"])
    assert task.unit_weights("model") == {"kl": 2.0, "relations": rec["scales"]["relations"]}


def _meta(path) -> dict:
    return json.loads(path.read_text())


def test_balance_is_recorded_and_reused_on_resume(tiny_teacher, tiny_corpus, tmp_path, capsys):
    argv = common_args(tiny_teacher, tiny_corpus) + ["--block", "all", "--block-heads", "2", "--loss-on",
                                                     "output+relations", "--out", str(tmp_path), "--run-name", "r"]
    assert in_process("retrain_single_block", argv + ["--epochs", "1"], capsys)[0] == 0
    unit = tmp_path / "r" / "block_0"
    meta = _meta(unit / "best" / "meta.json")
    lb = meta["loss_balance"]
    assert meta["relation_weight"] == BALANCED
    assert lb["scales"]["relations"] == pytest.approx(BALANCE_RATIO * lb["start"]["output"] / lb["start"]["relations"])
    assert _meta(unit / "run.json")["unit_meta"]["loss_balance"] == lb
    # the resume point's stored scale is what a resumed run uses: change it there, and the run goes on with it
    point = unit / "resume" / "meta.json"
    stored = _meta(point)
    stored["unit_meta"]["loss_balance"]["scales"]["relations"] = 0.125
    point.write_text(json.dumps(stored))
    code, err = in_process("retrain_single_block", argv + ["--epochs", "2", "--resume"], capsys)
    assert code == 0, err[-2000:]
    assert _meta(unit / "last" / "meta.json")["loss_balance"]["scales"]["relations"] == 0.125
    run = _meta(unit / "run.json")
    assert len(run["invocations"]) == 2 and run["unit_meta"]["loss_balance"]["scales"]["relations"] == 0.125
    other = _meta(tmp_path / "r" / "block_1" / "last" / "meta.json")["loss_balance"]
    assert other == _meta(tmp_path / "r" / "block_1" / "best" / "meta.json")["loss_balance"]  # unchanged there
    # a resume with another weight is refused like any other changed setting
    for flag, value, field in (("--relation-weight", "1", "relation_weight"), ("--balance-ratio", "0.5",
                                                                                  "balance_ratio")):
        code, err = in_process("retrain_single_block", argv + ["--epochs", "3", "--resume", flag, value], capsys)
        assert code == 1 and "training setup differs" in err and field in err, err[-2000:]


def test_relations_of_grouped_query_blocks(tiny_llama):
    """Keys / values of fewer key/value heads are repeated per query head: a block with one key/value head per query
    head holding the teacher's repeated ones has the teacher's relation vectors, and relations to a one-KV-head block
    are defined (they failed before: 6 relation heads do not divide the 8 key features of one KV head)."""
    teacher, _ = load_teacher(str(tiny_llama))
    t_attn, cfg = teacher.layers[1].block, teacher.config
    assert (t_attn.num_heads, t_attn.num_kv_heads, t_attn.head_dim) == (6, 2, 8)
    mha = LlamaAttention(cfg, 6, 8, num_kv_heads=6)
    with torch.no_grad():
        mha.load_state_dict({k: v for k, v in t_attn.state_dict().items() if not k.startswith(("k_proj", "v_proj"))},
                            strict=False)
        for name in ("k_proj", "v_proj"):
            w = getattr(t_attn, name).weight.view(2, 1, 8, -1).expand(2, 3, 8, -1).reshape(48, -1)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    a, b = attention_vectors(mha, x), attention_vectors(t_attn, x)
    for kind in ("query", "key", "value"):
        assert a[kind].shape == (2, 5, 48) and torch.allclose(a[kind], b[kind], atol=1e-6)
    one = LlamaAttention(cfg, 6, 8, num_kv_heads=1)
    valid = torch.ones(2, 5, dtype=torch.bool)
    loss = relation_loss(attention_vectors(one, x), b, valid, heads=block_relation_heads(t_attn, one, None))
    assert torch.isfinite(loss) and loss.item() > 0


def test_decoder_blocks_of_a_list_balanced(tiny_llama, tiny_corpus, tmp_path, capsys):
    """--block takes a list of layers (trained together); a decoder's one-KV-head blocks train on output+relations,
    balanced; a bad list is an argument error."""
    argv = common_args(tiny_llama, tiny_corpus) + ["--seq-len", "16", "--kv-heads", "1", "--loss-on",
                                                   "output+relations", "--epochs", "1", "--out", str(tmp_path)]
    code, err = in_process("retrain_single_block", ["--block", "0,2", *argv, "--run-name", "r"], capsys)
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in (tmp_path / "r").glob("block_*")) == ["block_0", "block_2"]
    for i in (0, 2):
        meta = _meta(tmp_path / "r" / f"block_{i}" / "best" / "meta.json")
        assert meta["layer"] == i and meta["loss_balance"]["scales"]["relations"] > 0
        assert set(meta["metrics"]) == {"loss", "output", "relations"}
    code, err = in_process("retrain_single_block", ["--block", "0,x", *argv], capsys)
    assert code == 2 and "comma-separated list" in err
    code, err = in_process("retrain_single_block", ["--block", "1,9", *argv], capsys)
    assert code == 2 and "out of range" in err
