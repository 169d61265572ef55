"""Every loss option trains: on a fixed batch the loss falls. Plus the cache and the shared pass agree."""
from __future__ import annotations

import pytest
import torch

from models import LayerSpec, load_teacher
from models.compress import clone_model, compress_attention, init_merged_layer, random_attention
from utils.data.batches import TokenizedSentences, make_loader
from utils.data.masking import MLMMasker
from utils.data.text import DataConfig, load_sentences
from utils.storage.features import TeacherCache, teacher_features
from utils.training.losses import attention_loss, hidden_loss
from utils.training.tasks import BlockDistill, MergeDistill, ModelDistill, balance_terms, describe_losses


@pytest.fixture(scope="module")
def setup(tiny_teacher, tiny_corpus):
    teacher, tok = load_teacher(tiny_teacher)
    ds = TokenizedSentences(load_sentences(DataConfig(data_dir=str(tiny_corpus)), "train"), tok, 40)
    loader, _ = make_loader(ds, tok, 32, shuffle=False)
    return teacher, tok, ds, next(iter(loader))


def _falls(task, batch, steps=40, lr=3e-3) -> tuple[float, float]:
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=lr)
    task.train()
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(0)  # the same masking every step: a fixed batch
        loss = sum(l for l, _ in task.unit_losses(batch, g).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize("loss_on,criterion", [
    (["output"], "MSE"), (["output"], "L1"), (["output"], "cosine"), (["output"], "CrossEntropy"),
    (["scores"], "CrossEntropy"), (["scores"], "KL"), (["output", "scores"], "MSE"), (["mlm"], "MSE"),
    (["output", "relations"], "MSE"),
])
def test_block_losses_fall(setup, loss_on, criterion):
    """Every block loss falls on a fixed batch; the combined ones with their default, balanced weights."""
    teacher, tok, _, batch = setup
    torch.manual_seed(0)
    cfg = teacher.config
    blocks = {i: random_attention(teacher.layers[i].attention, cfg, num_heads=2, head_dim=4)
              for i in range(len(teacher.layers))}
    for b in blocks.values():
        b.self.dropout_p = 0.0
    masker = MLMMasker(tok, cfg.vocab_size) if loss_on == ["mlm"] else None
    task = BlockDistill(teacher, blocks, loss_on, criterion=criterion, score_criterion="KL", masker=masker)
    floor = 0.0
    if criterion == "CrossEntropy":  # cross-entropy bottoms out at the teacher's entropy, not at 0
        perfect = BlockDistill(teacher, {i: teacher.layers[i].attention for i in blocks}, loss_on, criterion=criterion)
        with torch.no_grad():
            floor = sum(l.item() for l, _ in perfect.unit_losses(batch, None).values())
    assert task.balances() == (len(loss_on) > 1)
    balance_terms(task, batch)
    first, last = _falls(task, batch)
    assert last - floor < 0.7 * (first - floor), (first, last, floor)


@pytest.mark.parametrize("loss_on,criterion", [("hidden", "MSE"), ("hidden", "cosine"), ("hidden", "L1"),
                                               ("mlm", "MSE")])
def test_merge_losses_fall(setup, loss_on, criterion):
    teacher, tok, _, batch = setup
    torch.manual_seed(0)
    cfg = teacher.config
    spec = LayerSpec(2, 8, 32, [0, 1], "merged")
    layer, _ = init_merged_layer(cfg, spec, teacher.layers[0], second=teacher.layers[1], mode="random")
    layer.attention.self.dropout_p = 0.0
    task = MergeDistill(teacher, {0: (layer, spec)}, loss_on, criterion=criterion,
                        masker=MLMMasker(tok, cfg.vocab_size) if loss_on == "mlm" else None)
    for m in task.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    first, last = _falls(task, batch)
    assert last < 0.7 * first, (first, last)


def test_finetune_losses_fall(setup, tiny_encoder):
    teacher, tok, _, batch = setup
    student = clone_model(teacher)
    spec = LayerSpec(4, 8, 64, [0, 1], "merged")
    layer, _ = init_merged_layer(teacher.config, spec, teacher.layers[0], second=teacher.layers[1], mode="first")
    student.merge_layers(0, layer, spec)
    task = ModelDistill(teacher, student, MLMMasker(tok, teacher.config.vocab_size), kl_weight=1.0, mlm_weight=0.0,
                        hidden_weight=1.0, temperature=1.0)
    for m in task.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    first, last = _falls(task, batch, lr=1e-3)
    assert last < 0.7 * first, (first, last)
    # a teacher without an MLM head: hidden-state objective only
    enc, _ = load_teacher(tiny_encoder)
    enc_student = clone_model(enc)
    merged, _ = init_merged_layer(enc.config, spec, enc.layers[0], second=enc.layers[1], mode="first")
    enc_student.merge_layers(0, merged, spec)
    task = ModelDistill(enc, enc_student, None)
    assert task.kl_weight == 0 and task.hidden_weight > 0
    first, last = _falls(task, batch, lr=1e-3)
    assert last < 0.7 * first, (first, last)


def test_mlm_objectives_refuse_teacher_without_head(tiny_encoder, tiny_corpus):
    enc, tok = load_teacher(tiny_encoder)
    blocks = {0: compress_attention(enc.layers[0].attention, enc.config, num_heads=2, head_dim=8)[0]}
    with pytest.raises(RuntimeError, match="masked-LM head"):
        BlockDistill(enc, blocks, ["mlm"], masker=MLMMasker(tok, enc.config.vocab_size))


def test_cache_matches_live_teacher(setup, tmp_path):
    teacher, tok, ds, batch = setup
    names = ["in_0", "block_0", "in_1", "block_1", "out_1"]
    cache = TeacherCache(tmp_path, teacher, teacher_hash="hash", token_ids=ds.ids, tokenizer_name="tok",
                         seq_len=40).ensure(names[:2], 16, torch.device("cpu"))
    cache.ensure(names, 16, torch.device("cpu"))  # adds the missing features, keeps the others
    live = teacher_features(teacher, batch["input_ids"], batch["attention_mask"], names=names)
    cached = cache.batch(names, batch["index"], length=batch["input_ids"].shape[1], device=torch.device("cpu"))
    valid = batch["attention_mask"].bool()
    for n in names:
        assert torch.allclose(live[n][valid], cached[n][valid], atol=2e-3, rtol=1e-2), n
        assert (cached[n][~valid] == 0).all()
    other = TeacherCache(tmp_path, teacher, teacher_hash="other-hash", token_ids=ds.ids, tokenizer_name="tok",
                         seq_len=40)
    assert other.key != cache.key  # different teacher weights -> a different cache


def test_attention_loss_handles_head_mismatch():
    t = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    s = torch.randn(2, 2, 5, 5, requires_grad=True)
    valid = torch.ones(2, 5, dtype=torch.bool)
    for crit in ("CrossEntropy", "KL", "MSE", "L1"):
        loss = attention_loss(s, t, valid, criterion=crit)
        loss.backward()
        assert torch.isfinite(loss)
    same = attention_loss(t.log(), t, valid, criterion="KL")
    assert same.abs() < 1e-5


def test_hidden_loss_ignores_padding():
    a, b = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)
    b[0, 2] = 100.0
    valid = torch.tensor([[True, True, False]])
    for crit in ("MSE", "L1", "CrossEntropy"):
        assert hidden_loss(a, b, valid, criterion=crit) == hidden_loss(a, a, valid, criterion=crit)


def test_kd_temperature_defaults_by_task_and_a_given_one_wins(tiny_teacher, tiny_llama):
    """A decoder's perplexity is measured at T=1, so its fine-tune distils at 1 unless told; a masked LM's at 2."""
    for path, default in ((tiny_teacher, 2.0), (tiny_llama, 1.0)):
        teacher, _ = load_teacher(path)
        student = clone_model(teacher)
        assert ModelDistill(teacher, student, None).temperature == default
        assert ModelDistill(teacher, student, None, temperature=3.0).temperature == 3.0
        assert describe_losses(ModelDistill(teacher, student, None))["temperature"] == default
