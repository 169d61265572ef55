"""Student units (a retrained attention block, a merged pair of layers, a single layer): their spec, how they start
from the teacher, and the metadata their checkpoints carry. The training scripts, bench/ and the sensitivity map all
build units here, so a unit made by any of them is the same unit.

A unit's shape is one ``models.config.LayerSpec``; it is stored whole under ``spec`` in the checkpoint metadata
(next to the flat ``num_heads`` / ``head_dim`` / ``intermediate_size`` that discovery filters and older readers use)
and read back by ``spec_from_meta``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models import LayerSpec, ModelConfig, SwappableAttention, SwappableLayer, SwappableModel
from models.compress import head_importance, init_attention, init_merged_layer, neuron_scores
from models.kinds import flagged_kind, get_kind
from ..errors import SettingError
from ..storage.checkpoint import CheckpointError
from ..storage.features import teacher_features

UNIT_PREFIX = {"block": "block", "merged_layer": "merge", "layer": "layer"}  # checkpoint kind -> unit folder prefix


# ---- specs ----
def unit_spec(cfg: ModelConfig, origin: list[int], kind: str, *, intermediate_size: int | None = None,
              **attention: Any) -> LayerSpec:
    """The spec of a unit standing for teacher layers ``origin``: the given attention fields (None = the first
    teacher layer's) and feed-forward size (None = that layer's). Another attention kind than the teacher layer's
    takes none of its fields (heads of a kind without heads are 0)."""
    base = cfg.layers[origin[0]].to_dict()
    given = {k: v for k, v in attention.items() if v is not None}
    unknown = sorted(set(given) - set(LayerSpec.ATTENTION_FIELDS))
    if unknown:
        raise ValueError(f"unknown attention field(s) {unknown}; known: {list(LayerSpec.ATTENTION_FIELDS)}")
    want = given.get("attention", base["attention"])
    if want != base["attention"]:
        _switch_kind(base, given, want)
    try:
        return LayerSpec.from_dict({**base, **given, "origin": list(origin), "kind": kind,
                                    "intermediate_size": base["intermediate_size"] if intermediate_size is None
                                    else intermediate_size})
    except ValueError as e:  # fields that do not fit together, e.g. kv_heads not dividing the heads
        shape = ", ".join(f"`{k}` {v}" for k, v in given.items()) or "the teacher's shape"
        raise SettingError(f"the unit asked for ({shape}) is not a valid layer: {e}") from None


def _switch_kind(base: dict[str, Any], given: dict[str, Any], want: str) -> None:
    """``base`` (a teacher layer's spec) made a starting point for attention ``want``: the teacher kind's own fields
    dropped, and no heads for a kind without them (which ``given`` must not set)."""
    try:
        kind = get_kind(want)
    except ValueError as e:
        raise SettingError(f"`attention`: {e}") from None
    foreign = [f for f in LayerSpec.ATTENTION_FIELDS[3:] if f in given and f not in kind.fields]
    if not kind.has_heads:
        foreign = [f for f in ("num_heads", "head_dim") if given.get(f)] + foreign  # 0 (a checkpoint's): none
    if foreign:
        raise SettingError(f"`{foreign[0]}` does not apply to `attention` {want}"
                           + ("" if kind.has_heads else ", which has no heads"))
    for f in LayerSpec.ATTENTION_FIELDS[3:]:
        if f not in kind.fields:
            base[f] = None
    if not kind.has_heads:
        base.update(num_heads=0, head_dim=0)


def spec_from_meta(meta: dict[str, Any], cfg: ModelConfig | None = None) -> LayerSpec:
    """The unit spec a block / merged-layer / layer checkpoint was trained with.

    Checkpoints written before the spec was stored whole are read from their flat fields (plain multi-head
    attention; a block keeps its teacher layer's feed-forward size, so reading one needs the teacher's ``cfg``).
    """
    if "spec" in meta:
        return LayerSpec.from_dict(meta["spec"])
    kind = meta["kind"]
    if kind == "block":
        if cfg is None:
            raise ValueError("reading a block checkpoint without a stored spec needs the teacher's config")
        i = meta["layer"]
        return LayerSpec(meta["num_heads"], meta["head_dim"], cfg.layers[i].intermediate_size, [i], "block")
    if kind == "merged_layer":
        return LayerSpec(meta["num_heads"], meta["head_dim"], meta["intermediate_size"], list(meta["layers"]),
                         "merged")
    if kind == "layer":
        return LayerSpec(meta["num_heads"], meta["head_dim"], meta["intermediate_size"], [meta["layer"]], "layer")
    raise CheckpointError(f"a '{kind}' checkpoint holds no unit spec (expected block, merged_layer or layer)")


def unit_meta(kind: str, spec: LayerSpec, cfg: ModelConfig, *, teacher: str, teacher_hash: str,
              **extra: Any) -> dict[str, Any]:
    """Checkpoint metadata of a unit: its kind, teacher, spec, and the flat fields discovery filters read."""
    if kind not in UNIT_PREFIX:
        raise ValueError(f"unit kind must be one of {', '.join(UNIT_PREFIX)}, got '{kind}'")
    meta: dict[str, Any] = {"kind": kind, "teacher": str(teacher), "teacher_hash": teacher_hash,
                            "hidden_size": cfg.hidden_size, "num_heads": spec.num_heads, "head_dim": spec.head_dim}
    if kind == "block":
        meta.update(teacher_heads=cfg.num_attention_heads, teacher_head_dim=cfg.head_dim, layer=spec.origin[0])
    elif kind == "merged_layer":
        meta.update(intermediate_size=spec.intermediate_size, layers=list(spec.origin))
    else:
        meta.update(intermediate_size=spec.intermediate_size, layer=spec.origin[0])
    return {**meta, "spec": spec.to_dict(), **extra}


@dataclass(frozen=True)
class UnitShape:
    """The shape of new units; None keeps the teacher's (or, starting from checkpoints, theirs).

    ``attention`` is a kind of ``models.kinds`` (None: the kind whose own field is set here, e.g. ``num_kv_heads``
    selects gqa; else the teacher's). Units are attention blocks, or whole layers (``whole_layers``) when their
    kind has no block to train alone (attention none) or when ``ffn_dim`` sets their own feed-forward width.
    """

    num_heads: int | None = None  # attention heads
    head_dim: int | None = None  # per-head dimension d_k
    attention: str | None = None  # the kind of attention (models.kinds)
    num_kv_heads: int | None = None  # grouped-query attention: key/value heads, each shared by a group of query heads
    ffn_dim: int | None = None  # feed-forward width (merged pairs, whole layers)

    def attention_fields(self) -> dict[str, Any]:
        """The attention fields of ``LayerSpec`` this shape sets (None where it keeps the teacher's)."""
        fields = {f: getattr(self, f) for f in LayerSpec.ATTENTION_FIELDS}
        if fields["attention"] is None:
            try:
                fields["attention"] = flagged_kind(fields)
            except ValueError as e:
                raise SettingError(str(e)) from None
        return fields

    def whole_layers(self) -> bool:
        """Whether units of this shape (standing for one teacher layer) are whole layers rather than blocks."""
        kind = self.attention_fields()["attention"]
        return self.ffn_dim is not None or (kind is not None and not get_kind(kind).has_block)


def starting_shape(shape: UnitShape, specs: list[LayerSpec], what: str) -> dict[str, Any]:
    """The attention fields of new units that start from checkpoints of ``specs``: theirs (one shape for all), which
    ``shape``, where it sets a field, must match."""
    shapes = {tuple(sorted(s.attention_shape().items())) for s in specs}
    if len(shapes) > 1:
        raise CheckpointError(f"the `start_from` {what}s have different shapes "
                              f"{[dict(s) for s in sorted(shapes)]}; train them in separate runs (one each)")
    have = dict(shapes.pop())
    for key, want in shape.attention_fields().items():
        if want is not None and want != have.get(key):
            raise CheckpointError(f"`{key}` {want} does not match the `start_from` {what}'s {key} "
                                  f"{have.get(key)}")
    return have


# ---- initialisation ----
@torch.no_grad()
def head_rankings(teacher: SwappableModel, probe: dict[str, torch.Tensor], layers: list[int]
                  ) -> dict[int, torch.Tensor]:
    """Importance of the heads of each teacher layer in ``layers`` on the probe batch (one teacher pass)."""
    if not layers:
        return {}
    device = next(teacher.parameters()).device
    ids, att = probe["input_ids"].to(device), probe["attention_mask"].to(device)
    feats = teacher_features(teacher, ids, att, names=[f"in_{i}" for i in layers])
    return {i: head_importance(teacher.layers[i].block, [(feats[f"in_{i}"], teacher.context(att), att.bool())])
            for i in layers}


@dataclass
class NeuronProbe:
    """What the probe says about one teacher layer's feed-forward neurons: their importance (``neuron_scores``) and,
    for a refit of a narrower part (``models.compress.refit_down_proj``), the attention block's outputs on the probe's
    real tokens [N, D] (kept on the CPU; None when not asked for)."""

    scores: torch.Tensor
    inputs: torch.Tensor | None = None


@torch.no_grad()
def neuron_rankings(teacher: SwappableModel, probe: dict[str, torch.Tensor], layers: list[int], *,
                    keep_inputs: bool = False, chunk: int = 8) -> dict[int, NeuronProbe]:
    """Importance of the feed-forward neurons of each teacher layer in ``layers`` on the probe batch: the mean size of
    each neuron's activation on the real tokens, times its output weights' norm (``models.compress.neuron_scores``);
    ``keep_inputs``: also keep what the refit reads. The teacher runs on ``chunk`` sequences at a time."""
    if not layers:
        return {}
    device = next(teacher.parameters()).device
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers if teacher.layers[i].up_proj is not None}
    for start in range(0, probe["input_ids"].shape[0], chunk):
        ids = probe["input_ids"][start:start + chunk].to(device)
        att = probe["attention_mask"][start:start + chunk].to(device)
        feats = teacher_features(teacher, ids, att, names=[f"in_{i}" for i in seen])
        ctx, valid = teacher.context(att), att.bool()
        for i, parts in seen.items():
            parts.append(teacher.layers[i].block(feats[f"in_{i}"], ctx)[valid].cpu())
    out = {}
    for i, parts in seen.items():
        a = torch.cat(parts)
        out[i] = NeuronProbe(neuron_scores(teacher.layers[i], a.to(device)), a if keep_inputs else None)
    return out


def narrows_ffn(cfg: ModelConfig, layer: int, spec: LayerSpec) -> bool:
    """Whether a single-layer unit of ``spec`` keeps some, not all, of teacher layer ``layer``'s neurons."""
    return 0 < spec.intermediate_size < cfg.layers[layer].intermediate_size


def refit_setup(cfg: ModelConfig, specs: dict[int, LayerSpec], tokens: int) -> dict[str, int]:
    """The training-setup entry that says single-layer units of ``specs`` start from a refit on ``tokens`` probe
    tokens (a resume point or a map's unit that started otherwise is not the same run); empty where none is refit."""
    return {"ffn_refit_tokens": tokens} if tokens and any(narrows_ffn(cfg, i, s) for i, s in specs.items()) else {}


def _fewer_heads(spec: LayerSpec, teacher_spec: LayerSpec) -> bool:
    """Whether a unit keeps some, not all, of the teacher layer's heads (those are ranked on real inputs)."""
    return 0 < spec.num_heads < teacher_spec.num_heads


def init_blocks(teacher: SwappableModel, specs: dict[int, LayerSpec], *, init: str,
                probe: dict[str, torch.Tensor] | None) -> tuple[dict[int, SwappableAttention], dict[int, str]]:
    """Blocks for teacher layers ``specs`` (layer -> spec): from the teacher (heads ranked on ``probe`` where a block
    keeps fewer of them; smaller head_dim by SVD; see ``models.compress``) or random. Returns (blocks, notes)."""
    cfg = teacher.config
    rank = [i for i, s in specs.items() if init == "teacher" and probe is not None
            and _fewer_heads(s, cfg.layers[i])]
    importance = head_rankings(teacher, probe, rank) if rank else {}
    blocks, notes = {}, {}
    for i, spec in specs.items():
        blocks[i], notes[i] = init_attention(teacher.layers[i].block, cfg, spec, init=init,
                                              importance=importance.get(i))
    return blocks, notes


def init_merges(teacher: SwappableModel, specs: dict[int, LayerSpec], *, init: str,
                probe: dict[str, torch.Tensor] | None
                ) -> tuple[dict[int, tuple[SwappableLayer, LayerSpec]], dict[int, str]]:
    """One layer per pair (i, i+1) in ``specs`` (first index -> spec), from the pair's first or second layer (heads
    ranked on ``probe`` on that layer's input), their average, or random. Returns ({i: (layer, spec)}, notes)."""
    cfg = teacher.config
    offset = {"first": 0, "second": 1}.get(init)
    rank = [i for i, s in specs.items() if offset is not None and probe is not None
            and _fewer_heads(s, cfg.layers[i + offset])]
    importance = head_rankings(teacher, probe, [i + offset for i in rank]) if rank else {}
    layers, notes = {}, {}
    for i, spec in specs.items():
        imp = importance.get(i + offset) if i in rank else None
        layer, notes[i] = init_merged_layer(cfg, spec, teacher.layers[i], second=teacher.layers[i + 1], mode=init,
                                             importance=imp)
        layers[i] = (layer, spec)
    return layers, notes


def init_layers(teacher: SwappableModel, specs: dict[int, LayerSpec], *, init: str,
                probe: dict[str, torch.Tensor] | None, ffn_probe: dict[str, torch.Tensor] | None = None
                ) -> tuple[dict[int, tuple[SwappableLayer, LayerSpec]], dict[int, str]]:
    """Whole layers standing for teacher layers ``specs`` (layer -> spec): from the teacher layer (heads ranked on
    ``probe`` where fewer are kept; feed-forward neurons kept by their activation on ``ffn_probe``, else ``probe``,
    where fewer are kept, and on ``ffn_probe`` their output projection refit) or random. Returns
    ({i: (layer, spec)}, notes)."""
    cfg = teacher.config
    probe = probe if init == "teacher" else None
    rank = [i for i, s in specs.items() if probe is not None and _fewer_heads(s, cfg.layers[i])]
    narrow = [i for i, s in specs.items() if probe is not None and narrows_ffn(cfg, i, s)]
    importance = head_rankings(teacher, probe, rank) if rank else {}
    refit = ffn_probe is not None and init == "teacher"
    neurons = neuron_rankings(teacher, ffn_probe if refit else probe, narrow, keep_inputs=refit) if narrow else {}
    layers, notes = {}, {}
    for i, spec in specs.items():
        n = neurons.get(i)
        layer, notes[i] = init_merged_layer(cfg, spec, teacher.layers[i], mode="first" if init == "teacher" else init,
                                            importance=importance.get(i), neuron_score=n.scores if n else None,
                                            ffn_inputs=n.inputs if n else None)
        layers[i] = (layer, spec)
    return layers, notes


def set_dropout(module: nn.Module, p: float, hidden: bool = True) -> nn.Module:
    """Set the dropout probability of ``module``: attention probabilities always, hidden-state dropout if ``hidden``."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    for m in module.modules():
        if hasattr(m, "dropout_p"):  # an attention module of any family
            m.dropout_p = p
        elif hidden and isinstance(m, nn.Dropout):
            m.p = p
    return module
