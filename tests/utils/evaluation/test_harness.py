"""lm-evaluation-harness over our models: the numbers equal lm-eval's own HFLM run on the exported folder (teacher
and a heterogeneous student), on local task files the tests write (nothing from the Hub)."""
from __future__ import annotations

import sys

import pytest

from helpers import write_lm_eval_tasks

pytest.importorskip("lm_eval")

TASKS = ("tiny_text", "tiny_mc")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_lm_eval_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory):
    """The tiny teacher, a student with one key/value head in layer 0 and layer 3 dropped, and each exported (the
    teacher as plain LlamaForCausalLM, the student as a remote-code folder)."""
    from models import LayerSpec, load_teacher
    from models.compress import compose, init_attention, init_merged_layer
    from models.export import export_pretrained

    teacher, tok = load_teacher(tiny_llama)
    cfg, t = teacher.config, teacher.layers
    dropped = LayerSpec(0, 0, 0, [3], "dropped", attention="none")
    student = compose(teacher, blocks={0: init_attention(t[0].block, cfg, LayerSpec(6, 8, 64, [0], attention="gqa",
                                                                                      num_kv_heads=1))[0]},
                      layers={3: (init_merged_layer(cfg, dropped, t[3], mode="first")[0], dropped)}).eval()
    tmp = tmp_path_factory.mktemp("lm_eval_exports")
    out = {"tokenizer": tok}
    for name, m in (("teacher", teacher), ("student", student)):
        folder, kind = export_pretrained(m, tmp / name, tok)
        out[name] = (m, folder, kind)
    assert "Compact" in out["student"][2] and "Compact" not in out["teacher"][2]
    return out


def _theirs(folder, tasks, *, batch_size: int = 1, log_samples: bool = False) -> dict:
    """lm-eval's own run: HFLM loading the exported folder."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(folder), trust_remote_code=True, device="cpu", batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks.config.tasks), task_manager=tasks.manager,
                                   limit=tasks.config.limit, log_samples=log_samples)


@pytest.mark.parametrize("who", ["teacher", "student"])
def test_our_numbers_equal_lm_evals_own_run_on_the_exported_folder(models, task_dir, who):
    from utils.evaluation.harness import HarnessConfig, load_tasks, run_tasks, task_metrics

    tasks = load_tasks(HarnessConfig(TASKS, task_dir=str(task_dir), limit=10, batch_size=4))
    model, folder, _ = models[who]
    ours, theirs = task_metrics(run_tasks(model, models["tokenizer"], tasks)), task_metrics(_theirs(folder, tasks))
    assert set(ours) == set(theirs) == {("tiny_text", "word_perplexity"), ("tiny_text", "byte_perplexity"),
                                        ("tiny_text", "bits_per_byte"), ("tiny_mc", "acc"), ("tiny_mc", "acc_norm")}
    for key, (value, err) in theirs.items():
        assert ours[key][0] == pytest.approx(value, rel=1e-5), key
        assert ours[key][1] == (pytest.approx(err, rel=1e-5) if err is not None else None), key
    assert 1 < ours["tiny_text", "word_perplexity"][0] < 1e4 and ours["tiny_mc", "acc"][1] > 0


def test_batched_generation_equals_lm_evals_one_prompt_at_a_time(models, task_dir):
    """HFLM generates a batch of prompts of different lengths left-padded (the KV cache with a key mask): ours
    (batch 4) gives the replies of the exported folder, batched alike and one prompt at a time."""
    import lm_eval

    from utils.evaluation.harness import HarnessConfig, load_tasks
    from utils.evaluation.harness_model import InMemoryLM

    tasks = load_tasks(HarnessConfig(("tiny_gen",), task_dir=str(task_dir)))
    model, folder, _ = models["student"]
    ours = lm_eval.simple_evaluate(model=InMemoryLM(model, models["tokenizer"], batch_size=4), tasks=["tiny_gen"],
                                   task_manager=tasks.manager)
    theirs = _theirs(folder, tasks, log_samples=True)
    replies = [[s["doc_id"], s["resps"]] for s in theirs["samples"]["tiny_gen"]]
    batched = _theirs(folder, tasks, batch_size=4, log_samples=True)
    assert [[s["doc_id"], s["resps"]] for s in batched["samples"]["tiny_gen"]] == replies
    assert [[s["doc_id"], s["resps"]] for s in ours["samples"]["tiny_gen"]] == replies
    assert len(replies) == 6 and any(r[1][0][0].strip() for r in replies)  # something was generated


def test_a_task_whose_data_cannot_be_read_is_named(task_dir):
    from utils.evaluation.harness import HarnessConfig, HarnessError, load_tasks

    with pytest.raises(HarnessError, match="lm-eval task 'tiny_missing' could not be loaded .*`task_dir`"):
        load_tasks(HarnessConfig(("tiny_mc", "tiny_missing"), task_dir=str(task_dir)))


def test_the_task_folder_must_exist(tmp_path):
    from utils.errors import SettingError
    from utils.evaluation.harness import HarnessConfig, load_tasks

    with pytest.raises(SettingError, match="`task_dir` '.*nowhere' is not a folder"):
        load_tasks(HarnessConfig(("tiny_mc",), task_dir=str(tmp_path / "nowhere")))


def test_without_lm_eval_installed_one_line_says_how_to_install(monkeypatch):
    from utils.evaluation.harness import HarnessConfig, HarnessError, load_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(HarnessError, match="pip install lm-eval$"):
        load_tasks(HarnessConfig(("piqa",)))


def test_the_global_random_generators_are_left_as_they_were(models, task_dir):
    import random

    import torch

    from utils.evaluation.harness import HarnessConfig, load_tasks, run_tasks

    tasks = load_tasks(HarnessConfig(("tiny_mc",), task_dir=str(task_dir), limit=2))
    random.seed(7)
    torch.manual_seed(7)
    expected = (random.random(), torch.rand(1))
    random.seed(7)
    torch.manual_seed(7)
    run_tasks(models["teacher"][0], models["tokenizer"], tasks)  # lm-eval seeds them all
    assert (random.random(), torch.rand(1)) == expected
