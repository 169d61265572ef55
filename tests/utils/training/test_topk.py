"""The heal's teacher top-k cache (utils/storage/logits.py) and its KD loss (losses.topk_kl): at k = vocabulary the
loss is the full KD loss and a task reading the cache computes the live teacher's KL; the cache is built once, read
without running the teacher, rebuilt when damaged; a bad k or a masked-LM teacher is refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import flip_byte
from utils import api
from utils.data.masking import lm_targets
from utils.errors import SettingError
from utils.storage.logits import LOGP_FLOOR, TopKCache, check_topk, teacher_topk
from utils.training.losses import kl_logits, topk_kl
from utils.training.tasks import ModelDistill


def _cut(teacher_logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache stores for [N, V] logits: top-k ids and log-probabilities with the tail's log-mass last."""
    logp = (teacher_logits / temperature).log_softmax(-1)
    top, ids = logp.topk(k, -1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return ids, torch.cat([top, rest], -1).clamp_min(LOGP_FLOOR)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_at_the_whole_vocabulary_is_the_full_kd_loss(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(12, 50, generator=g) * 3, torch.randn(12, 50, generator=g) * 3
    ids, logp = _cut(t, 50, temperature)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ours, full = topk_kl(s1, ids, logp, temperature=temperature), kl_logits(s2, t, temperature)
    assert abs(ours.item() - full.item()) < 1e-5
    ours.backward(), full.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_topk_kl_is_the_kl_of_the_distributions_coarsened_to_k_tokens_and_a_tail():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 20, generator=g), torch.randn(5, 20, generator=g)
    ids, logp = _cut(t, 3, 1.0)
    q, p = t.softmax(-1), s.softmax(-1)
    qk, pk = q.gather(-1, ids), p.gather(-1, ids)
    q2 = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    p2 = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    want = (q2 * (q2.log() - p2.log())).sum(-1).mean()
    got = topk_kl(s, ids, logp)
    assert abs(float(got) - float(want)) < 1e-5
    assert 0 < float(got) < float(kl_logits(s, t))  # coarsening never adds divergence


def test_a_bad_k_or_a_masked_lm_teacher_is_refused_in_one_line():
    for k in (0, -3, 2.5, True, "8", 101):
        with pytest.raises(SettingError, match=r"`teacher_topk` must be a whole number from 1 to .* 100, got") as e:
            check_topk(k, 100, "causal")
        assert "\n" not in str(e.value)
    with pytest.raises(SettingError, match="needs a decoder teacher"):
        check_topk(8, 100, "mlm")
    assert check_topk(100, 100, "causal") == 100


@pytest.fixture(scope="module")
def session(tiny_llama, tiny_corpus):
    return api.load_teacher(str(tiny_llama), data=api.DataConfig(data_dir=str(tiny_corpus), batch_size=8, seq_len=32),
                            device="cpu")


class _Counting:
    """Counts the teacher's forward passes (patched over its ``forward``)."""

    def __init__(self, teacher, monkeypatch):
        self.calls, self.forward = 0, teacher.forward
        monkeypatch.setattr(teacher, "forward", self)

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.forward(*a, **kw)


def test_the_cache_is_built_once_and_read_without_the_teacher(session, tmp_path, monkeypatch):
    ds = session.sentences("train")
    vocab = session.teacher.config.vocab_size
    cache = session.topk_cache(ds, str(tmp_path), k=vocab, temperature=1.0)
    assert cache.built == cache.names and cache.bytes_per_token() == vocab * 2 + (vocab + 1) * 4
    student = _student(session)  # before the teacher's forward is patched (a copy would share the patch)
    counter = _Counting(session.teacher, monkeypatch)
    again = session.topk_cache(ds, str(tmp_path), k=vocab, temperature=1.0)
    assert again.built == [] and again.dir == cache.dir
    loader, _ = session.loader(ds, shuffle=True)
    batch = next(iter(loader))
    task = ModelDistill(session.teacher, student, lm_targets(session.tokenizer, session.teacher), topk=again).train()
    cached = task.unit_terms(batch, None)["model"][0]["kl"].detach()
    assert counter.calls == 0  # a training step read the cache
    live = task.eval().unit_terms(batch, None)["model"][0]["kl"].detach()
    assert counter.calls == 1 and abs(float(cached) - float(live)) < 1e-5


def test_the_cached_values_are_the_teachers_top_k(session, tmp_path):
    ds = session.sentences("train")
    cache = session.topk_cache(ds, str(tmp_path), k=4, temperature=2.0)
    assert [p.name for p in sorted(cache.dir.glob("top*.npy"))] == ["top4_t2_ids.npy", "top4_t2_logp.npy"]
    ids = torch.tensor([ds.ids[3]])
    want_ids, want_logp = teacher_topk(session.teacher, ids, torch.ones_like(ids), k=4, temperature=2.0)
    got_ids, got_logp = cache.read(torch.tensor([3]), length=ids.shape[1], device=torch.device("cpu"))
    assert torch.equal(got_ids, want_ids) and torch.allclose(got_logp, want_logp, atol=1e-6)
    few_ids, few_logp = teacher_topk(session.teacher, ids, torch.ones_like(ids), k=4, temperature=2.0, rows=5)
    assert torch.equal(few_ids, want_ids) and torch.allclose(few_logp, want_logp, atol=1e-6)  # 5 positions at a time
    mass = torch.logsumexp(got_logp, -1)  # the k tokens and the tail make the whole distribution
    assert torch.allclose(mass, torch.zeros_like(mass), atol=1e-5)


def test_a_damaged_cache_file_is_named_and_rebuilt(session, tmp_path, caplog):
    ds = session.sentences("train")
    cache = session.topk_cache(ds, str(tmp_path), k=5, temperature=1.0)
    good = np.load(cache.dir / "top5_t1_logp.npy").copy()
    flip_byte(cache.dir / "top5_t1_logp.npy")
    again = session.topk_cache(ds, str(tmp_path), k=5, temperature=1.0)
    assert again.built == again.names and "top5_t1_logp" in again.rebuilt
    assert "top5_t1_logp.npy' is damaged" in caplog.text
    assert np.array_equal(np.load(cache.dir / "top5_t1_logp.npy"), good)


def _student(session):
    from models.compress import clone_model

    torch.manual_seed(0)
    student = clone_model(session.teacher).requires_grad_(True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student
