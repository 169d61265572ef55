"""Distillation tasks for the shared training loop: retrained attention blocks, merged layer pairs, whole models.

Each task is an ``nn.Module`` holding only the students (the frozen teacher is kept outside the module tree, so
``.train()`` never turns its dropout on and DDP never syncs it). ``forward(batch)`` returns (total loss, logs);
``evaluate(loader)`` returns exact token-weighted validation means per unit, reduced over ranks.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from models.base import SwappableAttention, SwappableLayer, SwappableModel
from models.compress import compose
from models.config import LayerSpec
from .. import runtime
from ..errors import SettingError
from ..data.masking import MLMMasker, OneMasker
from ..storage.features import TeacherCache, teacher_features
from ..storage.logits import TopKCache
from .losses import (attention_loss, attention_vectors, hidden_loss, kl_logits, raw_score_loss, relation_heads_for,
                     relation_loss, topk_kl)

log = logging.getLogger(__name__)

BALANCED = "balanced"  # a term weight: scaled to a share of the task's first term at the start (see balance_terms)
# that share: a balanced term starts at this many times the first term. 0.01 (docs/results.md, "Issue 22: losses that
# never hurt"): relations started at 1x the output MSE cost agreement on MiniLM (p < 1e-4) and NLL on SmolLM2
# (p < 1e-90); at 0.1 still NLL on SmolLM2 (+0.11%, p < 1e-12); at 0.01 no measurable difference on either
BALANCE_RATIO = 0.01

# The end-to-end KD temperature when none is given, by the teacher's task. Masked LM: the temperature the BERT results
# were measured with. Decoder: 1, because perplexity is measured at 1; on SmolLM2 (1.5x planned student, a 60-step
# heal, WikiText-2 validation split, 15,792 tokens) T=1 gave perplexity 1.130x the teacher's, T=2 1.193x.
KD_TEMPERATURE = {"mlm": 2.0, "causal": 1.0}


def kd_temperature(teacher: SwappableModel, given: float | None) -> float:
    """``given``, else the default KD temperature of the teacher's task (``KD_TEMPERATURE``)."""
    return KD_TEMPERATURE[teacher.TASK] if given is None else given


def check_ratio(r: float) -> float:
    """A balance ratio: a finite number > 0."""
    if isinstance(r, (str, bool)) or not math.isfinite(float(r)) or float(r) <= 0:
        raise SettingError(f"`balance_ratio` must be a finite number > 0, got {r!r}")
    return float(r)


def check_weight(w: float | str, term: str) -> float | str:
    """A term weight: a finite number >= 0 (0: the term is off), or BALANCED."""
    if w == BALANCED:
        return BALANCED
    if isinstance(w, str) or isinstance(w, bool) or not math.isfinite(float(w)) or float(w) < 0:
        raise SettingError(f"the weight of the {term} term must be a number >= 0 or '{BALANCED}', got {w!r}")
    return float(w)


def _on(w: float | str) -> bool:
    return w == BALANCED or float(w) > 0


def check_topk_terms(weights: dict[str, float | str]) -> None:
    """The end-to-end loss terms (term -> weight) a heal from the teacher's top-k cache can have: the KL, on, and the
    hard-label one; the hidden-state and relation terms need the teacher's hidden states."""
    on = {t for t, w in weights.items() if _on(check_weight(w, t))}
    if "kl" not in on or on - {"kl", "mlm"}:
        raise SettingError("`teacher_topk` caches the teacher's next-token distributions only: it needs the KL term "
                           "(`kl_weight` > 0) and no hidden-state or relation term (on: "
                           f"{', '.join(sorted(on - {'kl', 'mlm'})) or 'none'})")


# ---- what each kind of unit is trained on (the settings of the tasks below) ----
@dataclass
class BlockLoss:
    """What a retrained attention block is compared on (see ``BlockDistill``)."""

    loss_on: tuple[str, ...] = ("output",)  # any of output, scores, relations; or mlm alone
    criterion: str = "MSE"  # on the block output (scores alone: on the attention distributions)
    score_criterion: str | None = None  # on attention scores; None: CrossEntropy beside the output, else criterion
    score_target: str = "probs"  # probs: softmax distributions; logits: the raw scaled scores (MSE / L1)
    temperature: float = 1.0  # of the mlm loss
    relation_heads: int | None = None  # None: the largest common divisor up to the teacher's head count
    relation_weight: float | str = BALANCED  # beside the output term: a fixed weight, or balanced (see balance_terms)
    score_weight: float | str = BALANCED  # the scores term beside the output term, the same way
    balance_ratio: float = BALANCE_RATIO  # a balanced term starts at this many times the output term
    mask_inputs: bool = False  # one [MASK] per training sentence, redrawn every step (the seed's data)

    def scores_by(self) -> str:
        """The criterion of the scores loss."""
        if self.score_criterion:
            return self.score_criterion
        return "CrossEntropy" if "output" in self.loss_on or self.criterion == "cosine" else self.criterion


@dataclass
class MergeLoss:
    """What a merged layer is compared on (see ``MergeDistill``)."""

    loss_on: str = "hidden"  # the hidden state leaving the pair, or mlm (KL through the frozen rest)
    criterion: str = "MSE"  # MSE, L1, cosine or aRRMSE
    temperature: float = 1.0  # of the mlm loss
    mask_inputs: bool = False  # one [MASK] per training sentence, redrawn every step (the seed's data)


@dataclass
class FinetuneLoss:
    """The end-to-end objective of a fine-tuned student (see ``ModelDistill``)."""

    kl_weight: float = 1.0  # KL(teacher || student) at masked positions
    mlm_weight: float | str = 0.0  # hard-label masked-LM cross-entropy (a weight may be BALANCED, see balance_terms)
    hidden_weight: float | str = 0.0  # hidden-state loss at matched layers
    hidden_criterion: str = "cosine"
    temperature: float | None = None  # None: the teacher's task's (KD_TEMPERATURE)
    relation_weight: float | str = 0.0  # MiniLMv2 relations at matched layers; balanced: see balance_terms
    relation_heads: int | None = None
    balance_ratio: float = BALANCE_RATIO  # a balanced term starts at this many times the first term (KL)
    # a decoder's KL read from the teacher's top-k next tokens cached once per training window (storage.logits),
    # not from the teacher run beside the student; None: the teacher runs at every step
    teacher_topk: int | None = None


class DistillTask(nn.Module):
    """Shared machinery: students in a ModuleDict, the frozen teacher beside it, loss bookkeeping."""

    def __init__(self, teacher: SwappableModel, students: dict[str, nn.Module], *, masker: MLMMasker | None = None,
                 cache: TeacherCache | None = None, seed: int = 0):
        super().__init__()
        teacher.requires_grad_(False).eval()
        self._frozen = {"teacher": teacher}  # not a submodule: never trained, never put in train mode
        self.students = nn.ModuleDict(students)
        for s in self.students.values():
            if isinstance(s, SwappableAttention):
                for p in s.frozen():
                    p.requires_grad_(False)  # a retrained block keeps the teacher's norm
        self.masker = masker
        self.cache = cache
        self.seed = seed
        self.input_masker: OneMasker | None = None
        # combined losses (tasks with ``unit_terms``): term -> its fixed weight or BALANCED, in TERMS order; and per
        # unit, how its balanced terms were scaled (``balance_terms``)
        self.term_weights: dict[str, float | str] = {}
        self.balance: dict[str, dict[str, Any]] = {}

    @property
    def teacher(self) -> SwappableModel:
        return self._frozen["teacher"]

    def unit_terms(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None
                   ) -> dict[str, tuple[dict[str, torch.Tensor], float]]:
        """Per unit: its loss terms (unweighted, named as in ``term_weights``) and its weight (tokens). Tasks whose
        loss combines terms implement this; ``unit_losses`` then weighs and sums them."""
        raise NotImplementedError

    def combines(self) -> bool:
        """Whether the task's loss is a weighted sum of named terms (``unit_terms``)."""
        return type(self).unit_terms is not DistillTask.unit_terms

    def anchor_term(self) -> str | None:
        """The term the others are balanced against: the first one the task has."""
        return next(iter(self.term_weights), None)

    def balances(self) -> bool:
        """Whether a term is to be balanced against the anchor (``balance_terms`` must run before training)."""
        return any(w == BALANCED for t, w in self.term_weights.items() if t != self.anchor_term())

    def _set_terms(self, weights: dict[str, float | str], balance_ratio: float) -> None:
        """The task's terms (those with a weight > 0 or BALANCED, in the given order) and their weights; the anchor
        term keeps its number, or 1 where it was to be balanced (there is nothing to balance it against). With a
        balanced term, ``balance_ratio`` is its share of the anchor at the start."""
        terms = {t: check_weight(w, t) for t, w in weights.items()}
        terms = {t: w for t, w in terms.items() if w == BALANCED or w > 0}
        anchor = next(iter(terms), None)
        if anchor is not None and terms[anchor] == BALANCED:
            terms[anchor] = 1.0
        self.term_weights = terms
        if self.balances():  # set only when used: the metadata of other runs stays as it was
            self.balance_ratio = check_ratio(balance_ratio)

    def unit_weights(self, unit: str) -> dict[str, float]:
        """The weight of each term of ``unit``: its fixed weight, or its balanced scale (``balance_terms``)."""
        out = {}
        for term, w in self.term_weights.items():
            if w != BALANCED:
                out[term] = float(w)
                continue
            scales = self.balance.get(unit, {}).get("scales", {})
            if term not in scales:
                raise RuntimeError(f"the {term} term of {unit} is balanced but has no scale yet: call "
                                   "balance_terms(task, probe) before training, or give the term a fixed weight")
            out[term] = float(scales[term])
        return out

    def unit_losses(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None
                    ) -> dict[str, tuple[torch.Tensor, float]]:
        """Per unit: its loss (the weighted sum of its terms) and its weight (tokens)."""
        out = {}
        for name, (terms, weight) in self.unit_terms(batch, generator).items():
            w = self.unit_weights(name)
            out[name] = (sum(w[k] * v for k, v in terms.items()), weight)
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses = self.unit_losses(batch, None)
        logs = {f"{k}/loss": l.detach() for k, (l, _) in losses.items()}
        if self.training and runtime.world_size() > 1:
            losses = self._share_of_global_mean(losses)
        total = sum(l for l, _ in losses.values())
        return total, logs

    def _share_of_global_mean(self, losses: dict[str, tuple[torch.Tensor, float]]
                              ) -> dict[str, tuple[torch.Tensor, float]]:
        """Under DDP: each rank's unit loss (a mean over its ``weight`` tokens) times K * weight / global weight.

        DDP averages gradients over the K ranks, so the result is the gradient of the mean over the whole global
        batch, as one process with K times the batch size computes it, however unevenly tokens fall on the ranks.
        A non-finite loss on any rank makes every rank's loss NaN, so all ranks stop together.
        """
        k = runtime.world_size()
        local = [w for _, w in losses.values()]
        local.append(float(not all(torch.isfinite(l).item() for l, _ in losses.values())))
        glob = runtime.all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=self.device)).tolist()
        out = {}
        for (name, (loss, w)), g in zip(losses.items(), glob):
            loss = loss * (k * w / g if g > 0 else 0.0)
            out[name] = (loss + float("nan") if glob[-1] > 0 else loss, w)
        return out

    @torch.no_grad()
    def evaluate(self, loader, max_batches: int | None = None) -> dict[str, float]:
        was = self.training
        self.eval()
        g = torch.Generator().manual_seed(self.seed + 12345)  # same validation masks every epoch
        # each unit's loss, and with several terms each term alone too (e.g. the block-output MSE of a combined run)
        parts = ["loss"] + (list(self.term_weights) if self.combines() and len(self.term_weights) > 1 else [])
        keys = [f"{n}/{p}" for n in self.students for p in parts]
        sums = torch.zeros(len(keys) + len(self.students), dtype=torch.float64)  # the weighted sums, then the weights
        for bi, batch in enumerate(loader):
            if max_batches is not None and bi >= max_batches:
                break
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if self.combines():
                terms = self.unit_terms(batch, g)
                values = {n: ({"loss": sum(w * ts[t] for t, w in self.unit_weights(n).items()), **ts}, weight)
                          for n, (ts, weight) in terms.items()}
            else:
                values = {n: ({"loss": loss}, weight) for n, (loss, weight) in self.unit_losses(batch, g).items()}
            for j, name in enumerate(self.students):
                vals, weight = values[name]
                for k, p in enumerate(parts):
                    sums[j * len(parts) + k] += float(vals[p]) * weight
                sums[len(keys) + j] += weight
        sums = runtime.all_reduce_sum(sums.to(self.device)).cpu()
        self.train(was)
        n_parts = len(parts)
        return {key: (sums[i] / sums[len(keys) + i // n_parts].clamp_min(1e-12)).item() for i, key in enumerate(keys)}

    @property
    def device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    def _features(self, batch, names: list[str]) -> dict[str, torch.Tensor]:
        if self.cache is not None and self.training:  # the cache holds the training split only
            return self.cache.batch(names, batch["index"], length=batch["input_ids"].shape[1], device=self.device)
        return teacher_features(self.teacher, batch["input_ids"], batch["attention_mask"], names=names)

    def _masked_features(self, batch, names: list[str], generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Input ids (with one [MASK] per sentence with an input masker) and the teacher's features for them."""
        if self.input_masker is None:
            return batch["input_ids"], self._features(batch, names)
        ids = self.input_masker(batch["input_ids"], batch["attention_mask"], generator)
        return ids, teacher_features(self.teacher, ids, batch["attention_mask"], names=names)

    def _mlm_targets(self, batch, generator):
        """Masked input, positions asked for, and the teacher's logits there."""
        ids, att = batch["input_ids"], batch["attention_mask"]
        masked, labels = self.masker(ids, att, generator)
        sel = labels != -100
        out = self.teacher(masked, att, with_logits=False)
        return masked, sel, self.teacher.mlm_logits(out.last_hidden_state[sel])


class BlockDistill(DistillTask):
    """Students are attention blocks ``block_<i>``, trained on the teacher's input to layer i.

    ``loss_on``: any of ``output`` (block output vs the teacher's), ``scores`` (attention distributions),
    ``relations`` (MiniLMv2 query-query / key-key / value-value relations in ``relation_heads`` relation heads; any
    student head count), or ``mlm`` (KL to the teacher's masked-token distribution through the frozen rest of the
    teacher). A block's loss is output + ``score_weight`` x scores + ``relation_weight`` x relations (the terms in
    ``loss_on``); a weight is a number, or BALANCED: scaled by ``balance_terms`` so that the term starts at
    ``balance_ratio`` times the first term (without the output term, the first of the others keeps weight 1).
    """

    TERMS = ("output", "scores", "relations")

    def __init__(self, teacher: SwappableModel, blocks: dict[int, SwappableAttention], loss_on: list[str], *,
                 criterion: str = "MSE", score_criterion: str = "CrossEntropy", masker: MLMMasker | None = None,
                 cache: TeacherCache | None = None, temperature: float = 1.0, seed: int = 0,
                 score_target: str = "probs", input_masker: OneMasker | None = None,
                 relation_heads: int | None = None, relation_weight: float | str = BALANCED,
                 score_weight: float | str = BALANCED, balance_ratio: float = BALANCE_RATIO):
        super().__init__(teacher, {f"block_{i}": b for i, b in blocks.items()}, masker=masker, cache=cache, seed=seed)
        unknown = sorted(set(loss_on) - set(self.TERMS) - {"mlm"})
        if unknown:
            raise ValueError(f"`loss_on` {unknown} unknown; choose from {', '.join(self.TERMS)} or mlm")
        if score_target not in ("probs", "logits"):
            raise ValueError(f"score target must be 'probs' or 'logits', got '{score_target}'")
        self.score_target, self.input_masker = score_target, input_masker
        if input_masker is not None and "mlm" in loss_on:
            raise ValueError("`mask_inputs` does not combine with `loss_on` mlm, which masks its inputs itself")
        if "mlm" in loss_on:
            teacher.require_mlm_head("`loss_on` mlm")
            if len(loss_on) > 1:
                raise ValueError("`loss_on` mlm cannot be combined with output/scores/relations losses")
        if "mlm" not in loss_on:
            self._set_terms({t: w for t, w in (("output", 1.0), ("scores", score_weight),
                                               ("relations", relation_weight)) if t in loss_on}, balance_ratio)
        if "relations" in loss_on:  # set only when used: the metadata of other runs stays as it was
            self.relation_weight = self.term_weights["relations"]
            self.rel_heads = {i: block_relation_heads(teacher.layers[i].block, b, relation_heads)
                              for i, b in blocks.items()}
            self.relation_heads = relation_heads if relation_heads else "auto"
        if "scores" in loss_on and len(loss_on) > 1:  # likewise: a weight only where the scores term is combined
            self.score_weight = self.term_weights["scores"]
        self.layers = sorted(blocks)
        self.loss_on, self.criterion, self.score_criterion = loss_on, criterion, score_criterion
        self.temperature = temperature
        self.views = {i: compose(teacher, blocks={i: b}) for i, b in blocks.items()} if "mlm" in loss_on else {}

    def feature_names(self) -> list[str]:
        return [f"{k}_{i}" for i in self.layers for k in ("in", "block")]

    def unit_losses(self, batch, generator):
        if "mlm" not in self.loss_on:
            return super().unit_losses(batch, generator)
        att = batch["attention_mask"]
        mask = self.teacher.context(att)
        out = {}
        masked, sel, t_logits = self._mlm_targets(batch, generator)
        feats = teacher_features(self.teacher, masked, att, names=[f"in_{i}" for i in self.layers])
        for i in self.layers:
            view = self.views[i]
            h = view.run_layers(feats[f"in_{i}"], mask, start=i)
            s_logits = view.mlm_logits(h[sel])
            out[f"block_{i}"] = (kl_logits(s_logits, t_logits, self.temperature), float(sel.sum()))
        return out

    def combines(self) -> bool:
        return "mlm" not in self.loss_on

    def unit_terms(self, batch, generator):
        att = batch["attention_mask"]
        mask, valid = self.teacher.context(att), att.bool()
        _, feats = self._masked_features(batch, self.feature_names(), generator)
        n_valid = float(valid.sum())
        out = {}
        for i in self.layers:
            student = self.students[f"block_{i}"]
            x = feats[f"in_{i}"]
            need = "scores" in self.loss_on
            s_out, s_trace = student.contribution(x, mask, need_trace=need)
            terms = {}
            if "output" in self.loss_on:
                terms["output"] = hidden_loss(s_out, feats[f"block_{i}"], valid, criterion=self.criterion)
            if need:
                with torch.no_grad():
                    _, t_trace = self.teacher.layers[i].block.contribution(x, mask, need_trace=True)
                if self.score_target == "logits" and self.score_criterion in ("MSE", "L1"):
                    terms["scores"] = raw_score_loss(s_trace.scores, t_trace.scores, valid,
                                                     criterion=self.score_criterion)
                else:  # distributions (CrossEntropy / KL compare softmaxes whichever the target)
                    terms["scores"] = attention_loss(s_trace.scores, t_trace.probs, valid,
                                                     criterion=self.score_criterion)
            if "relations" in self.loss_on:
                with torch.no_grad():
                    t_vec = attention_vectors(self.teacher.layers[i].block, x)
                terms["relations"] = relation_loss(attention_vectors(student, x), t_vec, valid,
                                                   heads=self.rel_heads[i])
            out[f"block_{i}"] = (terms, n_valid)
        return out


def block_relation_heads(teacher_attn: SwappableAttention, student_attn: SwappableAttention, heads: int | None) -> int:
    """Relation heads for a teacher / student block pair: ``heads`` if it divides both inner sizes, else an error;
    None: the default of ``relation_heads_for``."""
    t_inner = teacher_attn.num_heads * teacher_attn.head_dim
    s_inner = student_attn.num_heads * student_attn.head_dim
    if heads is None:
        return relation_heads_for(t_inner, s_inner, teacher_attn.num_heads)
    if t_inner % heads or s_inner % heads:
        raise ValueError(f"`relation_heads` {heads} must divide both the teacher's ({t_inner}) and the student's "
                         f"({s_inner}) heads x head_dim")
    return heads


class MergeDistill(DistillTask):
    """Students are layers ``merge_<i>`` replacing teacher layers i and i+1.

    Input: the hidden state entering layer i, from the teacher, or with ``inputs_from`` (conditioned training) from
    a model whose earlier pairs are already merged. Target: the teacher's hidden state leaving layer i+1.
    """

    def __init__(self, teacher: SwappableModel, layers: dict[int, tuple[SwappableLayer, LayerSpec]], loss_on: str, *,
                 criterion: str = "MSE", masker: MLMMasker | None = None, cache: TeacherCache | None = None,
                 inputs_from: SwappableModel | None = None, temperature: float = 1.0, seed: int = 0,
                 input_masker: OneMasker | None = None):
        super().__init__(teacher, {f"merge_{i}": l for i, (l, _) in layers.items()}, masker=masker, cache=cache,
                         seed=seed)
        if input_masker is not None and loss_on == "mlm":
            raise ValueError("`mask_inputs` does not combine with `loss_on` mlm, which masks its inputs itself")
        self.input_masker = input_masker
        if loss_on == "mlm":
            teacher.require_mlm_head("`loss_on` mlm")
        self.pairs = sorted(layers)
        self.loss_on, self.criterion, self.temperature = loss_on, criterion, temperature
        self._frozen["inputs_from"] = inputs_from
        if inputs_from is not None:
            inputs_from.requires_grad_(False).eval()
        self.views = {i: compose(teacher, merges={i: ls}) for i, ls in layers.items()}

    def _inputs(self, ids, att) -> dict[int, torch.Tensor]:
        src = self._frozen["inputs_from"]
        with torch.no_grad():
            return {i: src.hidden_before(ids, att, src.layer_index_of([i])) for i in self.pairs}

    def unit_losses(self, batch, generator):
        att = batch["attention_mask"]
        mask, valid = self.teacher.context(att), att.bool()
        conditioned = self._frozen["inputs_from"] is not None
        out = {}
        if self.loss_on == "mlm":
            masked, sel, t_logits = self._mlm_targets(batch, generator)
            if conditioned:
                ins = self._inputs(masked, att)
            else:
                feats = teacher_features(self.teacher, masked, att, names=[f"in_{i}" for i in self.pairs])
                ins = {i: feats[f"in_{i}"] for i in self.pairs}
            for i in self.pairs:
                view = self.views[i]
                h = view.run_layers(ins[i], mask, start=view.layer_index_of([i, i + 1]))
                out[f"merge_{i}"] = (kl_logits(view.mlm_logits(h[sel]), t_logits, self.temperature), float(sel.sum()))
            return out
        names = [f"out_{i + 1}" for i in self.pairs] + ([] if conditioned else [f"in_{i}" for i in self.pairs])
        ids, feats = self._masked_features(batch, names, generator)
        ins = self._inputs(ids, att) if conditioned else {i: feats[f"in_{i}"] for i in self.pairs}
        for i in self.pairs:
            h = self.students[f"merge_{i}"](ins[i], mask)
            out[f"merge_{i}"] = (hidden_loss(h, feats[f"out_{i + 1}"], valid, criterion=self.criterion),
                                 float(valid.sum()))
        return out


class ModelDistill(DistillTask):
    """End-to-end distillation of a whole (merged / retrained) model into unit ``model``.

    loss = kl_weight * T^2 KL(teacher || student) at masked positions + mlm_weight * CE(true tokens)
           + hidden_weight * hidden loss at matched layers (a student layer standing for teacher layers [.., j] is
           matched with the teacher's output of layer j; the last layer always is)
           + relation_weight * MiniLMv2 query/key/value self-attention relation KL, averaged over the same matched
           layers (student layer standing for [.., j] vs teacher layer j, each fed its own model's hidden state).
    With ``topk`` (a decoder's ``TopKCache``), training steps read the teacher's top-k next tokens from it and the KL is
    ``topk_kl`` (the teacher does not run; validation still runs it); only the KL and MLM terms can then be on.
    Without an MLM head only the hidden-state (and relation) terms remain. A weight of 0 leaves its term out; a term
    after the first may be BALANCED instead of a number (scaled by ``balance_terms`` to start at ``balance_ratio``
    times the first).
    """

    TERMS = ("kl", "mlm", "hidden", "relations")

    def __init__(self, teacher: SwappableModel, student: SwappableModel, masker: MLMMasker | None, *,
                 kl_weight: float = 1.0, mlm_weight: float | str = 0.0, hidden_weight: float | str = 0.0,
                 hidden_criterion: str = "cosine", temperature: float | None = None, seed: int = 0,
                 relation_weight: float | str = 0.0, relation_heads: int | None = None,
                 balance_ratio: float = BALANCE_RATIO, topk: TopKCache | None = None):
        super().__init__(teacher, {"model": student}, masker=masker, seed=seed)
        self.topk = topk
        self.rel_pairs: list[tuple[int, int, int]] = []  # (student layer, teacher layer, relation heads)
        if _on(check_weight(relation_weight, "relations")):  # set only when used: other runs' metadata stays as it was
            self.relation_heads = relation_heads if relation_heads else "auto"
            for j, spec in enumerate(student.config.layers):
                tj = spec.origin[-1]
                r = block_relation_heads(teacher.layers[tj].block, student.layers[j].block, relation_heads)
                self.rel_pairs.append((j, tj, r))
        self.mlm_ok = teacher.has_mlm_head and student.has_mlm_head
        if not self.mlm_ok:
            if not _on(check_weight(hidden_weight, "hidden")):
                hidden_weight = 1.0
            kl_weight = mlm_weight = 0.0
            log.info("no masked-LM head: fine-tuning on hidden states only (%s, matched layers)", hidden_criterion)
        self._set_terms({"kl": kl_weight, "mlm": mlm_weight, "hidden": hidden_weight, "relations": relation_weight},
                        balance_ratio)
        if not self.term_weights:
            raise ValueError("all loss weights are zero: nothing to train on")
        w = self.term_weights
        self.kl_weight, self.mlm_weight = w.get("kl", 0.0), w.get("mlm", 0.0)
        self.hidden_weight = w.get("hidden", 0.0)
        if self.rel_pairs:
            self.relation_weight = w["relations"]
        self.hidden_criterion, self.temperature = hidden_criterion, kd_temperature(teacher, temperature)
        self.matches = [(j, spec.origin[-1] + 1) for j, spec in enumerate(student.config.layers)]
        if topk is not None:
            self._check_topk(topk)
        # called with each validation batch's outputs when set (a ``CausalComparison``): metrics off the same forwards
        self.watch: Callable[..., None] | None = None

    def _check_topk(self, topk: TopKCache) -> None:
        """A top-k cache serves the KL alone (with the hard-label term beside it), at the task's temperature."""
        check_topk_terms(self.term_weights)
        if topk.temperature != self.temperature:
            raise ValueError(f"the top-k cache is at temperature {topk.temperature:g}, the KD at {self.temperature:g}")
        self.teacher_topk = topk.k

    def unit_terms(self, batch, generator):
        ids, att = batch["input_ids"], batch["attention_mask"]
        student = self.students["model"]
        valid = att.bool()
        if self.mlm_ok:
            ids, labels = self.masker(ids, att, generator)
            sel = labels != -100
        terms = self.term_weights
        need_hidden = "hidden" in terms or bool(self.rel_pairs)
        cached = self.topk is not None and self.training  # the cache holds the training windows only
        t = None
        if not cached:
            with torch.no_grad():
                t = self.teacher(ids, att, output_hidden_states=need_hidden, with_logits=False)
        s = student(ids, att, output_hidden_states=need_hidden, with_logits=False)
        out: dict[str, torch.Tensor] = {}
        weight = float(valid.sum())
        if self.mlm_ok:
            s_logits = student.mlm_logits(s.last_hidden_state[sel])
            watching = self.watch is not None and not self.training
            t_logits = self.teacher.mlm_logits(t.last_hidden_state[sel]) if t is not None and (
                "kl" in terms or watching) else None
            weight = float(sel.sum())
            if "kl" in terms:
                out["kl"] = self._topk_kl(batch, s_logits, sel) if cached else \
                    kl_logits(s_logits, t_logits, self.temperature)
            if "mlm" in terms:
                out["mlm"] = nn.functional.cross_entropy(s_logits.float(), labels[sel])
            if watching:
                self.watch(batch, valid=valid, target=labels[sel], teacher_hidden=t.last_hidden_state,
                           student_hidden=s.last_hidden_state, teacher_logits=t_logits, student_logits=s_logits)
        if "hidden" in terms:
            out["hidden"] = sum(hidden_loss(s.hidden_states[j + 1], t.hidden_states[tj], valid,
                                            criterion=self.hidden_criterion)
                                for j, tj in self.matches) / len(self.matches)
        if self.rel_pairs:
            out["relations"] = self._relations(s, t, valid)
        return {"model": (out, weight)}

    def _topk_kl(self, batch, s_logits: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """The KL of the positions ``sel`` against the teacher's cached top-k of this batch's windows."""
        t_ids, t_logp = self.topk.read(batch["index"], length=sel.shape[1], device=s_logits.device)
        return topk_kl(s_logits, t_ids[sel], t_logp[sel], temperature=self.temperature)

    def _relations(self, s, t, valid: torch.Tensor) -> torch.Tensor:
        """The mean relation loss over the matched layers (student layer j vs teacher layer tj)."""
        student = self.students["model"]
        rl = 0.0
        for j, tj, r in self.rel_pairs:
            with torch.no_grad():
                t_vec = attention_vectors(self.teacher.layers[tj].block, t.hidden_states[tj])
            rl = rl + relation_loss(attention_vectors(student.layers[j].block, s.hidden_states[j]), t_vec,
                                    valid, heads=r)
        return rl / len(self.rel_pairs)


def describe_losses(task: DistillTask, unit: str | None = None) -> dict[str, Any]:
    """What the task optimises, for checkpoint metadata; with ``unit``, also how that unit's balanced terms were
    scaled (``loss_balance``: what was used and from what)."""
    keys = ("loss_on", "criterion", "score_criterion", "score_target", "temperature", "kl_weight", "mlm_weight",
            "hidden_weight", "hidden_criterion", "relation_heads", "relation_weight", "score_weight", "balance_ratio",
            "teacher_topk")
    out = {k: getattr(task, k) for k in keys if hasattr(task, k)}
    if task.input_masker is not None:
        out["mask_inputs"] = True
    if unit is not None and unit in task.balance:
        out["loss_balance"] = task.balance[unit]
    return out


@torch.no_grad()
def balance_terms(task: DistillTask, probe: dict[str, torch.Tensor], *,
                  stored: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Scale every BALANCED term of every unit so that at the start it is ``task.balance_ratio`` times the task's
    first (anchor) term: scale = ratio x anchor weight x anchor(0) / term(0), both measured once on ``probe`` (the
    batch every rank shares) with the units as they are now (their starting weights), the teacher's features
    computed afresh, the model in eval mode and the masks, where the task draws any, from a generator seeded by the
    task's seed, so the scales are the same on every rank and in every rerun.

    ``stored``: unit -> a balance recorded before (``loss_balance`` of a resume point's unit metadata); a unit that
    has one for the same terms and ratio uses it as it is, never a recomputed one (for other settings the units get
    fresh scales, and resuming refuses the changed setup). Returns (and sets as ``task.balance``) unit -> {by, anchor,
    ratio, start (each term's value at the start), scales, probe (what the batch was)}; {} when no term is balanced.
    """
    anchor = task.anchor_term()
    balanced = [t for t, w in task.term_weights.items() if w == BALANCED and t != anchor]
    task.balance = {}
    if not task.balances():
        return {}
    ratio = task.balance_ratio
    stored = {u: b for u, b in (stored or {}).items()
              if set(balanced) <= set(b.get("scales", {})) and b.get("ratio") == ratio}
    fresh = [u for u in task.students if u not in stored]
    values: dict[str, tuple[dict[str, torch.Tensor], float]] = {}
    if fresh:
        was = task.training
        task.eval()
        try:
            batch = {k: v.to(task.device) if torch.is_tensor(v) else v for k, v in probe.items()}
            values = task.unit_terms(batch, torch.Generator().manual_seed(task.seed + 4242))
        finally:
            task.train(was)
        note = {"batch": "the first training batch (shared by every rank)", **_batch_note(probe)}
    w_anchor = ratio * float(task.term_weights[anchor])
    for unit in task.students:
        if unit in stored:
            task.balance[unit] = stored[unit]
            log.info("%s: balanced loss terms as stored: %s", unit, stored[unit]["scales"])
            continue
        start = {t: float(v) for t, v in values[unit][0].items()}
        scales = {}
        for t in balanced:
            a, v = start[anchor], start[t]
            if not (math.isfinite(a) and math.isfinite(v) and a > 0 and v > 0):
                raise SettingError(f"cannot balance the {t} term of {unit} against the {anchor} term: at the start, "
                                   f"on the probe batch, they are {v:.4g} and {a:.4g}; give the {t} term a fixed "
                                   "weight instead")
            scales[t] = w_anchor * a / v
        task.balance[unit] = {"by": "start", "anchor": anchor, "ratio": ratio, "start": start, "scales": scales,
                              "probe": note}
        log.info("%s: balanced loss terms: %s (start values %s)", unit,
                 {t: f"{x:.4g}" for t, x in scales.items()}, {t: f"{x:.4g}" for t, x in start.items()})
    return task.balance


def _batch_note(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a batch was: its size, real tokens, and a hash of its token ids."""
    ids, att = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
    digest = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return {"sequences": int(ids.shape[0]), "tokens": int(att.sum()), "ids_sha256": digest}


class LayerDistill(DistillTask):
    """Students are whole layers ``layer_<i>`` of any shape (a narrower feed-forward, no attention, fewer heads...)
    standing for teacher layer i alone: input the hidden state entering layer i, target the hidden state leaving
    it (read as ``in_<i+1>`` where there is a next layer, so that a cache holds each hidden state once)."""

    def __init__(self, teacher: SwappableModel, layers: dict[int, tuple[SwappableLayer, LayerSpec]], *,
                 criterion: str = "MSE", cache: TeacherCache | None = None, seed: int = 0):
        super().__init__(teacher, {f"layer_{i}": l for i, (l, _) in layers.items()}, cache=cache, seed=seed)
        self.indices = sorted(layers)
        self.loss_on, self.criterion = "hidden", criterion
        self.targets = {i: self.target_of(i, len(teacher.layers)) for i in self.indices}

    @staticmethod
    def target_of(i: int, n_layers: int) -> str:
        """The teacher feature a unit for layer ``i`` is trained to reproduce: the hidden state leaving layer i."""
        return f"in_{i + 1}" if i + 1 < n_layers else f"out_{i}"

    @classmethod
    def features_of(cls, indices: list[int], n_layers: int) -> list[str]:
        """The teacher features units for the layers ``indices`` read (for building the teacher cache)."""
        return sorted({f"in_{i}" for i in indices} | {cls.target_of(i, n_layers) for i in indices})

    def feature_names(self) -> list[str]:
        return self.features_of(self.indices, len(self.teacher.layers))

    def unit_losses(self, batch, generator):
        att = batch["attention_mask"]
        mask, valid = self.teacher.context(att), att.bool()
        feats = self._features(batch, self.feature_names())
        return {f"layer_{i}": (hidden_loss(self.students[f"layer_{i}"](feats[f"in_{i}"], mask),
                                           feats[self.targets[i]], valid, criterion=self.criterion),
                               float(valid.sum()))
                for i in self.indices}
