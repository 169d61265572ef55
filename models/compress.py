"""Initialising smaller blocks and merged layers from the teacher.

- Heads are ranked by importance: the mean norm of each head's contribution to the block output on real inputs
  (or, without data, the product of its value and output weight norms). The top ``k`` heads are kept in their order.
- A smaller per-head dimension is reached by the best low-rank approximation (truncated SVD) of each kept head's
  bilinear maps: W_q^T W_k for the attention scores (rescaled for the new 1/sqrt(d)) and W_o W_v for the values,
  biases folded in as an extra input column. With head_dim equal to the teacher's this reduces to copying the head.
- Shapes larger than the teacher's cannot be taken from it: those blocks start random, and the returned note says so.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .bert import BertAttention, BertForMaskedLM, BertLayer
from .config import LayerSpec, ModelConfig


@torch.no_grad()
def head_importance(attn: BertAttention, inputs: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] | None
                    = None) -> torch.Tensor:
    """Importance per head [H]. ``inputs``: (hidden [B,T,D], extended mask or None, valid [B,T]) triples."""
    H, d = attn.num_heads, attn.head_dim
    W_o = attn.output.dense.weight.view(-1, H, d)  # [D, H, d]
    if not inputs:
        W_v = attn.self.value.weight.view(H, d, -1)
        return W_v.flatten(1).norm(dim=1) * W_o.permute(1, 0, 2).flatten(1).norm(dim=1)
    total = torch.zeros(H, device=W_o.device)
    count = 0.0
    for x, mask, valid in inputs:
        ctx, _ = attn.self(x, mask)
        B, T, _ = ctx.shape
        contrib = torch.einsum("bthd,ohd->btho", ctx.view(B, T, H, d), W_o).norm(dim=-1)  # [B, T, H]
        w = valid.to(contrib.dtype)[..., None]
        total += (contrib * w).sum((0, 1))
        count += float(w.sum())
    return total / max(count, 1.0)


def _low_rank_pair(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorisation of a @ b.T (a: [m, k], b: [n, k]) as (x: [m, rank], y: [n, rank])."""
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    root = s[:rank].sqrt()
    return qa @ (u[:, :rank] * root), qb @ (vh[:rank].T * root)


@torch.no_grad()
def random_attention(teacher: BertAttention, cfg: ModelConfig, num_heads: int, head_dim: int,
                     **shape) -> BertAttention:
    """A randomly initialised block (``shape``: further attention fields) that keeps the teacher's LayerNorm."""
    new = BertAttention(cfg, num_heads, head_dim, **shape).to(teacher.output.dense.weight.device)
    new.apply(BertForMaskedLM._init_weights)
    new.output.LayerNorm.load_state_dict(teacher.output.LayerNorm.state_dict())
    return new


@torch.no_grad()
def compress_attention(teacher: BertAttention, cfg: ModelConfig, num_heads: int, head_dim: int,
                       importance: torch.Tensor | None = None) -> tuple[BertAttention, str]:
    """A ``num_heads`` x ``head_dim`` block initialised from ``teacher``. Returns (block, note on how)."""
    new = random_attention(teacher, cfg, num_heads, head_dim)
    Ht, dt = teacher.num_heads, teacher.head_dim
    if num_heads > Ht or head_dim > dt:
        return new, (f"random (the {num_heads}x{head_dim} block is larger than the teacher's {Ht}x{dt} in heads or "
                     "head_dim)")
    score = importance if importance is not None else head_importance(teacher)
    keep = sorted(torch.topk(score, num_heads).indices.tolist())
    D = cfg.hidden_size
    s, t = new.self, teacher.self

    def aug(lin: nn.Linear, h: int) -> torch.Tensor:  # [dt, D+1]: the head's rows with the bias as last column
        rows = slice(h * dt, (h + 1) * dt)
        return torch.cat([lin.weight[rows], lin.bias[rows, None]], dim=1)

    W_o_t = teacher.output.dense.weight
    for j, h in enumerate(keep):
        out = slice(j * head_dim, (j + 1) * head_dim)
        q, k, v = aug(t.query, h), aug(t.key, h), aug(t.value, h)
        o = W_o_t[:, h * dt:(h + 1) * dt]  # [D, dt]
        if head_dim == dt:
            nq, nk, nv, no = q, k, v, o
        else:
            # scores: x~ q^T k x~^T / sqrt(dt)  ->  x~ nq^T nk x~^T / sqrt(d) with nq^T nk ~ q^T k * sqrt(d / dt)
            xq, xk = _low_rank_pair(q.T, k.T, head_dim)
            c = (head_dim / dt) ** 0.25
            nq, nk = (xq * c).T, (xk * c).T
            xo, xv = _low_rank_pair(o, v.T, head_dim)  # o @ v ~ xo @ xv.T
            no, nv = xo, xv.T
        for lin, m in ((s.query, nq), (s.key, nk), (s.value, nv)):
            lin.weight[out] = m[:, :D]
            lin.bias[out] = m[:, D]
        new.output.dense.weight[:, out] = no
    new.output.dense.bias.copy_(teacher.output.dense.bias)
    how = "copied" if head_dim == dt else f"SVD rank-{head_dim} projection of"
    return new, f"teacher: kept heads {keep} of {Ht} by importance, {how} each head"


def _init_mha(teacher: BertAttention, cfg: ModelConfig, spec: LayerSpec, importance: torch.Tensor | None
              ) -> tuple[BertAttention, str]:
    return compress_attention(teacher, cfg, spec.num_heads, spec.head_dim, importance)


@torch.no_grad()
def compress_gqa(teacher: BertAttention, cfg: ModelConfig, spec: LayerSpec, importance: torch.Tensor | None = None
                 ) -> tuple[BertAttention, str]:
    """A grouped-query block from a multi-head teacher block.

    The ``num_heads`` most important teacher heads are kept in their order and cut into ``num_kv_heads`` groups of
    consecutive heads; a group's key and value projections are the mean of its heads' (mean pooling, as in GQA
    uptraining), its queries and output columns are the heads' own. A smaller head_dim keeps the top ``head_dim``
    directions of each group's pooled key / value map (SVD), applied to the queries / output columns as well.
    """
    H, d, G = spec.num_heads, spec.head_dim, spec.num_kv_heads
    new = random_attention(teacher, cfg, **spec.attention_shape())
    Ht, dt = teacher.num_heads, teacher.head_dim
    if H > Ht or d > dt:
        return new, f"random (the {H}x{d} block is larger than the teacher's {Ht}x{dt} in heads or head_dim)"
    score = importance if importance is not None else head_importance(teacher)
    keep = sorted(torch.topk(score, H).indices.tolist())
    D, group = cfg.hidden_size, H // G
    s, t, W_o = new.self, teacher.self, teacher.output.dense.weight

    def aug(lin: nn.Linear, h: int) -> torch.Tensor:  # [dt, D+1]: the head's rows with the bias as last column
        rows = slice(h * dt, (h + 1) * dt)
        return torch.cat([lin.weight[rows], lin.bias[rows, None]], dim=1)

    def basis(m: torch.Tensor) -> torch.Tensor:  # [d, dt]: the top-d output directions of m [dt, D+1]
        return torch.eye(dt, dtype=m.dtype, device=m.device) if d == dt else torch.linalg.svd(m)[0][:, :d].T

    def put(lin: nn.Linear, rows: slice, m: torch.Tensor) -> None:
        lin.weight[rows], lin.bias[rows] = m[:, :D], m[:, D]

    for g in range(G):
        members = keep[g * group:(g + 1) * group]
        k = torch.stack([aug(t.key, h) for h in members]).mean(0)
        v = torch.stack([aug(t.value, h) for h in members]).mean(0)
        pk, pv = basis(k), basis(v)
        put(s.key, slice(g * d, (g + 1) * d), pk @ k)
        put(s.value, slice(g * d, (g + 1) * d), pv @ v)
        for j, h in enumerate(members):
            out = slice((g * group + j) * d, (g * group + j + 1) * d)
            put(s.query, out, (pk @ aug(t.query, h)) * (d / dt) ** 0.5)  # scores keep their scale under 1/sqrt(d)
            new.output.dense.weight[:, out] = W_o[:, h * dt:(h + 1) * dt] @ pv.T
    new.output.dense.bias.copy_(teacher.output.dense.bias)
    how = "" if d == dt else f", top-{d} SVD directions of each group's keys/values"
    return new, (f"teacher: kept heads {keep} of {Ht} by importance; {G} key/value heads, each the mean of its "
                 f"group of {group} heads{how}")


# teacher initialiser per ``LayerSpec.attention``: (teacher block, config, spec, head importance) -> (block, note)
INITIALISERS: dict[str, Callable[..., tuple[BertAttention, str]]] = {"mha": _init_mha, "gqa": compress_gqa}


@torch.no_grad()
def init_attention(teacher: BertAttention, cfg: ModelConfig, spec: LayerSpec, init: str = "teacher",
                   importance: torch.Tensor | None = None) -> tuple[BertAttention, str]:
    """A block of ``spec``'s attention shape: from ``teacher`` (its initialiser for that kind) or random."""
    if init == "random":
        return random_attention(teacher, cfg, **spec.attention_shape()), "random"
    if init != "teacher":
        raise ValueError(f"a block starts from 'teacher' or 'random', got '{init}'")
    if spec.attention not in INITIALISERS:
        raise ValueError(f"no teacher initialiser for attention kind '{spec.attention}'; known: "
                         f"{', '.join(INITIALISERS)}")
    return INITIALISERS[spec.attention](teacher, cfg, spec, importance)


@torch.no_grad()
def init_merged_layer(cfg: ModelConfig, spec: LayerSpec, first: BertLayer, second: BertLayer, mode: str,
                      importance: torch.Tensor | None = None) -> tuple[BertLayer, str]:
    """One layer standing for ``first`` + ``second``: from first, second, their average, or random."""
    if mode not in ("first", "second", "average", "random"):
        raise ValueError(f"--init for a merged layer must be first, second, average or random, got '{mode}'")
    layer = BertLayer(cfg, spec).to(first.output.dense.weight.device)
    layer.apply(BertForMaskedLM._init_weights)
    if mode == "random":
        return layer, "random"
    if mode == "average":
        src = copy.deepcopy(first)
        sd2 = second.state_dict()
        src.load_state_dict({k: (v + sd2[k]) / 2 for k, v in first.state_dict().items()})
    else:
        src = first if mode == "first" else second
    layer.attention, note = init_attention(src.attention, cfg, spec, "teacher",
                                           importance if mode != "average" else None)
    layer.output.LayerNorm.load_state_dict(src.output.LayerNorm.state_dict())
    f_t = src.intermediate.dense.out_features
    if spec.intermediate_size <= f_t:
        score = src.intermediate.dense.weight.norm(dim=1) * src.output.dense.weight.norm(dim=0)
        keep = sorted(torch.topk(score, spec.intermediate_size).indices.tolist())
        layer.intermediate.dense.weight.copy_(src.intermediate.dense.weight[keep])
        layer.intermediate.dense.bias.copy_(src.intermediate.dense.bias[keep])
        layer.output.dense.weight.copy_(src.output.dense.weight[:, keep])
        layer.output.dense.bias.copy_(src.output.dense.bias)
        ffn_note = "ffn copied" if spec.intermediate_size == f_t else f"ffn: top {spec.intermediate_size} of {f_t} neurons"
    else:
        ffn_note = f"ffn random ({spec.intermediate_size} > teacher's {f_t})"
    return layer, f"{mode} layer; attention {note}; {ffn_note}"


def clone_model(model: BertForMaskedLM) -> BertForMaskedLM:
    """An independent copy (weights and per-layer plan)."""
    return copy.deepcopy(model)


def compose(teacher: BertForMaskedLM, blocks: dict[int, BertAttention] | None = None,
            merges: dict[int, tuple[BertLayer, LayerSpec]] | None = None) -> BertForMaskedLM:
    """A model that shares every module of ``teacher`` except the replaced ones: no weights are copied.

    ``blocks`` maps a teacher layer index to a new attention block; ``merges`` maps the first index of a teacher pair
    (i, i+1) to the layer replacing both. Indices are the teacher's, whatever was merged before them.
    """
    view = copy.copy(teacher)
    view._modules = dict(teacher._modules)
    view.config = copy.deepcopy(teacher.config)
    view.bert = copy.copy(teacher.bert)
    view.bert._modules = dict(teacher.bert._modules)
    view.bert.encoder = copy.copy(teacher.bert.encoder)
    view.bert.encoder._modules = dict(teacher.bert.encoder._modules)
    view.bert.encoder.layer = nn.ModuleList(list(teacher.layers))
    for i, attn in sorted((blocks or {}).items()):
        idx = view.layer_index_of([i])
        layer = copy.copy(view.layers[idx])
        layer._modules = dict(layer._modules)
        view.layers[idx] = layer
        view.replace_attention(idx, attn)
    for i, (layer, spec) in sorted((merges or {}).items(), reverse=True):
        idx = view.layer_index_of([i])
        if idx + 1 >= len(view.layers) or view.config.layers[idx + 1].origin != [i + 1]:
            raise ValueError(f"cannot merge teacher layers {i} and {i + 1}: they are not adjacent, unmerged layers here")
        view.merge_layers(idx, layer, spec)
    return view


def drop_every_second(teacher: BertForMaskedLM) -> tuple[BertForMaskedLM, list[str]]:
    """Teacher without layers 1, 3, 5, ...: each pair (i, i+1) is replaced by a copy of layer i."""
    merges = {}
    for i in range(0, len(teacher.layers) - 1, 2):
        s = teacher.config.layers[i]
        spec = LayerSpec(**{**s.to_dict(), "origin": [i, i + 1], "kind": "dropped"})
        layer, _ = init_merged_layer(teacher.config, spec, teacher.layers[i], teacher.layers[i + 1], "first")
        merges[i] = (layer, spec)
    return clone_model(compose(teacher, merges=merges)), ["dropped layers " + ", ".join(str(i + 1) for i in merges)]
