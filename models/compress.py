"""Initialising smaller blocks, layers and merged layers from the teacher, for every family.

The initialisers read a block through the names every family gives its parts (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, ``num_heads``, ``head_dim``, ``num_kv_heads``, ``heads``; a layer's ``up_proj``, ``gate_proj``,
``down_proj``, ``ffn_norm``) and build new ones with the family's ``make_block`` / ``make_layer``, so one
initialiser per attention kind (``INITIALISERS``) serves BERT and Llama alike.

- Query heads are ranked by importance: the mean norm of each head's contribution to the block output on real inputs
  (or, without data, the product of its value and output weight norms). The top ``k`` heads are kept in their order;
  in a grouped-query teacher, each new key/value group keeps the best query heads of its own teacher groups.
- Fewer key/value heads: a new key/value head is the mean of the heads its query heads read (mean pooling, as in GQA
  uptraining).
- A smaller per-head dimension (no rotary embeddings) is reached by the best low-rank approximation (truncated SVD)
  of each kept head's bilinear maps: W_q^T W_k for the attention scores (rescaled for the new 1/sqrt(d)) and W_o W_v
  for the values, biases folded in as an extra input column.
- Attention replaced by a linear map starts as attention to the token itself: W_o W_v.
- A narrower feed-forward part keeps the most important neurons (by activation on a probe batch, else by weights);
  given the probe's inputs, its output projection is then re-solved by least squares (ridge towards the copied
  weights) so that the kept neurons best reproduce the whole part's output on them (``refit_down_proj``).
- Shapes larger than the teacher's cannot be taken from it: those start random, and the returned note says so.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from . import kinds
from .base import SwappableAttention, SwappableLayer, SwappableModel, init_weights
from .config import LayerSpec, ModelConfig
from .families import family_of


def make_block(cfg: ModelConfig, spec: LayerSpec) -> SwappableAttention:
    return family_of(cfg).model_class.make_block(cfg, spec)


def make_layer(cfg: ModelConfig, spec: LayerSpec) -> SwappableLayer:
    return family_of(cfg).model_class.make_layer(cfg, spec)


def _kv_of(attn: SwappableAttention, h: int) -> int:
    """The key/value head query head ``h`` reads."""
    return h // (attn.num_heads // attn.num_kv_heads)


def _rows(lin: nn.Linear, index: int, size: int) -> torch.Tensor:
    """Rows [index*size, (index+1)*size) of a projection with its bias as the last column: [size, D+1]."""
    rows = slice(index * size, (index + 1) * size)
    bias = lin.bias[rows, None] if lin.bias is not None else lin.weight.new_zeros(size, 1)
    return torch.cat([lin.weight[rows], bias], dim=1)


def _put(lin: nn.Linear, rows: slice, m: torch.Tensor) -> None:
    lin.weight[rows] = m[:, :-1]
    if lin.bias is not None:
        lin.bias[rows] = m[:, -1]


@torch.no_grad()
def head_importance(attn: SwappableAttention, inputs: list[tuple[torch.Tensor, Any, torch.Tensor]] | None = None
                    ) -> torch.Tensor:
    """Importance per query head [H]. ``inputs``: (hidden [B,T,D], the model's ``context`` for it, valid [B,T])."""
    H, d = attn.num_heads, attn.head_dim
    W_o = attn.o_proj.weight.view(-1, H, d)  # [D, H, d]
    if not inputs:
        W_v = attn.v_proj.weight.view(attn.num_kv_heads, d, -1)
        per_head = torch.stack([W_v[_kv_of(attn, h)].flatten() for h in range(H)])
        return per_head.norm(dim=1) * W_o.permute(1, 0, 2).flatten(1).norm(dim=1)
    total = torch.zeros(H, device=W_o.device)
    count = 0.0
    for x, ctx, valid in inputs:
        mixed, _ = attn.heads(x, ctx)
        B, T, _ = mixed.shape
        contrib = torch.einsum("bthd,ohd->btho", mixed.view(B, T, H, d), W_o).norm(dim=-1)  # [B, T, H]
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
def random_block(teacher: SwappableAttention, cfg: ModelConfig, spec: LayerSpec) -> SwappableAttention:
    """A randomly initialised block of ``spec``'s shape that keeps the teacher's norm (the block's ``FROZEN`` part)."""
    new = make_block(cfg, spec).to(_device(teacher, cfg))
    new.apply(init_weights)
    kept = {k: v for k, v in teacher.state_dict().items() if k.startswith(new.FROZEN)} if new.FROZEN else {}
    if kept:
        new.load_state_dict(kept, strict=False)
    return new


def _device(module: nn.Module, cfg: ModelConfig) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def random_attention(teacher: SwappableAttention, cfg: ModelConfig, *, num_heads: int, head_dim: int,
                     **shape: Any) -> SwappableAttention:
    """A randomly initialised ``num_heads`` x ``head_dim`` block (``shape``: further attention fields)."""
    fields = {"attention": "mha", **shape}
    return random_block(teacher, cfg, LayerSpec(num_heads, head_dim, 1, [0], **fields))


def _kept_heads(teacher: SwappableAttention, score: torch.Tensor, groups: tuple[int, int]) -> list[int]:
    """The query heads of the teacher a block of ``groups`` = (``H`` heads, ``G`` key/value groups) keeps, group after
    group.

    A multi-head teacher: the top ``H`` overall, in order (consecutive kept heads then form the groups). A grouped
    teacher: new group g draws from teacher key/value groups [g * Gt / G, (g + 1) * Gt / G), keeping its best query
    heads there, so every new group reads keys and values its own query heads were trained with."""
    (H, G), Ht, Gt = groups, teacher.num_heads, teacher.num_kv_heads
    if Gt == Ht or G == H:  # each kept head keeps its own key/value head: any heads will do
        return sorted(torch.topk(score, H).indices.tolist())
    problem = _grouping_problem((Ht, Gt), (H, G))
    if problem:
        raise ValueError(problem)
    per_new, pool = H // G, Gt // G
    keep = []
    for g in range(G):
        members = [h for h in range(Ht) if g * pool <= _kv_of(teacher, h) < (g + 1) * pool]
        best = torch.topk(score[members], per_new).indices.tolist()
        keep += sorted(members[i] for i in best)
    return keep


def _grouping_problem(teacher: tuple[int, int], student: tuple[int, int]) -> str | None:
    """Why a block of (heads, key/value heads) ``student`` cannot keep its heads from a teacher block of ``teacher``
    group by group (see ``_kept_heads``), or None."""
    (Ht, Gt), (H, G) = teacher, student
    if Gt == Ht or G == H:
        return None
    if Gt % G:
        return f"{G} key/value heads cannot be pooled from the teacher's {Gt}: they must divide it"
    return None  # each new group draws its H / G heads from the teacher's Ht / G of its groups (H <= Ht)


def _check_shrinkable(teacher: SwappableAttention, spec: LayerSpec) -> None:
    if spec.head_dim < teacher.head_dim and getattr(teacher, "ROTARY", False):
        raise ValueError(_rotary_problem(spec.head_dim, teacher.head_dim) + " (start it random, or keep head_dim)")


def _rotary_problem(d: int, dt: int) -> str:
    return (f"head_dim {d} < the teacher's {dt}: a smaller head size cannot be taken from a teacher with rotary "
            "position embeddings")


def fit_problem(cfg: ModelConfig, spec: LayerSpec) -> str | None:
    """Why a layer of ``spec`` cannot be part of a model of ``cfg``'s family (an attention kind the family does not
    implement, a layer it cannot build), or None. Built on the meta device: no weights are made, none are needed."""
    family = family_of(cfg)
    if spec.attention not in family.attention_kinds:
        return (f"attention kind '{spec.attention}' is not implemented for {family.name} models (they implement "
                f"{', '.join(family.attention_kinds)})")
    try:
        with torch.device("meta"):
            make_layer(cfg, spec)
    except ValueError as e:
        return str(e)
    return None


def teacher_start_problem(cfg: ModelConfig, spec: LayerSpec, source: LayerSpec) -> str | None:
    """Why a unit of ``spec`` cannot start from a teacher layer of shape ``source`` (its heads kept, each new key/value
    head pooled from its group's, a smaller head size by SVD), or None; read from the shapes alone, before any
    weights are loaded. A unit larger than the teacher's starts random (and says so): no problem."""
    if not kinds.get_kind(spec.attention).has_heads or spec.num_heads > source.num_heads \
            or spec.head_dim > source.head_dim:
        return None
    with torch.device("meta"):
        teacher = make_block(cfg, source)
    if spec.head_dim < source.head_dim and getattr(teacher, "ROTARY", False):
        return _rotary_problem(spec.head_dim, source.head_dim)
    return _grouping_problem((source.num_heads, source.kv_heads), (spec.num_heads, spec.kv_heads))


INITIALISERS: dict[str, Callable[..., tuple[SwappableAttention, str]]] = {}  # attention kind -> teacher initialiser


@kinds.implements(INITIALISERS, "mha")
@torch.no_grad()
def init_mha(teacher: SwappableAttention, cfg: ModelConfig, spec: LayerSpec, *,
             importance: torch.Tensor | None = None) -> tuple[SwappableAttention, str]:
    """One key/value head per query head; each kept head copied, or (smaller head_dim) its SVD projection."""
    new = random_block(teacher, cfg, spec)
    H, d, Ht, dt = spec.num_heads, spec.head_dim, teacher.num_heads, teacher.head_dim
    if H > Ht or d > dt:
        return new, f"random (the {H}x{d} block is larger than the teacher's {Ht}x{dt} in heads or head_dim)"
    _check_shrinkable(teacher, spec)
    keep = _kept_heads(teacher, importance if importance is not None else head_importance(teacher), (H, H))
    for j, h in enumerate(keep):
        out = slice(j * d, (j + 1) * d)
        q, k, v = _rows(teacher.q_proj, h, dt), _rows(teacher.k_proj, _kv_of(teacher, h), dt), \
            _rows(teacher.v_proj, _kv_of(teacher, h), dt)
        o = teacher.o_proj.weight[:, h * dt:(h + 1) * dt]  # [D, dt]
        if d == dt:
            nq, nk, nv, no = q, k, v, o
        else:
            # scores: x~ q^T k x~^T / sqrt(dt)  ->  x~ nq^T nk x~^T / sqrt(d) with nq^T nk ~ q^T k * sqrt(d / dt)
            xq, xk = _low_rank_pair(q.T, k.T, d)
            c = (d / dt) ** 0.25
            nq, nk = (xq * c).T, (xk * c).T
            xo, xv = _low_rank_pair(o, v.T, d)  # o @ v ~ xo @ xv.T
            no, nv = xo, xv.T
        for lin, m in ((new.q_proj, nq), (new.k_proj, nk), (new.v_proj, nv)):
            _put(lin, out, m)
        new.o_proj.weight[:, out] = no
    _copy_output_bias(teacher, new)
    how = "copied" if d == dt else f"SVD rank-{d} projection of"
    return new, f"teacher: kept heads {keep} of {Ht} by importance, {how} each head"


def _copy_output_bias(teacher: SwappableAttention, new: SwappableAttention) -> None:
    if new.o_proj.bias is not None and teacher.o_proj.bias is not None:
        new.o_proj.bias.copy_(teacher.o_proj.bias)


@kinds.implements(INITIALISERS, "gqa")
@torch.no_grad()
def init_gqa(teacher: SwappableAttention, cfg: ModelConfig, spec: LayerSpec, *,
             importance: torch.Tensor | None = None) -> tuple[SwappableAttention, str]:
    """A grouped-query block: the kept query heads (``_kept_heads``) cut into ``num_kv_heads`` groups of consecutive
    heads; a group's key and value projections are the mean of those its heads read, its queries and output columns
    are the heads' own. A smaller head_dim keeps the top ``head_dim`` directions of each group's pooled key / value map
    (SVD), applied to the queries / output columns as well."""
    H, d, G = spec.num_heads, spec.head_dim, spec.num_kv_heads
    new = random_block(teacher, cfg, spec)
    Ht, dt = teacher.num_heads, teacher.head_dim
    if H > Ht or d > dt:
        return new, f"random (the {H}x{d} block is larger than the teacher's {Ht}x{dt} in heads or head_dim)"
    _check_shrinkable(teacher, spec)
    keep = _kept_heads(teacher, importance if importance is not None else head_importance(teacher), (H, G))
    group = H // G

    def basis(m: torch.Tensor) -> torch.Tensor:  # [d, dt]: the top-d output directions of m [dt, D+1]
        return torch.eye(dt, dtype=m.dtype, device=m.device) if d == dt else torch.linalg.svd(m)[0][:, :d].T

    for g in range(G):
        members = keep[g * group:(g + 1) * group]
        k = torch.stack([_rows(teacher.k_proj, _kv_of(teacher, h), dt) for h in members]).mean(0)
        v = torch.stack([_rows(teacher.v_proj, _kv_of(teacher, h), dt) for h in members]).mean(0)
        pk, pv = basis(k), basis(v)
        _put(new.k_proj, slice(g * d, (g + 1) * d), pk @ k)
        _put(new.v_proj, slice(g * d, (g + 1) * d), pv @ v)
        for j, h in enumerate(members):
            out = slice((g * group + j) * d, (g * group + j + 1) * d)
            _put(new.q_proj, out, (pk @ _rows(teacher.q_proj, h, dt)) * (d / dt) ** 0.5)  # scores keep their scale
            new.o_proj.weight[:, out] = teacher.o_proj.weight[:, h * dt:(h + 1) * dt] @ pv.T
    _copy_output_bias(teacher, new)
    how = "" if d == dt else f", top-{d} SVD directions of each group's keys/values"
    return new, (f"teacher: kept heads {keep} of {Ht} by importance; {G} key/value heads, each the mean of those its "
                 f"group of {group} heads read{how}")


@kinds.implements(INITIALISERS, "linear")
@torch.no_grad()
def init_linear(teacher: SwappableAttention, cfg: ModelConfig, spec: LayerSpec, *,
                importance: torch.Tensor | None = None) -> tuple[SwappableAttention, str]:
    """Attention to the token itself: the map W_o W_v (each query head's value head), biases folded in."""
    new = random_block(teacher, cfg, spec)
    dt = teacher.head_dim
    v = torch.cat([_rows(teacher.v_proj, _kv_of(teacher, h), dt) for h in range(teacher.num_heads)])  # [H*dt, D+1]
    m = teacher.o_proj.weight @ v  # [D, D+1]
    new.proj.weight.copy_(m[:, :-1])
    if new.proj.bias is not None:
        new.proj.bias.copy_(m[:, -1] + (teacher.o_proj.bias if teacher.o_proj.bias is not None else 0))
    return new, "teacher: each token attending to itself only (W_o W_v)"


@kinds.implements(INITIALISERS, "none")
def init_none(teacher: SwappableAttention, cfg: ModelConfig, spec: LayerSpec, *,
              importance: torch.Tensor | None = None) -> tuple[SwappableAttention, str]:
    return make_block(cfg, spec), "no attention"


@torch.no_grad()
def init_attention(teacher: SwappableAttention, cfg: ModelConfig, spec: LayerSpec, *, init: str = "teacher",
                   importance: torch.Tensor | None = None) -> tuple[SwappableAttention, str]:
    """A block of ``spec``'s attention shape: from ``teacher`` (its kind's initialiser) or random."""
    if init == "random":
        return random_block(teacher, cfg, spec), "random"
    if init != "teacher":
        raise ValueError(f"a block starts from 'teacher' or 'random', got '{init}'")
    if spec.attention not in INITIALISERS:
        raise ValueError(f"no teacher initialiser for attention kind '{spec.attention}'; known: "
                         f"{', '.join(INITIALISERS)}")
    return INITIALISERS[spec.attention](teacher, cfg, spec, importance=importance)


def compress_attention(teacher: SwappableAttention, cfg: ModelConfig, *, num_heads: int, head_dim: int,
                       importance: torch.Tensor | None = None) -> tuple[SwappableAttention, str]:
    """A ``num_heads`` x ``head_dim`` multi-head block initialised from ``teacher``. Returns (block, note on how)."""
    return init_mha(teacher, cfg, LayerSpec(num_heads, head_dim, 1, [0]), importance=importance)


@torch.no_grad()
def neuron_scores(layer: SwappableLayer, inputs: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each feed-forward neuron: its mean |activation| times its output weight norm on ``inputs``
    (the attention block's outputs [N, D]), or without inputs the product of its weight norms."""
    down = layer.down_proj.weight.norm(dim=0)
    if inputs is not None:
        return layer.neurons(inputs).abs().flatten(0, -2).mean(0) * down
    score = layer.up_proj.weight.norm(dim=1) * down
    return score * layer.gate_proj.weight.norm(dim=1) if layer.gate_proj is not None else score


@torch.no_grad()
def refit_down_proj(src: SwappableLayer, layer: SwappableLayer, inputs: torch.Tensor, *, ridge: float = 0.3) -> None:
    """Re-solve ``layer``'s feed-forward output projection (its neurons a subset of ``src``'s) so that its output on
    ``inputs`` (the attention block's outputs [N, D]) best matches ``src``'s feed-forward output on them: least
    squares (products in the weights' precision, the solve in float64), shrunk towards its current (copied) weights
    by ``ridge`` times the mean diagonal of the kept activations' Gram matrix, which keeps the fit from chasing a
    probe with fewer tokens than neurons."""
    if ridge <= 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    w = layer.down_proj.weight
    a = inputs.to(w.device, w.dtype)
    sub = layer.neurons(a)  # [N, k]
    target = src.neurons(a) @ src.down_proj.weight.T  # [N, D], without the (shared) bias
    gram = (sub.T @ sub).double()
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    fit = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                             (sub.T @ target).double() + lam * w.double().T)
    w.copy_(fit.T.to(w.dtype))


@torch.no_grad()
def _copy_ffn(src: SwappableLayer, layer: SwappableLayer, *, size: int, scores: torch.Tensor | None,
              refit_on: torch.Tensor | None = None) -> str:
    """The top ``size`` neurons of ``src``'s feed-forward part into ``layer``'s (and its norm); ``refit_on``: the
    attention block's outputs on a probe, on which the output projection is then refit (``refit_down_proj``)."""
    if size == 0:
        return "no feed-forward part"
    if src.up_proj is None:
        return "ffn random (the teacher layer has none)"
    layer.ffn_norm().load_state_dict(src.ffn_norm().state_dict())
    width = src.up_proj.out_features
    if size > width:
        return f"ffn random ({size} > teacher's {width})"
    score = scores if scores is not None else neuron_scores(src)
    keep = sorted(torch.topk(score, size).indices.tolist())
    for name in ("up_proj", "gate_proj"):
        a, b = getattr(src, name), getattr(layer, name)
        if a is not None:
            b.weight.copy_(a.weight[keep])
            if b.bias is not None:
                b.bias.copy_(a.bias[keep])
    layer.down_proj.weight.copy_(src.down_proj.weight[:, keep])
    if layer.down_proj.bias is not None:
        layer.down_proj.bias.copy_(src.down_proj.bias)
    if size == width:
        return "ffn copied"
    if refit_on is None:
        return f"ffn: top {size} of {width} neurons"
    refit_down_proj(src, layer, refit_on)
    return f"ffn: top {size} of {width} neurons, output projection refit on {refit_on.shape[0]} tokens"


@torch.no_grad()
def init_merged_layer(cfg: ModelConfig, spec: LayerSpec, first: SwappableLayer, *,
                      second: SwappableLayer | None = None, mode: str, importance: torch.Tensor | None = None,
                      neuron_score: torch.Tensor | None = None, ffn_inputs: torch.Tensor | None = None
                      ) -> tuple[SwappableLayer, str]:
    """One layer of ``spec`` standing for ``first`` + ``second`` (None: ``first`` alone, a single-layer unit):
    from first, second, their average, or random. ``importance``: head importance of the source layer's block;
    ``neuron_score``: importance of its feed-forward neurons (``neuron_scores``); ``ffn_inputs``: its attention
    block's outputs on a probe, to refit a narrower feed-forward part on (a single-layer unit only: a merged pair's
    target is not its first layer's output)."""
    if mode not in ("first", "second", "average", "random"):
        raise ValueError(f"a merged layer starts from first, second, average or random, got '{mode}'")
    second = first if second is None else second
    layer = make_layer(cfg, spec).to(_device(first, cfg))
    layer.apply(init_weights)
    if mode == "random":
        return layer, "random"
    if mode == "average":
        src = copy.deepcopy(first)
        sd2 = second.state_dict()
        src.load_state_dict({k: (v + sd2[k]) / 2 for k, v in first.state_dict().items()})
    else:
        src = first if mode == "first" else second
    block, note = init_attention(src.block, cfg, spec, importance=importance if mode != "average" else None)
    layer.set_block(block)
    if ffn_inputs is not None and (second is not first or mode == "average"):
        raise ValueError("`ffn_inputs`: a feed-forward part is refit for a single-layer unit from its own layer only")
    ffn_note = _copy_ffn(src, layer, size=spec.intermediate_size, scores=neuron_score if mode != "average" else None,
                         refit_on=ffn_inputs)
    source = "teacher layer" if second is first and mode != "average" else f"{mode} layer"
    return layer, f"{source}; attention {note}; {ffn_note}"


def clone_model(model: SwappableModel) -> SwappableModel:
    """An independent copy (weights and per-layer plan)."""
    return copy.deepcopy(model)


def compose(teacher: SwappableModel, blocks: dict[int, SwappableAttention] | None = None,
            merges: dict[int, tuple[SwappableLayer, LayerSpec]] | None = None, *,
            layers: dict[int, tuple[SwappableLayer, LayerSpec]] | None = None) -> SwappableModel:
    """A model that shares every module of ``teacher`` except the replaced ones: no weights are copied.

    ``blocks`` maps a teacher layer index to a new attention block; ``merges`` maps the first index of a teacher pair
    (i, i+1) to the layer replacing both; ``layers`` maps a teacher layer index to a whole new layer standing for it.
    Indices are the teacher's, whatever was merged before them.
    """
    view = teacher.view()
    for i, attn in sorted((blocks or {}).items()):
        view.replace_attention(view.layer_index_of([i]), attn)
    for i, (layer, spec) in sorted((layers or {}).items()):
        view.replace_layer(view.layer_index_of([i]), layer, spec)
    for i, (layer, spec) in sorted((merges or {}).items(), reverse=True):
        idx = view.layer_index_of([i])
        if idx + 1 >= len(view.layers) or view.config.layers[idx + 1].origin != [i + 1]:
            raise ValueError(f"cannot merge teacher layers {i} and {i + 1}: they are not adjacent, "
                             "unmerged layers here")
        view.merge_layers(idx, layer, spec)
    return view


def drop_every_second(teacher: SwappableModel) -> tuple[SwappableModel, list[str]]:
    """Teacher without layers 1, 3, 5, ...: each pair (i, i+1) is replaced by a copy of layer i."""
    merges = {}
    for i in range(0, len(teacher.layers) - 1, 2):
        s = teacher.config.layers[i]
        spec = LayerSpec(**{**s.to_dict(), "origin": [i, i + 1], "kind": "dropped"})
        layer, _ = init_merged_layer(teacher.config, spec, teacher.layers[i], second=teacher.layers[i + 1],
                                     mode="first")
        merges[i] = (layer, spec)
    return clone_model(compose(teacher, merges=merges)), ["dropped layers " + ", ".join(str(i + 1) for i in merges)]
