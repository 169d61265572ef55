"""Chat fidelity (issue 32): does the student still answer as its teacher does?

Teacher and student answer the same user messages greedily through the teacher's chat template (one user turn,
``add_generation_prompt``), each reply ending at the teacher's end-of-turn token or after ``max_new_tokens``. Compared:
the student's whole reply with the teacher's (exact match), their common prefix in tokens, whether the first
``PREFIX_TOKENS`` tokens agree, chrF of the texts; and, teacher-forced on the teacher's replies, the student's
perplexity, its top-1 agreement with the teacher and KL(teacher || student) on the reply tokens.

The prompt sets shipped with the repository (``prompts/``) are read by path relative to this file and named by their
file's stem: ``chat_eval`` (about 100 varied instructions, the evaluation's default), ``chat_train`` (the
teacher-written distillation text's default, disjoint from the evaluation's), and for a code teacher ``code_eval`` /
``code_train`` (coding requests: functions, fixes, explanations, shell and SQL; disjoint from each other and from
HumanEval's problems, which judge a code student).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from models.base import SwappableModel
from models.hf import TeacherError
from models.staging import write_staged
from ..data.text import DataError, jsonl_strings

PROMPTS = Path(__file__).resolve().parent / "prompts"
DEFAULT_PROMPTS = {"eval": "chat_eval", "train": "chat_train"}  # which shipped set "default" means, by role
PREFIX_TOKENS = 8  # the target: the first 8 reply tokens equal to the teacher's
FIRST = f"first{PREFIX_TOKENS}_match"  # its key: in the metrics (a rate) and per prompt (a row's, per_item's)
CHRF_ORDER, CHRF_BETA = 6, 2.0


@dataclass
class ChatConfig:
    """The chat comparison: which prompts, how long a reply may be, how many prompts per generation batch."""

    prompts: str = "default"  # a JSONL file of {"prompt": ...} lines, or "default" (the shipped evaluation set)
    max_new_tokens: int = 64
    batch_size: int = 8
    shown: int = 6  # replies side by side in the report


def shipped_prompt_sets() -> dict[str, Path]:
    """The prompt sets in ``prompts/``, by name (the file's stem)."""
    return {f.stem: f for f in sorted(PROMPTS.glob("*.jsonl"))}


def read_prompts(source: str | Path, default: str = "eval") -> tuple[Path, list[str]]:
    """The user messages of a JSONL file (one {"prompt": "..."} per line; blank lines skipped), of a shipped set named
    by ``source`` (``shipped_prompt_sets``; an existing file of that name wins), or of the shipped set for the role
    ``default`` (eval or train) when ``source`` is "default". DataError naming the file and line otherwise."""
    shipped = shipped_prompt_sets()
    path = Path(source)
    if str(source) == "default":
        path = shipped[DEFAULT_PROMPTS[default]]
    elif str(source) in shipped and not path.exists():
        path = shipped[str(source)]
    if not path.is_file():
        raise DataError(f"chat prompt file '{path}' does not exist (nor is it a shipped set: "
                        f"{', '.join(shipped)})")
    prompts = jsonl_strings(path, "prompt")
    blank = [k + 1 for k, p in enumerate(prompts) if not p.strip()]
    if blank:
        raise DataError(f"chat prompt file '{path}': prompt {blank[0]} is empty")
    if not prompts:
        raise DataError(f"chat prompt file '{path}' holds no prompt")
    return path, prompts


@dataclass
class Chat:
    """A teacher's chat format: its tokenizer (with a chat template) and the token ids that end its turn."""

    tokenizer: Any
    end_ids: list[int]
    end_source: str  # where the end-of-turn ids were read

    @classmethod
    def of(cls, tokenizer: Any, teacher: str | Path) -> "Chat":
        """The chat format of the teacher named ``teacher``; TeacherError when it has no chat template or no end
        token."""
        if not getattr(tokenizer, "chat_template", None):
            raise TeacherError(f"the teacher '{teacher}' has no chat template (tokenizer_config.json / "
                               "chat_template.jinja): its chat cannot be compared; use an instruction-tuned teacher")
        ids, source = end_of_turn(tokenizer, teacher)
        return cls(tokenizer, ids, source)

    def prompt_text(self, prompt: str) -> str:
        """One user turn and the start of the assistant's, as the template writes them."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]

    def text(self, ids: Sequence[int], special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=not special)

    def describe(self) -> dict[str, Any]:
        return {"ids": self.end_ids, "tokens": self.tokenizer.convert_ids_to_tokens(self.end_ids),
                "from": self.end_source}

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.end_ids[0]


def end_of_turn(tokenizer: Any, teacher: str | Path) -> tuple[list[int], str]:
    """The ids that end the teacher's turn and where they were read: ``eos_token_id`` of the teacher folder's (or hub
    snapshot's) generation_config.json (what transformers' ``generate`` stops at), else the tokenizer's eos token."""
    from models.hf import read_generation_config, resolve_checkpoint

    try:
        folder = resolve_checkpoint(teacher)  # a hub id: its folder in the cache
    except FileNotFoundError:
        folder = Path(teacher)
    eos = read_generation_config(folder).get("eos_token_id")
    if eos is not None:
        return ([eos] if isinstance(eos, int) else list(eos)), "generation_config.json eos_token_id"
    if tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id], f"the tokenizer's eos_token {tokenizer.eos_token}"
    raise TeacherError(f"the teacher '{teacher}' names no end-of-turn token (no eos_token_id in "
                       "generation_config.json, no eos token in its tokenizer): a reply would never end")


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left to the longest: ids and the 0/1 attention mask [B, T]."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(list(r)), 1
    return ids.to(device), mask.to(device)


def cut_reply(tokens: Sequence[int], end_ids: Sequence[int],
              stop_when: Callable[[list[int]], bool] | None = None) -> list[int]:
    """A generated row's reply: its tokens up to and including the first end-of-turn token (all of them without), or
    its shortest start on which ``stop_when`` holds where that is shorter (``stop_when`` must keep holding on every
    longer reply once it holds, as a closed code block stays closed: the start is found by bisection)."""
    reply = list(tokens)
    for i, t in enumerate(reply):
        if t in end_ids:
            reply = reply[:i + 1]
            break
    if stop_when is None or not stop_when(reply):
        return reply
    lo, hi = 1, len(reply)  # stop_when holds on reply[:hi]; find the least such hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stop_when(reply[:mid]) else (mid + 1, hi)
    return reply[:hi]


@torch.no_grad()
def answer(model: SwappableModel, chat: Chat, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           batch_size: int, temperature: float = 0.0, generator: torch.Generator | None = None,
           progress: Callable[[int], None] | None = None,
           stop_when: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Each tokenised prompt's reply (``cut_reply``), in order: batches of ``batch_size`` prompts, left-padded,
    generated with the KV cache (greedy at ``temperature`` 0, else sampled with ``generator``); a reply also ends
    once ``stop_when`` holds on it (given its tokens; see ``cut_reply``)."""
    device = next(model.parameters()).device
    model.eval()
    replies: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start:start + batch_size]
        ids, mask = left_padded(rows, chat.pad_id, device)
        out = model.generate(ids, max_new_tokens, attention_mask=mask, stop_ids=chat.end_ids,
                             temperature=temperature, generator=generator, pad_token_id=chat.pad_id,
                             stop_when=stop_when)
        replies += [cut_reply(row, chat.end_ids, stop_when) for row in out[:, ids.shape[1]:].tolist()]
        if progress is not None:
            progress(len(rows))
    return replies


def chrf(hypothesis: str, reference: str, *, order: int = CHRF_ORDER, beta: float = CHRF_BETA) -> float:
    """chrF (Popović 2015), 0..100: character n-gram precision and recall (whitespace removed), each averaged over
    the orders 1..``order`` that both texts have n-grams of, combined as an F-score weighting recall ``beta`` times
    as much as precision. Two empty texts score 100; an empty one against a non-empty one 0."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    if not hyp or not ref:
        return 100.0 if hyp == ref else 0.0
    precisions, recalls = [], []
    for n in range(1, order + 1):
        h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if not h or not r:
            continue
        match = sum((h & r).values())
        precisions.append(match / sum(h.values()))
        recalls.append(match / sum(r.values()))
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    b2 = beta * beta
    return 100.0 * (1 + b2) * p * r / (b2 * p + r) if p + r > 0 else 0.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class ForcedCounts:
    """Sums over the teacher's reply tokens, teacher-forced: both models' NLL, top-1 agreement, KL(teacher||student)."""

    tokens: int = 0
    teacher_nll: float = 0.0
    student_nll: float = 0.0
    agree: int = 0
    kl: float = 0.0
    token_nll: list[float] = field(default_factory=list)  # the student's NLL per reply token (for paired tests)
    token_agree: list[bool] = field(default_factory=list)  # its top-1 equal to the teacher's, per reply token

    def result(self) -> dict[str, Any]:
        n = max(self.tokens, 1)
        return {"tokens": self.tokens, "teacher_perplexity": math.exp(self.teacher_nll / n),
                "student_perplexity": math.exp(self.student_nll / n), "agreement_top1": self.agree / n,
                "kl_teacher_student": self.kl / n}


def _reply_positions(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], *, pad_id: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + reply rows padded on the right: ids, mask, the positions whose next token is a reply token, and
    those tokens (row-major)."""
    rows = [list(p) + list(r) for p, r in zip(prompts, replies)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask, sel = torch.zeros_like(ids), torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (row, p) in enumerate(zip(rows, prompts)):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        sel[i, len(p) - 1:len(row) - 1] = True
    target = ids[:, 1:][sel[:, :-1]]
    return ids.to(device), mask.to(device), sel.to(device), target.to(device)


@torch.no_grad()
def teacher_forced(teacher: SwappableModel, student: SwappableModel, prompts: Sequence[Sequence[int]], *,
                   replies: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> ForcedCounts:
    """Both models read each prompt followed by the teacher's reply; every reply token is one prediction."""
    device = next(teacher.parameters()).device
    counts = ForcedCounts()
    for start in range(0, len(prompts), batch_size):
        ids, mask, sel, target = _reply_positions(prompts[start:start + batch_size], replies[start:start + batch_size],
                                                  pad_id=pad_id, device=device)

        def log_probs(model: SwappableModel) -> torch.Tensor:
            h = model(ids, mask, with_logits=False).last_hidden_state
            return model.lm_logits(h[sel]).float().log_softmax(-1)

        t_lp, s_lp = log_probs(teacher.eval()), log_probs(student.eval())
        s_nll, agree = -s_lp.gather(1, target[:, None])[:, 0], t_lp.argmax(-1) == s_lp.argmax(-1)
        counts.tokens += int(target.numel())
        counts.teacher_nll -= t_lp.gather(1, target[:, None]).sum().item()
        counts.student_nll += s_nll.sum().item()
        counts.agree += int(agree.sum())
        counts.token_nll += s_nll.tolist()
        counts.token_agree += agree.tolist()
        counts.kl += F.kl_div(s_lp, t_lp, log_target=True, reduction="sum").item()
    return counts


@dataclass
class ChatResult:
    """The chat comparison's metrics (results.json's "chat"), one row per prompt (both replies, their scores) and the
    teacher-forced sums with their per-token values (what a paired test of two students reads)."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    forced: ForcedCounts = field(default_factory=ForcedCounts)

    def per_item(self) -> dict[str, list]:
        """What a paired test of two students on the same teacher replies reads (``paired_chat``): per prompt
        whether the first ``PREFIX_TOKENS`` reply tokens equal the teacher's; per teacher reply token the student's
        NLL and whether its top-1 is the teacher's."""
        return {FIRST: [r[FIRST] for r in self.rows], "nll": self.forced.token_nll, "agree": self.forced.token_agree}


def paired_chat(a: dict[str, list], b: dict[str, list]) -> dict[str, Any]:
    """Student a against student b (their ``per_item``): McNemar's exact test on the prompts whose first reply tokens
    equal the teacher's and on top-1 agreement per reply token; the paired t-test and sign test of per-token NLL."""
    from .stats import mcnemar, paired_t, sign_test

    return {FIRST: mcnemar(a[FIRST], b[FIRST]), "agreement": mcnemar(a["agree"], b["agree"]),
            "nll_t": paired_t(a["nll"], b["nll"]), "nll_sign": sign_test(a["nll"], b["nll"])}


@dataclass
class TeacherReplies:
    """The teacher's greedy replies to a prompt set, beside its chat format and the tokenised prompts: generated
    once, then compared with as many students as there are (a bench's)."""

    chat: Chat
    prompts: list[str]
    ids: list[list[int]]
    replies: list[list[int]]
    source: str = ""  # the prompt file


def teacher_replies(teacher: SwappableModel, chat: Chat, prompts: Sequence[str], *, config: ChatConfig,
                    source: str = "") -> TeacherReplies:
    """The teacher's answers to ``prompts``, greedy, as every student's are (``chat_fidelity`` compares them)."""
    ids = [chat.prompt_ids(p) for p in prompts]
    return TeacherReplies(chat, list(prompts), ids, answer(teacher, chat, ids, max_new_tokens=config.max_new_tokens,
                                                           batch_size=config.batch_size), source)


def teacher_chat(teacher: SwappableModel, tokenizer: Any, *, teacher_name: str, config: ChatConfig) -> TeacherReplies:
    """The teacher's replies to ``config.prompts`` through its chat template: what every student is compared with."""
    path, prompts = read_prompts(config.prompts)
    return teacher_replies(teacher, Chat.of(tokenizer, teacher_name), prompts, config=config, source=str(path))


def chat_fidelity(teacher: SwappableModel, student: SwappableModel, chat: Chat, *, prompts: Sequence[str] = (),
                  config: ChatConfig, replies: TeacherReplies | None = None) -> ChatResult:
    """Teacher and student answer ``prompts`` greedily; their replies compared (see the module's docstring).
    ``replies``: the teacher's, already generated (``teacher_replies``), instead of generating them for ``prompts``."""
    if replies is None:
        replies = teacher_replies(teacher, chat, prompts, config=config)
    ids, t_replies = replies.ids, replies.replies
    s_replies = answer(student, chat, ids, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
    rows = [_row(p, t, s, chat=chat) for p, t, s in zip(replies.prompts, t_replies, s_replies)]
    forced = teacher_forced(teacher, student, ids, replies=t_replies, pad_id=chat.pad_id, batch_size=config.batch_size)
    n = len(rows)
    metrics = {
        "prompts": n, "exact_match": sum(r["exact_match"] for r in rows) / n,
        "mean_common_prefix_tokens": sum(r["common_prefix_tokens"] for r in rows) / n,
        f"first{PREFIX_TOKENS}_match": sum(r[f"first{PREFIX_TOKENS}_match"] for r in rows) / n,
        "chrf": sum(r["chrf"] for r in rows) / n,
        "teacher_reply_tokens": sum(len(t) for t in t_replies) / n,
        "student_reply_tokens": sum(len(s) for s in s_replies) / n,
        "teacher_unfinished": sum(not _ended(t, chat) for t in t_replies),
        "student_unfinished": sum(not _ended(s, chat) for s in s_replies),
        "teacher_forced": forced.result(), "max_new_tokens": config.max_new_tokens, "end_of_turn": chat.describe(),
    }
    return ChatResult(metrics, rows, forced)


def _ended(reply: Sequence[int], chat: Chat) -> bool:
    return bool(reply) and reply[-1] in chat.end_ids


def _row(prompt: str, teacher: list[int], student: list[int], *, chat: Chat) -> dict[str, Any]:
    t_text, s_text = chat.text(teacher), chat.text(student)
    return {"prompt": prompt, "teacher": t_text, "student": s_text, "exact_match": teacher == student,
            "common_prefix_tokens": common_prefix(teacher, student),
            f"first{PREFIX_TOKENS}_match": teacher[:PREFIX_TOKENS] == student[:PREFIX_TOKENS],
            "chrf": chrf(s_text, t_text), "teacher_tokens": teacher, "student_tokens": student}


def write_chat_report(result: ChatResult, out: str | Path, *, shown: int = 6) -> list[Path]:
    """All replies in chat_replies.jsonl; the metrics and the first ``shown`` replies side by side in chat.md."""
    out = Path(out)
    replies, table = out / "chat_replies.jsonl", out / "chat.md"
    write_staged({replies: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows),
                  table: chat_table(result.metrics) + "\n\n" + side_by_side(result.rows[:shown]) + "\n"})
    return [replies, table]


def chat_table(m: dict[str, Any]) -> str:
    """The chat metrics, markdown."""
    f = m["teacher_forced"]
    end = m["end_of_turn"]
    return "\n".join([
        f"chat: {m['prompts']} prompts, greedy, at most {m['max_new_tokens']} new tokens, replies end at "
        f"{', '.join(end['tokens'])} ({end['from']})", "",
        "| chat metric | value |", "|---|---:|",
        f"| whole reply equal to the teacher's | {m['exact_match']:.3f} |",
        f"| mean common prefix (tokens) | {m['mean_common_prefix_tokens']:.2f} |",
        f"| first {PREFIX_TOKENS} tokens equal | {m[f'first{PREFIX_TOKENS}_match']:.3f} |",
        f"| chrF (student vs teacher reply) | {m['chrf']:.2f} |",
        f"| reply tokens teacher / student | {m['teacher_reply_tokens']:.1f} / {m['student_reply_tokens']:.1f} |",
        f"| replies cut at the limit teacher / student | {m['teacher_unfinished']} / {m['student_unfinished']} |",
        f"| teacher-forced perplexity teacher / student | {f['teacher_perplexity']:.3f} / "
        f"{f['student_perplexity']:.3f} |",
        f"| teacher-forced top-1 agreement | {f['agreement_top1']:.4f} |",
        f"| teacher-forced KL(teacher ‖ student) per token | {f['kl_teacher_student']:.4f} |",
    ])


def side_by_side(rows: Sequence[dict[str, Any]]) -> str:
    """Prompts with both replies, markdown (newlines and '|' escaped so each stays one table cell)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | teacher | student |", "|---|---|---|"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['teacher'])} | {cell(r['student'])} |" for r in rows]
    return "\n".join(lines)


def evaluate_chat(teacher: SwappableModel, student: SwappableModel, tokenizer: Any, *, teacher_name: str,
                  config: ChatConfig, out: str | Path) -> dict[str, Any]:
    """The chat comparison of an evaluation: its report files in ``out``; returns results.json's "chat" object."""
    replies = teacher_chat(teacher, tokenizer, teacher_name=teacher_name, config=config)
    res = compare_chat(teacher, student, replies=replies, config=config, out=out)
    return {"prompts_file": replies.source, **res.metrics}


def compare_chat(teacher: SwappableModel, student: SwappableModel, *, replies: TeacherReplies, config: ChatConfig,
                 out: str | Path) -> ChatResult:
    """``chat_fidelity`` on the teacher's ``replies`` (``teacher_chat``) and its report files in ``out``."""
    res = chat_fidelity(teacher, student, replies.chat, config=config, replies=replies)
    write_chat_report(res, out, shown=config.shown)
    return res


def check_chat(task: str, prompts: str, *, what: str, default: str = "eval") -> None:
    """Before anything is loaded: ``what`` (a chat job) needs a causal-LM teacher (SettingError) and readable
    prompts."""
    from ..errors import SettingError

    if task != "causal":
        raise SettingError(f"{what}: an encoder (masked-LM teacher) has no chat; this needs a decoder teacher")
    read_prompts(prompts, default)
