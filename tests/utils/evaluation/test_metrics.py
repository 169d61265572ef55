"""The comparison's metrics: counts summed over batches and divided once, each metric checked by hand."""
from __future__ import annotations

import math

import pytest
import torch

from models import load_teacher
from models.compress import drop_every_second
from utils.data.batches import TokenizedSentences, make_loader
from utils.data.text import DataConfig, load_sentences
from utils.evaluation.metrics import (Agreement, BatchOutputs, JudgeAgreement, PerSentence, TopKAccuracy,
                                      compare_models, make_metrics)


def _outputs(target, teacher_top, student_top, judge_top=None) -> BatchOutputs:
    t = torch.tensor
    h = torch.zeros(len(target), 2, 3)
    return BatchOutputs({}, torch.ones(len(target), 2, dtype=torch.bool), t(target), h, h, 0.0, 0.0,
                        teacher_top=t(teacher_top), student_top=t(student_top),
                        judge_top=None if judge_top is None else t(judge_top))


def test_masked_token_metrics_count_by_hand():
    # ids as top-10 lists; only the first few columns matter for top-1/5
    pad = list(range(100, 108))
    out = _outputs([1, 2, 3, 4],
                   teacher_top=[[1, 9] + pad, [9, 2] + pad, [3, 9] + pad, [8, 7] + pad],
                   student_top=[[1, 9] + pad, [2, 9] + pad, [7, 9] + pad, [6, 7] + pad],
                   judge_top=[[1, 2] + pad, [2, 9] + pad, [9, 8] + pad, [4, 6] + pad])
    metrics = [TopKAccuracy(), Agreement(), JudgeAgreement()]
    for m in metrics:
        m.update(out)
        m.update(out)  # two batches: the same fractions
    r = {k: v for m in metrics for k, v in m.result().items()}
    assert r["teacher_top1"] == 2 / 4 and r["teacher_top5"] == 3 / 4 and r["teacher_top10"] == 3 / 4
    assert r["student_top1"] == 2 / 4 and r["student_top5"] == 2 / 4
    assert r["agreement_top1"] == 1 / 4  # only sentence 0: 1 == 1
    assert r["judge_top1"] == 3 / 4
    # top-1s: teacher 1, 9, 3, 8; student 1, 2, 7, 6; judge top-5s start [1, 2], [2, 9], [9, 8], [4, 6]
    assert r["teacher_in_judge_top1"] == 1 / 4 and r["teacher_in_judge_top5"] == 2 / 4  # sentences 0; 0, 1
    assert r["student_in_judge_top1"] == 2 / 4 and r["student_in_judge_top5"] == 3 / 4  # 0, 1; 0, 1, 3


def test_a_new_metric_is_one_class():
    class TargetIsOne(PerSentence):
        def __init__(self):
            super().__init__("target_is_one")

        def count(self, out):
            return {"target_is_one": (out.target == 1).sum().item()}

    m = TargetIsOne()
    m.update(_outputs([1, 1, 2], [[0]] * 3, [[0]] * 3))
    m.update(_outputs([5], [[0]], [[0]]))
    assert m.result() == {"target_is_one": 2 / 4}


@pytest.fixture(scope="module")
def models_and_data(tiny_teacher, tiny_corpus):
    teacher, tok = load_teacher(tiny_teacher)
    student, _ = drop_every_second(teacher)
    ds = TokenizedSentences(load_sentences(DataConfig(data_dir=str(tiny_corpus)), "test"), tok, 40)
    return teacher, student, tok, ds


def test_results_do_not_depend_on_the_batching(models_and_data):
    """Counts are summed, then divided once: uneven batches give the fractions of the whole split."""
    teacher, student, tok, ds = models_and_data
    res = {}
    for bs in (7, 64):
        loader, _ = make_loader(ds, tok, bs, shuffle=False)
        res[bs] = compare_models(teacher, student, loader, tokenizer=tok, device=torch.device("cpu"), judge=teacher,
                                 judge_tokenizer=tok)
    a, b = res[7].metrics, res[64].metrics
    assert a["sentences"] == b["sentences"] == len(ds)
    for k in ("teacher_top1", "student_top5", "agreement_top1", "judge_top1", "student_in_judge_top10"):
        assert a[k] == b[k], k
    for k in ("hidden_cosine", "hidden_mse", "kl_teacher_student"):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k  # float32 sums in another order
    assert a["judge_top1"] == a["teacher_top1"]  # the teacher judging itself
    assert [r["index"] for r in res[7].rows] == sorted(r["index"] for r in res[64].rows) == list(range(len(ds)))


def test_metric_order_and_keys(models_and_data):
    teacher, student, _, _ = models_and_data
    keys = [k for m in make_metrics(teacher, student, mlm=True, with_judge=True) for k in m.result()]
    assert keys[:9] == ["sentences", "hidden_cosine", "hidden_mse", "teacher_params", "student_params",
                        "teacher_latency_ms_per_batch", "student_latency_ms_per_batch", "param_ratio", "speedup"]
    assert keys[9:] == ["teacher_top1", "teacher_top5", "teacher_top10", "student_top1", "student_top5",
                        "student_top10", "agreement_top1", "kl_teacher_student", "judge_top1",
                        "teacher_in_judge_top1", "teacher_in_judge_top5", "teacher_in_judge_top10",
                        "student_in_judge_top1", "student_in_judge_top5", "student_in_judge_top10"]
    assert [k for m in make_metrics(teacher, student, mlm=False, with_judge=False) for k in m.result()] == keys[:9]


def test_token_scores_sum_to_the_comparison(tiny_llama, tiny_corpus):
    """Per-token NLL, agreement and KL (for paired tests) average to what compare_models reports for the same
    windows; a student identical to the teacher agrees everywhere at zero KL."""
    from models.compress import compose, init_attention
    from utils.data.batches import TokenWindows
    from utils.evaluation.metrics import token_scores
    from utils.training.units import unit_spec

    teacher, tok = load_teacher(tiny_llama)
    spec = unit_spec(teacher.config, [1], "block", num_kv_heads=1)
    student = compose(teacher, blocks={1: init_attention(teacher.layers[1].block, teacher.config, spec)[0]})
    ds = TokenWindows(load_sentences(DataConfig(data_dir=str(tiny_corpus)), "test"), tok, 16)
    loader, _ = make_loader(ds, tok, 5, shuffle=False)
    cpu = torch.device("cpu")
    sc = token_scores(teacher, {"s": student, "same": teacher}, loader, device=cpu)
    m = compare_models(teacher, student, loader, tokenizer=tok, device=cpu).metrics
    assert len(sc.teacher_nll) == len(sc.nll["s"]) == len(sc.window) == m["predicted_tokens"]
    assert sc.mean(sc.teacher_nll) == pytest.approx(m["teacher_nll"], rel=1e-6)
    assert sc.mean(sc.nll["s"]) == pytest.approx(m["student_nll"], rel=1e-6)
    assert sc.perplexity("s") == pytest.approx(m["student_perplexity"], rel=1e-6)
    assert sc.mean([float(a) for a in sc.agree["s"]]) == pytest.approx(m["agreement_top1"])
    assert sc.mean(sc.kl["s"]) == pytest.approx(m["kl_teacher_student"], rel=1e-5)
    assert 0 < m["agreement_top1"] < 1 and all(sc.agree["same"]) and max(map(abs, sc.kl["same"])) < 1e-6
    assert sc.nll["same"] == sc.teacher_nll
    assert len(sc.per_window(sc.nll["s"])) == len(ds)  # one mean per window, windows in loader order
    assert sorted(set(sc.window)) == list(range(len(ds)))
    # entropies: one per token, the teacher's copy has the teacher's, all between 0 and log(vocabulary)
    assert sc.entropy["same"] == sc.teacher_entropy and len(sc.entropy["s"]) == len(sc.nll["s"])
    log_v = math.log(teacher.config.vocab_size)
    assert all(0 <= e <= log_v + 1e-5 for e in sc.teacher_entropy + sc.entropy["s"])


def test_a_flat_student_has_the_entropy_of_the_uniform_distribution(tiny_llama, tiny_corpus):
    """Zero logits: every prediction uniform over the vocabulary, so entropy and NLL are both log(vocabulary) and
    the student is exactly as confident as it is right (NLL - entropy = 0)."""
    from models.compress import clone_model
    from utils.data.batches import TokenWindows
    from utils.evaluation.metrics import token_scores

    teacher, tok = load_teacher(tiny_llama)
    flat = clone_model(teacher)
    flat.model.norm.weight.data.zero_()  # the last hidden state is zero, so are the logits
    ds = TokenWindows(load_sentences(DataConfig(data_dir=str(tiny_corpus)), "test"), tok, 16)
    loader, _ = make_loader(ds, tok, 5, shuffle=False)
    sc = token_scores(teacher, {"flat": flat}, loader, device=torch.device("cpu"))
    log_v = math.log(teacher.config.vocab_size)
    assert sc.mean(sc.entropy["flat"]) == pytest.approx(log_v, rel=1e-5)
    assert sc.mean(sc.nll["flat"]) == pytest.approx(log_v, rel=1e-5)
    assert max(sc.teacher_entropy) < log_v - 1e-4  # a random teacher is nearly flat, not exactly


def test_a_heals_validation_pass_gives_the_comparison_running_each_model_once(tiny_llama, tiny_corpus,
                                                                           models_and_data):
    """``CausalComparison`` fed by ``ModelDistill.evaluate``'s own forwards: compare_models's per-token metrics, with
    the teacher and the student each run once per validation batch (not again for the metrics); ``max_batches``
    limits the metrics only, the task's loss still reads every batch."""
    from utils.data.batches import TokenWindows
    from utils.data.masking import lm_targets
    from utils.evaluation.metrics import CausalComparison
    from utils.training.tasks import ModelDistill

    teacher, tok = load_teacher(tiny_llama)
    student, _ = drop_every_second(teacher)  # its own modules (a shallow copy would share the teacher's hooks)
    loader, _ = make_loader(TokenWindows(load_sentences(DataConfig(data_dir=str(tiny_corpus)), "test"), tok, 16),
                            tok, 5, shuffle=False)
    cpu, batches = torch.device("cpu"), len(loader)
    task = ModelDistill(teacher, student, lm_targets(tok, teacher), temperature=2.0)
    runs = {"teacher": 0, "student": 0}
    hooks = [m.register_forward_hook(lambda *_, n=n: runs.__setitem__(n, runs[n] + 1))
             for n, m in (("teacher", teacher), ("student", student))]
    try:
        for limit in (None, 1):
            task.watch = CausalComparison(teacher, student, max_batches=limit)
            loss = task.evaluate(loader)["model/loss"]
            got = task.watch.result(cpu)
            assert runs == {"teacher": batches, "student": batches} and batches > 1
            runs.update(teacher=0, student=0)
            want = compare_models(teacher, student, loader, tokenizer=tok, device=cpu, max_batches=limit).metrics
            assert loss > 0 and got["predicted_tokens"] == want["predicted_tokens"]
            for k in ("student_top1", "agreement_top1", "kl_teacher_student", "hidden_cosine", "student_perplexity",
                      "teacher_perplexity"):
                assert got[k] == pytest.approx(want[k], rel=1e-5), k
            runs.update(teacher=0, student=0)
    finally:
        for h in hooks:
            h.remove()
    bert, bert_student = models_and_data[:2]
    with pytest.raises(ValueError, match="needs a causal LM teacher, got a mlm one"):
        CausalComparison(bert, bert_student)
