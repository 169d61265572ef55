"""Distillation tasks for the shared training loop: retrained attention blocks, merged layer pairs, whole models.

Each task is an ``nn.Module`` holding only the students (the frozen teacher is kept outside the module tree, so
``.train()`` never turns its dropout on and DDP never syncs it). ``forward(batch)`` returns (total loss, logs);
``evaluate(loader)`` returns exact token-weighted validation means per unit, reduced over ranks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.base import SwappableAttention
from models.bert import BertAttention, BertForMaskedLM, BertLayer
from models.compress import compose
from models.config import LayerSpec
from .. import runtime
from ..data.masking import MLMMasker, OneMasker
from ..storage.features import TeacherCache, teacher_features
from .losses import (attention_loss, attention_vectors, hidden_loss, kl_logits, raw_score_loss, relation_heads_for,
                     relation_loss)

log = logging.getLogger(__name__)


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
    relation_weight: float = 1.0
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
    mlm_weight: float = 0.0  # hard-label masked-LM cross-entropy
    hidden_weight: float = 0.0  # hidden-state loss at matched layers
    hidden_criterion: str = "cosine"
    temperature: float = 2.0
    relation_weight: float = 0.0  # MiniLMv2 relations at matched layers
    relation_heads: int | None = None


class DistillTask(nn.Module):
    """Shared machinery: students in a ModuleDict, the frozen teacher beside it, loss bookkeeping."""

    def __init__(self, teacher: BertForMaskedLM, students: dict[str, nn.Module], *, masker: MLMMasker | None = None,
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

    @property
    def teacher(self) -> BertForMaskedLM:
        return self._frozen["teacher"]

    def unit_losses(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None
                    ) -> dict[str, tuple[torch.Tensor, float]]:
        raise NotImplementedError

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
        names = list(self.students)
        sums = torch.zeros(2 * len(names), dtype=torch.float64)
        for bi, batch in enumerate(loader):
            if max_batches is not None and bi >= max_batches:
                break
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            for j, (name, (loss, weight)) in enumerate(self.unit_losses(batch, g).items()):
                sums[2 * j] += float(loss) * weight
                sums[2 * j + 1] += weight
        sums = runtime.all_reduce_sum(sums.to(self.device)).cpu()
        self.train(was)
        return {f"{n}/loss": (sums[2 * j] / sums[2 * j + 1].clamp_min(1e-12)).item() for j, n in enumerate(names)}

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
    ``relations`` (MiniLMv2 query-query / key-key / value-value relations in ``relation_heads`` relation heads,
    times ``relation_weight``; any student head count), or ``mlm`` (KL to the teacher's masked-token distribution
    through the frozen rest of the teacher).
    """

    def __init__(self, teacher: BertForMaskedLM, blocks: dict[int, BertAttention], loss_on: list[str], *,
                 criterion: str = "MSE", score_criterion: str = "CrossEntropy", masker: MLMMasker | None = None,
                 cache: TeacherCache | None = None, temperature: float = 1.0, seed: int = 0,
                 score_target: str = "probs", input_masker: OneMasker | None = None,
                 relation_heads: int | None = None, relation_weight: float = 1.0):
        super().__init__(teacher, {f"block_{i}": b for i, b in blocks.items()}, masker=masker, cache=cache, seed=seed)
        if score_target not in ("probs", "logits"):
            raise ValueError(f"score target must be 'probs' or 'logits', got '{score_target}'")
        self.score_target, self.input_masker = score_target, input_masker
        if input_masker is not None and "mlm" in loss_on:
            raise ValueError("`mask_inputs` does not combine with `loss_on` mlm, which masks its inputs itself")
        if "mlm" in loss_on:
            teacher.require_mlm_head("`loss_on` mlm")
            if len(loss_on) > 1:
                raise ValueError("`loss_on` mlm cannot be combined with output/scores/relations losses")
        if "relations" in loss_on:  # set only when used: the metadata of other runs stays as it was
            self.relation_weight = relation_weight
            self.rel_heads = {i: block_relation_heads(teacher.layers[i].block, b, relation_heads)
                              for i, b in blocks.items()}
            self.relation_heads = relation_heads if relation_heads else "auto"
        self.layers = sorted(blocks)
        self.loss_on, self.criterion, self.score_criterion = loss_on, criterion, score_criterion
        self.temperature = temperature
        self.views = {i: compose(teacher, blocks={i: b}) for i, b in blocks.items()} if "mlm" in loss_on else {}

    def feature_names(self) -> list[str]:
        return [f"{k}_{i}" for i in self.layers for k in ("in", "block")]

    def unit_losses(self, batch, generator):
        att = batch["attention_mask"]
        mask, valid = self.teacher.context(att), att.bool()
        out = {}
        if "mlm" in self.loss_on:
            masked, sel, t_logits = self._mlm_targets(batch, generator)
            feats = teacher_features(self.teacher, masked, att, names=[f"in_{i}" for i in self.layers])
            for i in self.layers:
                view = self.views[i]
                h = view.run_layers(feats[f"in_{i}"], mask, start=i)
                s_logits = view.mlm_logits(h[sel])
                out[f"block_{i}"] = (kl_logits(s_logits, t_logits, self.temperature), float(sel.sum()))
            return out
        _, feats = self._masked_features(batch, self.feature_names(), generator)
        n_valid = float(valid.sum())
        for i in self.layers:
            student = self.students[f"block_{i}"]
            x = feats[f"in_{i}"]
            need = "scores" in self.loss_on
            s_out, s_trace = student.contribution(x, mask, need_trace=need)
            loss = s_out.new_zeros(())
            if "output" in self.loss_on:
                loss = loss + hidden_loss(s_out, feats[f"block_{i}"], valid, criterion=self.criterion)
            if need:
                with torch.no_grad():
                    _, t_trace = self.teacher.layers[i].block.contribution(x, mask, need_trace=True)
                if self.score_target == "logits" and self.score_criterion in ("MSE", "L1"):
                    loss = loss + raw_score_loss(s_trace.scores, t_trace.scores, valid, criterion=self.score_criterion)
                else:  # distributions (CrossEntropy / KL compare softmaxes whichever the target)
                    loss = loss + attention_loss(s_trace.scores, t_trace.probs, valid, criterion=self.score_criterion)
            if "relations" in self.loss_on:
                with torch.no_grad():
                    t_vec = attention_vectors(self.teacher.layers[i].block, x)
                loss = loss + self.relation_weight * relation_loss(attention_vectors(student, x), t_vec, valid,
                                                                   heads=self.rel_heads[i])
            out[f"block_{i}"] = (loss, n_valid)
        return out


def block_relation_heads(teacher_attn: BertAttention, student_attn: BertAttention, heads: int | None) -> int:
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

    def __init__(self, teacher: BertForMaskedLM, layers: dict[int, tuple[BertLayer, LayerSpec]], loss_on: str, *,
                 criterion: str = "MSE", masker: MLMMasker | None = None, cache: TeacherCache | None = None,
                 inputs_from: BertForMaskedLM | None = None, temperature: float = 1.0, seed: int = 0,
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
    Without an MLM head only the hidden-state (and relation) terms remain.
    """

    def __init__(self, teacher: BertForMaskedLM, student: BertForMaskedLM, masker: MLMMasker | None, *,
                 kl_weight: float = 1.0, mlm_weight: float = 0.0, hidden_weight: float = 0.0,
                 hidden_criterion: str = "cosine", temperature: float = 2.0, seed: int = 0,
                 relation_weight: float = 0.0, relation_heads: int | None = None):
        super().__init__(teacher, {"model": student}, masker=masker, seed=seed)
        self.rel_pairs: list[tuple[int, int, int]] = []  # (student layer, teacher layer, relation heads)
        if relation_weight > 0:  # set only when used: the metadata of other runs stays as it was
            self.relation_weight = relation_weight
            self.relation_heads = relation_heads if relation_heads else "auto"
            for j, spec in enumerate(student.config.layers):
                tj = spec.origin[-1]
                r = block_relation_heads(teacher.layers[tj].block, student.layers[j].block, relation_heads)
                self.rel_pairs.append((j, tj, r))
        self.mlm_ok = teacher.has_mlm_head and student.has_mlm_head
        if not self.mlm_ok:
            if hidden_weight <= 0:
                hidden_weight = 1.0
            kl_weight = mlm_weight = 0.0
            log.info("no masked-LM head: fine-tuning on hidden states only (%s, matched layers)", hidden_criterion)
        if kl_weight <= 0 and mlm_weight <= 0 and hidden_weight <= 0 and relation_weight <= 0:
            raise ValueError("all loss weights are zero: nothing to train on")
        self.kl_weight, self.mlm_weight, self.hidden_weight = kl_weight, mlm_weight, hidden_weight
        self.hidden_criterion, self.temperature = hidden_criterion, temperature
        self.matches = [(j, spec.origin[-1] + 1) for j, spec in enumerate(student.config.layers)]

    def unit_losses(self, batch, generator):
        ids, att = batch["input_ids"], batch["attention_mask"]
        student = self.students["model"]
        valid = att.bool()
        if self.mlm_ok:
            ids, labels = self.masker(ids, att, generator)
            sel = labels != -100
        need_hidden = self.hidden_weight > 0 or bool(self.rel_pairs)
        with torch.no_grad():
            t = self.teacher(ids, att, output_hidden_states=need_hidden, with_logits=False)
        s = student(ids, att, output_hidden_states=need_hidden, with_logits=False)
        loss = s.last_hidden_state.new_zeros(())
        weight = float(valid.sum())
        if self.mlm_ok:
            s_logits = student.mlm_logits(s.last_hidden_state[sel])
            weight = float(sel.sum())
            if self.kl_weight > 0:
                t_logits = self.teacher.mlm_logits(t.last_hidden_state[sel])
                loss = loss + self.kl_weight * kl_logits(s_logits, t_logits, self.temperature)
            if self.mlm_weight > 0:
                loss = loss + self.mlm_weight * nn.functional.cross_entropy(s_logits.float(), labels[sel])
        if self.hidden_weight > 0:
            hl = sum(hidden_loss(s.hidden_states[j + 1], t.hidden_states[tj], valid, criterion=self.hidden_criterion)
                     for j, tj in self.matches) / len(self.matches)
            loss = loss + self.hidden_weight * hl
        if self.rel_pairs:
            rl = 0.0
            for j, tj, r in self.rel_pairs:
                with torch.no_grad():
                    t_vec = attention_vectors(self.teacher.layers[tj].block, t.hidden_states[tj])
                rl = rl + relation_loss(attention_vectors(student.layers[j].block, s.hidden_states[j]), t_vec,
                                        valid, heads=r)
            loss = loss + self.relation_weight * rl / len(self.rel_pairs)
        return {"model": (loss, weight)}


def describe_losses(task: DistillTask) -> dict[str, Any]:
    """What the task optimises, for checkpoint metadata."""
    keys = ("loss_on", "criterion", "score_criterion", "score_target", "temperature", "kl_weight", "mlm_weight",
            "hidden_weight", "hidden_criterion", "relation_heads", "relation_weight")
    out = {k: getattr(task, k) for k in keys if hasattr(task, k)}
    if task.input_masker is not None:
        out["mask_inputs"] = True
    return out


class LayerDistill(DistillTask):
    """Students are whole layers ``layer_<i>`` of any shape (a narrower feed-forward, no attention, fewer heads...)
    standing for teacher layer i alone: input the hidden state entering layer i, target the hidden state leaving
    it (read as ``in_<i+1>`` where there is a next layer, so that a cache holds each hidden state once)."""

    def __init__(self, teacher: BertForMaskedLM, layers: dict[int, tuple[BertLayer, LayerSpec]], *,
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
