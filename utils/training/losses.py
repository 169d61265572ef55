"""Distillation losses. Every loss averages over real tokens only (``valid`` = attention mask as bool [B, T])."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

# ---- the criterion registry: name -> function, by what is compared ----
# "hidden": [B, T, D] block outputs / hidden states -> scalar (most are per-token means over real tokens);
# "probs": attention distributions -> per (head, query) row; "logits": raw pre-softmax scores -> per (query, key) pair.
HIDDEN: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {}
PROBS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {}
LOGITS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
REGISTRY = {"hidden": HIDDEN, "probs": PROBS, "logits": LOGITS}
# every spelling a user may type (the seed's included), case, dashes and underscores ignored
_ALIASES = {"mse": "MSE", "l1": "L1", "cosine": "cosine", "cos": "cosine", "cosinesimilarity": "cosine",
            "crossentropy": "CrossEntropy", "ce": "CrossEntropy", "kl": "KL", "arrmse": "aRRMSE"}


def criterion(target: str, name: str):
    """Decorator: register ``fn`` as criterion ``name`` for ``target`` (hidden | probs | logits)."""
    def register(fn):
        REGISTRY[target][name] = fn
        return fn
    return register


def criteria_for(*targets: str) -> tuple[str, ...]:
    """Names of the criteria that apply to every one of ``targets`` (the choices of a flag, error messages)."""
    return tuple(n for n in REGISTRY[targets[0]] if all(n in REGISTRY[t] for t in targets))


def normalize_criterion(name: str) -> str:
    """Accept the seed's spellings in any case: mse, l1, cosine/cos/CosineSimilarity, crossentropy/ce, kl, aRRMSE."""
    key = name.replace("-", "").replace("_", "").lower()
    if key not in _ALIASES:
        known = sorted({n for table in REGISTRY.values() for n in table})
        raise ValueError(f"unknown criterion '{name}'; choose from {', '.join(known)}")
    return _ALIASES[key]


def arrmse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Average relative RMSE over the D output features of [B, T, D] tensors, the real tokens being the samples:

        aRRMSE = 1/D * sum_j sqrt( sum_i (s_ij - t_ij)^2 / sum_i (t_ij - mean_i t_ij)^2 )

    i.e. each feature's RMSE relative to the RMSE of always predicting that feature's mean (< 1: better than the
    mean). Computed over the tokens of the batch, so it is a batch statistic, not a per-token mean. A feature that is
    (nearly) constant over the batch is divided by a floor of 1e-6 x the mean spread instead of by ~0.
    """
    s, t = student.float()[valid], teacher.float()[valid]  # [N, D]
    err = (s - t).pow(2).sum(0)
    spread = (t - t.mean(0, keepdim=True)).pow(2).sum(0)
    spread = spread.clamp_min(1e-6 * float(spread.mean()) + 1e-12)
    return ((err + 1e-12) / spread).sqrt().mean()


def raw_score_loss(s_scores: torch.Tensor, t_scores: torch.Tensor, valid: torch.Tensor, *, criterion: str
                   ) -> torch.Tensor:
    """MSE or L1 between raw attention scores QK^T/sqrt(d_k) [B, H, T, T] (pre-softmax, the seed's loss target).

    The mean is over real (query, key) pairs and heads: pairs with a padded query or key are left out (their scores
    hold the mask's fill value). With different head counts both sides are averaged over heads first.
    """
    s, t = s_scores.float(), t_scores.float()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    pair = (valid[:, :, None] & valid[:, None, :])[:, None].expand_as(s)  # [B, H, T, T]
    diff = torch.where(pair, s - t, torch.zeros((), dtype=s.dtype, device=s.device))
    if criterion not in LOGITS:
        raise ValueError(f"criterion '{criterion}' does not apply to raw attention scores; choose "
                         f"{' or '.join(LOGITS)} (or use CrossEntropy / KL, which compare the softmax distributions)")
    return LOGITS[criterion](diff).sum() / pair.sum().clamp_min(1)


def _masked_mean(per_token: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    w = valid.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1)


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, *, criterion: str) -> torch.Tensor:
    """Loss between [B, T, D] outputs at valid tokens.

    CrossEntropy follows the seed's idea of a soft-target cross-entropy between the two outputs, taken over the
    feature dimension: softmax(teacher) as the target distribution, log_softmax(student) as the prediction. (The seed
    passed [B, T, D] tensors to nn.CrossEntropyLoss, which normalises over dim 1, the sequence; we use features.)
    """
    if criterion not in HIDDEN:
        raise ValueError(f"criterion '{criterion}' is not one of {', '.join(HIDDEN)}")
    return HIDDEN[criterion](student.float(), teacher.float(), valid)


@criterion("hidden", "MSE")
def _hidden_mse(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return _masked_mean((s - t).pow(2).mean(-1), valid)


@criterion("hidden", "L1")
def _hidden_l1(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return _masked_mean((s - t).abs().mean(-1), valid)


@criterion("hidden", "cosine")
def _hidden_cosine(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return _masked_mean(1 - F.cosine_similarity(s, t, dim=-1, eps=1e-6), valid)


@criterion("hidden", "CrossEntropy")
def _hidden_ce(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return _masked_mean(-(t.softmax(-1) * s.log_softmax(-1)).sum(-1), valid)


criterion("hidden", "aRRMSE")(arrmse)


def attention_loss(s_scores: torch.Tensor, t_probs: torch.Tensor, valid: torch.Tensor, *, criterion: str
                   ) -> torch.Tensor:
    """Loss between attention distributions; student given as pre-softmax scores [B, Hs, T, T], teacher as probs.

    With equal head counts, heads are compared one to one. With different head counts there is no head-to-head
    correspondence, so both sides are averaged over heads first (a mixture of the heads' distributions, which is
    what the layer's value-mixing amounts to on average) and those are compared. Query rows of padding are ignored;
    padded keys carry zero probability on both sides.
    """
    s_scores, t_probs = s_scores.float(), t_probs.float()
    if s_scores.shape[1] == t_probs.shape[1]:
        s_logp = s_scores.log_softmax(-1)
        t_p = t_probs
    else:
        s_logp = s_scores.softmax(-1).mean(1, keepdim=True).clamp_min(1e-12).log()
        t_p = t_probs.mean(1, keepdim=True)
    if criterion not in PROBS:
        raise ValueError(f"criterion '{criterion}' is not one of {', '.join(PROBS)}")
    per = PROBS[criterion](t_p, s_logp).mean(1)  # over heads -> [B, T]
    return _masked_mean(per, valid)


@criterion("probs", "CrossEntropy")
def _probs_ce(t_p: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    return -(t_p * s_logp).sum(-1)


@criterion("probs", "KL")
def _probs_kl(t_p: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    return (t_p * (t_p.clamp_min(1e-12).log() - s_logp)).sum(-1)


@criterion("probs", "MSE")
def _probs_mse(t_p: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    return (t_p - s_logp.exp()).pow(2).sum(-1)


@criterion("probs", "L1")
def _probs_l1(t_p: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    return (t_p - s_logp.exp()).abs().sum(-1)


criterion("logits", "MSE")(lambda diff: diff.pow(2))
criterion("logits", "L1")(lambda diff: diff.abs())


def kl_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean KL(teacher || student) over rows of [N, V] logits, scaled by T^2 (Hinton et al.)."""
    t = temperature
    s_logp = (student_logits.float() / t).log_softmax(-1)
    t_logp = (teacher_logits.float() / t).log_softmax(-1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * (t * t)


def topk_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor, *,
            temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on the teacher's top k tokens and one bucket for all the others, scaled by T^2: the KD
    loss of a heal that reads the teacher's top-k cache (``storage.logits``) instead of running the teacher.

    Rows are positions: ``student_logits`` [N, V], ``teacher_ids`` [N, k] (the teacher's top-k tokens K),
    ``teacher_logp`` [N, k + 1] (their log-probabilities log q_i at temperature T, then log q_R, the log of the
    teacher's mass outside K). With p = softmax(student_logits / T) and p_R = sum of p_i over i not in K:

        loss = T^2 / N * sum_rows [ sum_{i in K} q_i (log q_i - log p_i) + q_R (log q_R - log p_R) ]

    the KL between the two distributions coarsened to k + 1 outcomes (at most the full KL, never negative); at
    k = V there is no tail and it is the full KD loss (``kl_logits``). log p_R is a log-sum-exp over the student's
    log-probabilities outside K (exact however small the tail is).
    """
    t = temperature
    s_logp = (student_logits.float() / t).log_softmax(-1)
    k, ids = teacher_ids.shape[-1], teacher_ids.long()
    t_top = teacher_logp[..., :k].float()
    per = (t_top.exp() * (t_top - s_logp.gather(-1, ids))).sum(-1)
    if k < s_logp.shape[-1]:
        t_tail = teacher_logp[..., k].float()
        s_tail = s_logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
        per = per + t_tail.exp() * (t_tail - s_tail)
    return per.sum() / max(per.shape[0], 1) * (t * t)


RELATIONS = ("query", "key", "value")


def relation_heads_for(teacher_inner: int, student_inner: int, teacher_heads: int) -> int:
    """Default number of relation heads: the largest divisor of both inner sizes (heads x head_dim) that is at most
    the teacher's head count (MiniLMv2 uses the teacher's head count when the sizes allow it)."""
    g = math.gcd(teacher_inner, student_inner)
    return max(r for r in range(1, min(g, teacher_heads) + 1) if g % r == 0)


def self_relations(vectors: torch.Tensor, heads: int, valid: torch.Tensor) -> torch.Tensor:
    """Log-softmax self-attention relations of [B, T, D] vectors split into ``heads`` relation heads of D / heads
    dims: log softmax(V_r V_r^T / sqrt(D / heads)) over keys, padded keys excluded. Returns [B, heads, T, T]."""
    B, T, D = vectors.shape
    if D % heads:
        raise ValueError(f"{heads} relation heads do not divide the vector size {D}; choose a divisor of {D}")
    d = D // heads
    v = vectors.float().view(B, T, heads, d).transpose(1, 2)  # [B, R, T, d]
    scores = (v @ v.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


def relation_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], valid: torch.Tensor, *,
                  heads: int) -> torch.Tensor:
    """MiniLMv2 self-attention relation distillation, summed over the relation types present in both dicts.

    ``student`` / ``teacher`` map a relation type (query, key, value) to that layer's projected vectors [B, T, D_s]
    / [B, T, D_t] (all heads concatenated, before splitting into attention heads). Both sides are re-split into the
    same number ``heads`` of relation heads, so the student may have any number of attention heads and any head_dim:
    only D_s and D_t must be divisible by ``heads``. Per relation type: KL(teacher || student) of each query row's
    relation distribution over the keys, averaged over relation heads and real query tokens (padding rows ignored,
    padded keys excluded on both sides).
    """
    kinds = [k for k in RELATIONS if k in student and k in teacher]
    if not kinds:
        raise ValueError(f"no relation type in common: student has {sorted(student)}, teacher has {sorted(teacher)}")
    total = None
    for k in kinds:
        s_logp = self_relations(student[k], heads, valid)
        t_logp = self_relations(teacher[k], heads, valid)
        keys = valid[:, None, None, :]
        per = torch.where(keys, t_logp.exp() * (t_logp - s_logp), torch.zeros_like(t_logp)).sum(-1)  # [B, R, T]
        term = _masked_mean(per.mean(1), valid)
        total = term if total is None else total + term
    return total


def attention_vectors(attention, x: torch.Tensor, kinds: tuple[str, ...] = RELATIONS) -> dict[str, torch.Tensor]:
    """The query / key / value projections [B, T, heads * head_dim] of an attention block on input ``x``.

    Grouped-query attention's keys and values are repeated for each query head that reads them, as the attention
    does, so every kind has heads x head_dim features and a block with fewer key/value heads than its teacher still
    splits into the same relation heads (each teacher key/value head's relations then count once per query head).
    """
    h = attention.projection_input(x)
    group = attention.num_heads // getattr(attention, "num_kv_heads", attention.num_heads)
    out = {}
    for k in kinds:
        v = getattr(attention, f"{k[0]}_proj")(h)
        if k != "query" and group > 1:
            B, T, _ = v.shape
            v = v.view(B, T, -1, 1, attention.head_dim).expand(-1, -1, -1, group, -1).reshape(B, T, -1)
        out[k] = v
    return out
