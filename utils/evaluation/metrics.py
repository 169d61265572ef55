"""Teacher vs student on the test split: the metrics and the comparison that sums them.

A masked LM is compared on one [MASK] per sentence (every model sees the same masked sentences: positions fixed by
the dataset's seed); a causal LM on every next token of the split's token windows (perplexity, next-token accuracy,
agreement, KL per token), and on its prefill and decode speed. Counts are summed, then divided once, so results are
exact under data parallelism too (counts are all-reduced before dividing).
"""
from __future__ import annotations

import abc
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.base import SwappableModel
from models.hf import TeacherError
from .. import runtime

log = logging.getLogger(__name__)

TOPK = (1, 5, 10)


@dataclass
class EvalConfig:
    """How a student is compared with its teacher (the data settings say how much of the split is read)."""

    split: str = "test"  # or valid
    judge: str | None = None  # a larger masked-LM (hub id or folder, same vocabulary) judging the predictions
    max_batches: int | None = None  # stop after this many batches (of the split and of each text)
    texts: tuple = ()  # ``texts.EvalText`` items: named texts scored like the split, each on its own


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per sentence (all ranks' rows under DDP)
    notes: list[str] = field(default_factory=list)
    texts: dict[str, dict[str, Any]] = field(default_factory=dict)  # per named text (``texts.score_texts``)


def _judge_id_map(tokenizer, judge_tokenizer) -> None:
    if judge_tokenizer is not None and judge_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise TeacherError("the judge's tokenizer has a different vocabulary from the teacher's: predictions cannot be "
                         "compared token by token; choose a judge with the same vocabulary (e.g. bert-large-uncased "
                         "for bert-base-uncased)")


@dataclass
class BatchOutputs:
    """One batch as the metrics read it: both models' final hidden states (float32), the timed forward seconds, and,
    with masked-LM heads, the logits (float32) and top-``max(TOPK)`` token ids at the masked position (the judge's
    too, when there is one)."""
    batch: dict[str, torch.Tensor]
    valid: torch.Tensor  # [B, T] bool: real tokens
    target: torch.Tensor  # [B] the masked token's id
    teacher_hidden: torch.Tensor
    student_hidden: torch.Tensor
    teacher_seconds: float
    student_seconds: float
    teacher_logits: torch.Tensor | None = None
    student_logits: torch.Tensor | None = None
    teacher_top: torch.Tensor | None = None
    student_top: torch.Tensor | None = None
    judge_top: torch.Tensor | None = None


class Metric(abc.ABC):
    """Counts summed over batches (``update``), then over ranks, then divided once (``result``)."""

    def __init__(self, *counts: str):
        self.counts = dict.fromkeys(counts, 0.0)

    @abc.abstractmethod
    def update(self, out: BatchOutputs) -> None: ...

    @abc.abstractmethod
    def result(self) -> dict[str, Any]: ...


class HiddenFidelity(Metric):
    """Cosine and MSE of the final hidden states over real tokens; the number of sentences."""

    def __init__(self):
        super().__init__("sentences", "tokens", "cos_sum", "mse_sum")

    def update(self, out: BatchOutputs) -> None:
        th, sh, valid, c = out.teacher_hidden, out.student_hidden, out.valid, self.counts
        c["cos_sum"] += F.cosine_similarity(th, sh, dim=-1)[valid].sum().item()
        c["mse_sum"] += (th - sh).pow(2).mean(-1)[valid].sum().item()
        c["tokens"] += valid.sum().item()
        c["sentences"] += len(valid)

    def result(self) -> dict[str, Any]:
        tok = max(self.counts["tokens"], 1)
        return {"sentences": int(self.counts["sentences"]), "hidden_cosine": self.counts["cos_sum"] / tok,
                "hidden_mse": self.counts["mse_sum"] / tok}


class Cost(Metric):
    """Parameters and forward latency per batch of both models, their ratio and the speed-up."""

    def __init__(self, teacher: SwappableModel, student: SwappableModel):
        super().__init__("t_time", "s_time", "batches")
        self.params = teacher.num_parameters(), student.num_parameters()

    def update(self, out: BatchOutputs) -> None:
        self.counts["t_time"] += out.teacher_seconds
        self.counts["s_time"] += out.student_seconds
        self.counts["batches"] += 1

    def result(self) -> dict[str, Any]:
        t, s, batches = self.counts["t_time"], self.counts["s_time"], max(self.counts["batches"], 1)
        return {"teacher_params": self.params[0], "student_params": self.params[1],
                "teacher_latency_ms_per_batch": 1000 * t / batches, "student_latency_ms_per_batch": 1000 * s / batches,
                "param_ratio": self.params[1] / self.params[0], "speedup": t / s if s > 0 else math.nan}


class PerSentence(Metric):
    """A masked-token metric: counts per sentence, divided by the number of sentences."""

    def __init__(self, *counts: str):
        super().__init__("n", *counts)

    def update(self, out: BatchOutputs) -> None:
        self.counts["n"] += len(out.target)
        for k, v in self.count(out).items():
            self.counts[k] += v

    @abc.abstractmethod
    def count(self, out: BatchOutputs) -> dict[str, float]:
        """This batch's counts (one per result key)."""

    def result(self) -> dict[str, Any]:
        n = max(self.counts["n"], 1)
        return {k: v / n for k, v in self.counts.items() if k != "n"}


def _hits(top: torch.Tensor, k: int, want: torch.Tensor) -> float:
    """Rows whose first ``k`` ids contain ``want`` (one id per row)."""
    return (top[:, :k] == want[:, None]).any(-1).sum().item()


class TopKAccuracy(PerSentence):
    """Top-k accuracy of teacher and student at the masked position."""

    def __init__(self):
        super().__init__(*(f"{who}_top{k}" for who in ("teacher", "student") for k in TOPK))

    def count(self, out: BatchOutputs) -> dict[str, float]:
        tops = {"teacher": out.teacher_top, "student": out.student_top}
        return {f"{who}_top{k}": _hits(tops[who], k, out.target) for who in tops for k in TOPK}


class Agreement(PerSentence):
    """Student top-1 = teacher top-1."""

    def __init__(self):
        super().__init__("agreement_top1")

    def count(self, out: BatchOutputs) -> dict[str, float]:
        return {"agreement_top1": (out.teacher_top[:, 0] == out.student_top[:, 0]).sum().item()}


class KLDivergence(PerSentence):
    """KL(teacher || student) of the vocabulary distributions at the masked position."""

    def __init__(self):
        super().__init__("kl_teacher_student")

    def count(self, out: BatchOutputs) -> dict[str, float]:
        kl = F.kl_div(out.student_logits.log_softmax(-1), out.teacher_logits.log_softmax(-1), log_target=True,
                      reduction="sum")
        return {"kl_teacher_student": kl.item()}


class Perplexity(PerSentence):
    """A causal LM's perplexity: exp of the mean negative log-likelihood of every predicted next token, and the
    student's over the teacher's. With ``entropy``, also each model's mean predictive entropy and its overconfidence
    (mean NLL minus mean entropy, as ``TokenScores.overconfidence``)."""

    def __init__(self, entropy: bool = False):
        self.entropy = entropy
        super().__init__("teacher_nll", "student_nll", *(("teacher_entropy", "student_entropy") if entropy else ()))

    def count(self, out: BatchOutputs) -> dict[str, float]:
        c = {}
        for who, logits in (("teacher", out.teacher_logits), ("student", out.student_logits)):
            c[f"{who}_nll"] = F.cross_entropy(logits, out.target, reduction="sum").item()
            if self.entropy:
                c[f"{who}_entropy"] = _entropies(logits.log_softmax(-1)).sum().item()
        return c

    def result(self) -> dict[str, Any]:
        n = max(self.counts["n"], 1)
        nll = {who: self.counts[f"{who}_nll"] / n for who in ("teacher", "student")}
        res = {"predicted_tokens": int(self.counts["n"]), **{f"{w}_nll": v for w, v in nll.items()},
               **{f"{w}_perplexity": math.exp(v) for w, v in nll.items()},
               "perplexity_ratio": math.exp(nll["student"] - nll["teacher"])}
        if self.entropy:
            for who in ("teacher", "student"):
                res[f"{who}_entropy"] = self.counts[f"{who}_entropy"] / n
                res[f"{who}_overconfidence"] = nll[who] - res[f"{who}_entropy"]
        return res


class JudgeAgreement(PerSentence):
    """The judge's top-1 accuracy; teacher's and student's top-1 within the judge's top-k."""

    def __init__(self):
        super().__init__("judge_top1", *(f"{who}_in_judge_top{k}" for who in ("teacher", "student") for k in TOPK))

    def count(self, out: BatchOutputs) -> dict[str, float]:
        j_top, tops = out.judge_top, {"teacher": out.teacher_top, "student": out.student_top}
        c = {"judge_top1": (j_top[:, 0] == out.target).sum().item()}
        c.update({f"{who}_in_judge_top{k}": _hits(j_top, k, tops[who][:, 0]) for who in tops for k in TOPK})
        return c


class PredictionRows:
    """One row per sentence (index, sentence, masked sentence, true/teacher/student token, judge top-10)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.rows = tokenizer, []

    def update(self, out: BatchOutputs) -> None:
        tok, batch = self.tokenizer, out.batch
        for b in range(len(out.target)):
            n = int(out.valid[b].sum())
            row = {"index": int(batch["index"][b]),
                   "sentence": tok.decode(batch["input_ids"][b, 1:n - 1].tolist()),
                   "masked": tok.decode(batch["masked_input_ids"][b, 1:n - 1].tolist()),
                   "true": tok.convert_ids_to_tokens(int(out.target[b])),
                   "teacher": tok.convert_ids_to_tokens(int(out.teacher_top[b, 0])),
                   "student": tok.convert_ids_to_tokens(int(out.student_top[b, 0]))}
            if out.judge_top is not None:
                row["judge_top10"] = tok.convert_ids_to_tokens(out.judge_top[b].tolist())
            self.rows.append(row)

    def result(self) -> list[dict[str, Any]]:
        if not runtime.is_distributed():
            return self.rows
        # every rank's sentences, in the order of a single process
        return sorted((r for part in runtime.all_gather_objects(self.rows) for r in part), key=lambda r: r["index"])


def _check_models(teacher: SwappableModel, student: SwappableModel, judge: SwappableModel | None, *,
                  tokenizer, judge_tokenizer) -> list[str]:
    """Refuse a judge that cannot judge; the notes on what will not be measured."""
    if judge is not None and teacher.TASK != "mlm":
        raise TeacherError("a judge ranks masked-token predictions: it applies to masked-LM teachers only")
    _judge_id_map(tokenizer, judge_tokenizer)
    notes = []
    if not (teacher.has_mlm_head and student.has_mlm_head):
        notes.append("no masked-LM head on " + ("the teacher" if not teacher.has_mlm_head else "the student")
                     + ": masked-token metrics (accuracy, agreement, KL, judge) skipped; fidelity metrics reported")
    if judge is not None and not judge.has_mlm_head:
        raise TeacherError("the judge model has no masked-LM head; choose a BertForMaskedLM checkpoint")
    return notes


def make_metrics(teacher: SwappableModel, student: SwappableModel, *, mlm: bool, with_judge: bool,
                 entropy: bool = False) -> list[Metric]:
    """The metrics of one comparison, in the order of their keys in the results (``entropy``: a causal LM's
    predictive entropies and overconfidence too)."""
    metrics: list[Metric] = [HiddenFidelity(), Cost(teacher, student)]
    if mlm and teacher.TASK == "causal":
        return metrics + [Perplexity(entropy), TopKAccuracy(), Agreement(), KLDivergence()]
    if mlm:
        metrics += [TopKAccuracy(), Agreement(), KLDivergence()] + ([JudgeAgreement()] if with_judge else [])
    return metrics


def _forward(model: SwappableModel, ids, att, *, pos, mlm: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder, then the vocabulary projection at the masked position only."""
    h = model(ids, att, with_logits=False).last_hidden_state
    return h, (model.mlm_logits(h[torch.arange(len(ids), device=ids.device), pos]) if mlm else None)


def _run_batch(teacher: SwappableModel, student: SwappableModel, judge: SwappableModel | None, *, batch,
               device: torch.device, mlm: bool, warm_up: bool) -> BatchOutputs:
    """Both models (timed, each alone) and the judge (untimed) on one batch."""
    ids, att = batch["masked_input_ids"].to(device), batch["attention_mask"].to(device)
    pos = batch["mask_pos"].to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if warm_up:  # untimed: the first call of a model pays for allocation and kernel selection
        _forward(teacher, ids, att, pos=pos, mlm=mlm), _forward(student, ids, att, pos=pos, mlm=mlm)
    sync(); t0 = time.perf_counter()
    th, tl = _forward(teacher, ids, att, pos=pos, mlm=mlm)
    sync(); t1 = time.perf_counter()
    sh, sl = _forward(student, ids, att, pos=pos, mlm=mlm)
    sync(); t2 = time.perf_counter()
    out = BatchOutputs(batch, att.bool(), batch["target"].to(device), th.float(), sh.float(), t1 - t0, t2 - t1)
    if mlm:
        out.teacher_logits, out.student_logits = tl.float(), sl.float()
        out.teacher_top = out.teacher_logits.topk(max(TOPK), -1).indices
        out.student_top = out.student_logits.topk(max(TOPK), -1).indices
        if judge is not None:
            _, jl = _forward(judge, ids, att, pos=pos, mlm=True)
            out.judge_top = jl.float().topk(max(TOPK), -1).indices
    return out


def next_tokens(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of token windows on ``device``: ids, attention mask, which positions predict a real next token, and
    those next tokens (one per prediction, in row-major order)."""
    from ..data.masking import NextTokenLabels

    ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    _, labels = NextTokenLabels()(ids, att)
    sel = labels != -100
    return ids, att, sel, labels[sel]


def _run_causal_batch(teacher: SwappableModel, student: SwappableModel, *, batch, device: torch.device,
                      warm_up: bool) -> BatchOutputs:
    """Both models (timed, each alone: the whole window and its logits, as a prefill) on one batch of token windows;
    every real token that has a real next token is one prediction (a row of the per-token metrics)."""
    ids, att, sel, target = next_tokens(batch, device)

    def run(model):
        out = model(ids, att, with_logits=False)
        return out.last_hidden_state, model.lm_logits(out.last_hidden_state[sel])

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if warm_up:
        run(teacher), run(student)
    sync(); t0 = time.perf_counter()
    th, tl = run(teacher)
    sync(); t1 = time.perf_counter()
    sh, sl = run(student)
    sync(); t2 = time.perf_counter()
    return _causal_outputs(batch, valid=att.bool(), target=target, th=th, sh=sh, tl=tl, sl=sl,
                           seconds=(t1 - t0, t2 - t1))


def _causal_outputs(batch: dict, *, valid: torch.Tensor, target: torch.Tensor, th: torch.Tensor, sh: torch.Tensor,
                    tl: torch.Tensor, sl: torch.Tensor, seconds: tuple[float, float]) -> BatchOutputs:
    """A causal batch as the metrics read it (float32, with both models' top-``max(TOPK)`` next tokens)."""
    out = BatchOutputs(batch, valid, target, th.float(), sh.float(), *seconds, tl.float(), sl.float())
    out.teacher_top = out.teacher_logits.topk(max(TOPK), -1).indices
    out.student_top = out.student_logits.topk(max(TOPK), -1).indices
    return out


def _all_reduce_counts(metrics: list[Metric], device: torch.device) -> None:
    """Every metric's counts summed over ranks, in one all-reduce (float64: exact for counts)."""
    keys = [(m, k) for m in metrics for k in m.counts]
    summed = runtime.all_reduce_sum(torch.tensor([m.counts[k] for m, k in keys], dtype=torch.float64, device=device))
    for (m, k), v in zip(keys, summed.tolist()):
        m.counts[k] = v


class CausalComparison:
    """``compare_models``'s per-token metrics of a causal teacher and student (without timings), fed with the outputs
    of forwards another loop already ran: a fine-tune's validation pass, so neither model runs twice. Each call is
    one batch (``next_tokens``'s positions); batches after the first ``max_batches`` are ignored."""

    def __init__(self, teacher: SwappableModel, student: SwappableModel, *, max_batches: int | None = None):
        if teacher.TASK != "causal":
            raise ValueError(f"a causal comparison needs a causal LM teacher, got a {teacher.TASK} one")
        self.metrics = [m for m in make_metrics(teacher, student, mlm=True, with_judge=False, entropy=True)
                        if not isinstance(m, Cost)]
        self.max_batches, self.batches = max_batches, 0

    def __call__(self, batch: dict, *, valid: torch.Tensor, target: torch.Tensor, teacher_hidden: torch.Tensor,
                 student_hidden: torch.Tensor, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> None:
        if self.max_batches is not None and self.batches >= self.max_batches:
            return
        self.batches += 1
        out = _causal_outputs(batch, valid=valid, target=target, th=teacher_hidden, sh=student_hidden,
                              tl=teacher_logits, sl=student_logits, seconds=(0.0, 0.0))
        for metric in self.metrics:
            metric.update(out)

    def result(self, device: torch.device) -> dict[str, Any]:
        """The metrics over every rank's batches (call once, on every rank)."""
        _all_reduce_counts(self.metrics, device)
        return {k: v for metric in self.metrics for k, v in metric.result().items()}


def _batches(loader, max_batches: int | None, desc: str):
    """The first ``max_batches`` batches of ``loader`` (all with None) under a progress bar (rank 0's, on stderr;
    gone when done)."""
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return tqdm(itertools.islice(loader, max_batches), total=total, desc=desc, unit="batch", leave=False,
                disable=not runtime.is_main_process(), dynamic_ncols=True)


@torch.no_grad()
def compare_models(teacher: SwappableModel, student: SwappableModel, loader, *, tokenizer, device: torch.device,
                   judge: SwappableModel | None = None, judge_tokenizer=None, keep_rows: bool = True,
                   max_batches: int | None = None) -> EvalResult:
    """Masked-token accuracy (top-1/5/10), agreement, KL(teacher||student), hidden-state cosine, latency, params; for a
    causal LM the same per predicted next token, both perplexities and their ratio, entropies and overconfidence."""
    notes = _check_models(teacher, student, judge, tokenizer=tokenizer, judge_tokenizer=judge_tokenizer)
    mlm = teacher.has_mlm_head and student.has_mlm_head
    for model in (teacher, student, judge):
        if model is not None:
            model.eval()
    metrics = make_metrics(teacher, student, mlm=mlm, with_judge=judge is not None, entropy=True)
    rows = PredictionRows(tokenizer) if keep_rows else None
    causal = teacher.TASK == "causal"
    for bi, batch in enumerate(_batches(loader, max_batches, "comparing with the teacher")):
        out = (_run_causal_batch(teacher, student, batch=batch, device=device, warm_up=bi == 0) if causal else
               _run_batch(teacher, student, judge, batch=batch, device=device, mlm=mlm, warm_up=bi == 0))
        for metric in metrics:
            metric.update(out)
        if rows is not None and mlm and not causal:
            rows.update(out)
    _all_reduce_counts(metrics, device)
    result = {k: v for metric in metrics for k, v in metric.result().items()}
    return EvalResult(metrics=result, rows=rows.result() if rows is not None else [], notes=notes)


@dataclass
class _TeacherBatch:
    """One batch as the teacher saw it: the hidden state entering every layer, and its outputs where the metrics
    read them (the masked position of each sentence, or every predicted next token)."""

    batch: dict[str, torch.Tensor]
    ids: torch.Tensor
    att: torch.Tensor
    select: torch.Tensor  # [B, T] bool: the positions the LM metrics read
    target: torch.Tensor
    hidden: list[torch.Tensor]  # embeddings output, then each layer's output
    logits: torch.Tensor | None
    top: torch.Tensor | None


class UnitEvaluator:
    """Compares many students that each differ from the teacher from one layer on (a unit put alone into the
    teacher: the sensitivity map) on one loader, as ``compare_models`` does, but runs the teacher once: its outputs
    and the hidden state entering every layer are kept, and each student runs from its first changed layer only."""

    def __init__(self, teacher: SwappableModel, loader, *, device: torch.device, max_batches: int | None = None):
        self.teacher, self.device = teacher.eval(), device
        self.causal, self.mlm = teacher.TASK == "causal", teacher.has_lm_head
        self.batches: list[_TeacherBatch] = []
        with torch.no_grad():
            for batch in itertools.islice(loader, max_batches):
                if self.causal:
                    ids, att, select, target = next_tokens(batch, device)
                else:
                    ids, att = batch["masked_input_ids"].to(device), batch["attention_mask"].to(device)
                    select = torch.zeros_like(att, dtype=torch.bool)
                    select[torch.arange(len(ids)), batch["mask_pos"].to(device)] = True
                    target = batch["target"].to(device)
                out = teacher(ids, att, output_hidden_states=True, with_logits=False)
                logits = teacher.lm_logits(out.last_hidden_state[select]).float() if self.mlm else None
                top = logits.topk(max(TOPK), -1).indices if logits is not None else None
                self.batches.append(_TeacherBatch(batch, ids, att, select, target, out.hidden_states, logits, top))

    @torch.no_grad()
    def teacher_metrics(self) -> dict[str, Any]:
        """The teacher against itself: its accuracies (and perplexity), the reference the map's drops are taken from."""
        return self.measure(self.teacher, 0)

    @torch.no_grad()
    def measure(self, student: SwappableModel, start: int) -> dict[str, Any]:
        """The metrics of ``compare_models`` (without timings) for ``student``, whose layers before ``start`` are the
        teacher's own (their output is taken from the teacher's run)."""
        student.eval()
        metrics = [m for m in make_metrics(self.teacher, student, mlm=self.mlm, with_judge=False)
                   if not isinstance(m, Cost)]
        for tb in self.batches:
            h = student.run_layers(tb.hidden[start], student.context(tb.att), start=start)
            out = BatchOutputs(tb.batch, tb.att.bool(), tb.target, tb.hidden[-1].float(), h.float(), 0.0, 0.0)
            if self.mlm:
                out.teacher_logits, out.teacher_top = tb.logits, tb.top
                out.student_logits = student.lm_logits(h[tb.select]).float()
                out.student_top = out.student_logits.topk(max(TOPK), -1).indices
            for metric in metrics:
                metric.update(out)
        return {k: v for metric in metrics for k, v in metric.result().items()}


@dataclass
class TokenScores:
    """Per predicted next token of a causal LM's windows (one entry per token, in loader order): the teacher's NLL,
    and for each student its NLL, whether its top-1 equals the teacher's, and KL(teacher || student); ``window``:
    the dataset index of the window each token is in (for tests over windows instead of tokens). ``entropy`` (and
    ``teacher_entropy``): each prediction's entropy in nats; a model's mean NLL minus its mean entropy is how
    overconfident it is on this text (a student flatter than an overconfident teacher can score a lower NLL)."""

    window: list[int]
    teacher_nll: list[float]
    nll: dict[str, list[float]]
    agree: dict[str, list[bool]]
    kl: dict[str, list[float]]
    teacher_entropy: list[float] = field(default_factory=list)
    entropy: dict[str, list[float]] = field(default_factory=dict)

    def mean(self, values: list[float]) -> float:
        return math.fsum(values) / max(len(values), 1)

    def perplexity(self, who: str = "teacher") -> float:
        return math.exp(self.mean(self.teacher_nll if who == "teacher" else self.nll[who]))

    def overconfidence(self, who: str = "teacher") -> float:
        """Mean NLL minus mean predictive entropy (nats per token): above 0, surer than it is right."""
        nll, ent = (self.teacher_nll, self.teacher_entropy) if who == "teacher" else (self.nll[who], self.entropy[who])
        return self.mean(nll) - self.mean(ent)

    def per_window(self, values: list[float]) -> list[float]:
        """The mean of ``values`` over each window's tokens, window by window."""
        sums: dict[int, list[float]] = {}
        for w, v in zip(self.window, values):
            sums.setdefault(w, []).append(v)
        return [math.fsum(v) / len(v) for v in sums.values()]

    def paired(self, a: str, b: str) -> dict[str, Any]:
        """Student ``a`` against ``b`` on the same tokens: NLL (t over tokens and over window means; sign test),
        agreement with the teacher (McNemar), KL (t over tokens)."""
        from .stats import mcnemar, paired_t, sign_test

        return {"a": a, "b": b,
                "nll_t_tokens": paired_t(self.nll[a], self.nll[b]),
                "nll_t_windows": paired_t(self.per_window(self.nll[a]), self.per_window(self.nll[b])),
                "nll_sign": sign_test(self.nll[a], self.nll[b]),
                "agreement_mcnemar": mcnemar(self.agree[a], self.agree[b]),
                "kl_t_tokens": paired_t(self.kl[a], self.kl[b])}


@torch.no_grad()
def token_scores(teacher: SwappableModel, students: dict[str, SwappableModel], loader, *, device: torch.device,
                 max_batches: int | None = None) -> TokenScores:
    """Every next-token prediction of ``loader``'s token windows, scored token by token: the teacher's NLL, and each
    student's NLL, top-1 agreement with the teacher and KL(teacher || student) (one teacher pass per batch; the
    sums are those of ``compare_models``). For paired tests over tokens; one process (no reduction over ranks)."""
    if teacher.TASK != "causal":
        raise TeacherError("token_scores compares next-token predictions: it needs a causal-LM teacher")
    res = TokenScores([], [], {k: [] for k in students}, {k: [] for k in students}, {k: [] for k in students},
                      [], {k: [] for k in students})
    for model in (teacher, *students.values()):
        model.eval()
    for batch in _batches(loader, max_batches, f"scoring {len(students)} model(s) and the teacher"):
        ids, att, sel, target = next_tokens(batch, device)
        res.window += batch["index"][:, None].expand_as(sel)[sel.cpu()].tolist()

        def log_probs(model: SwappableModel) -> torch.Tensor:
            h = model(ids, att, with_logits=False).last_hidden_state
            return model.lm_logits(h[sel]).float().log_softmax(-1)

        t_lp = log_probs(teacher)
        res.teacher_nll += (-t_lp.gather(1, target[:, None])[:, 0]).tolist()
        res.teacher_entropy += _entropy(t_lp)
        t_top = t_lp.argmax(-1)
        for name, student in students.items():
            s_lp = log_probs(student)
            res.nll[name] += (-s_lp.gather(1, target[:, None])[:, 0]).tolist()
            res.agree[name] += (s_lp.argmax(-1) == t_top).tolist()
            res.kl[name] += F.kl_div(s_lp, t_lp, log_target=True, reduction="none").sum(-1).tolist()
            res.entropy[name] += _entropy(s_lp)
    return res


def _entropies(log_probs: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of each row's distribution, given its log-probabilities (a zero probability adds 0)."""
    return torch.special.entr(log_probs.exp()).sum(-1)


def _entropy(log_probs: torch.Tensor) -> list[float]:
    return _entropies(log_probs).tolist()


@torch.no_grad()
def transformers_nll(folder: str | Path, windows: list[list[int]], *, trust_remote_code: bool = False) -> list[float]:
    """Per predicted token NLL of plain transformers' causal LM in ``folder`` (a checkpoint, or one of our exports:
    ``trust_remote_code`` for a remote-code one), window by window, fp32, no cache: a check of our evaluator."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                              trust_remote_code=trust_remote_code).eval()
    out: list[float] = []
    for w in windows:
        x = torch.tensor([w])
        logits = hf(x, use_cache=False).logits[0, :-1].float()
        out += F.cross_entropy(logits, x[0, 1:], reduction="none").tolist()
    return out

