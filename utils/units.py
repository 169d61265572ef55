"""Student units (a retrained attention block, a merged pair of layers, a single layer): their spec, how they start
from the teacher, and the metadata their checkpoints carry. The training scripts, bench/ and the sensitivity map all
build units here, so a unit made by any of them is the same unit.

A unit's shape is one ``models.config.LayerSpec``; it is stored whole under ``spec`` in the checkpoint metadata
(next to the flat ``num_heads`` / ``head_dim`` / ``intermediate_size`` that discovery filters and older readers use)
and read back by ``spec_from_meta``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from models import BertAttention, BertForMaskedLM, BertLayer, LayerSpec, ModelConfig
from models.compress import head_importance, init_attention, init_merged_layer
from .checkpoint import CheckpointError
from .features import teacher_features

UNIT_PREFIX = {"block": "block", "merged_layer": "merge", "layer": "layer"}  # checkpoint kind -> unit folder prefix


# ---- specs ----
def unit_spec(cfg: ModelConfig, origin: list[int], kind: str, intermediate_size: int | None = None,
              **attention: Any) -> LayerSpec:
    """The spec of a unit standing for teacher layers ``origin``: the given attention fields (None = the first
    teacher layer's) and feed-forward size (None = that layer's)."""
    base = cfg.layers[origin[0]].to_dict()
    given = {k: v for k, v in attention.items() if v is not None}
    unknown = sorted(set(given) - set(LayerSpec.ATTENTION_FIELDS))
    if unknown:
        raise ValueError(f"unknown attention field(s) {unknown}; known: {list(LayerSpec.ATTENTION_FIELDS)}")
    from .cli import UsageError

    try:
        return LayerSpec.from_dict({**base, **given, "origin": list(origin), "kind": kind,
                                    "intermediate_size": intermediate_size or base["intermediate_size"]})
    except ValueError as e:  # fields that do not fit together, e.g. --kv-heads not dividing the heads
        raise UsageError(str(e)) from None


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


def unit_meta(kind: str, spec: LayerSpec, cfg: ModelConfig, teacher: str, teacher_hash: str,
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


# the flag that sets each attention field (for messages); add_shape_args declares them
SHAPE_FLAGS = {"num_heads": "--block_heads", "head_dim": "--block_d_k", "attention": "--kv-heads",
               "num_kv_heads": "--kv-heads"}


def add_shape_args(group: argparse._ArgumentGroup, ffn: bool = False) -> None:
    """The flags that give a unit's attention shape (and feed-forward size with ``ffn``); see ``shape_from_args``."""
    from .cli import positive_int

    group.add_argument("--block-heads", type=positive_int("--block-heads"), default=None,
                       help="heads of the new unit (default: the teacher's)")
    group.add_argument("--block-d-k", "--head-dim", type=positive_int("--block-d-k"), default=None,
                       help="per-head dimension d_k of the new unit (default: the teacher's)")
    group.add_argument("--kv-heads", type=positive_int("--kv-heads"), default=None,
                       help="grouped-query attention: this many key/value heads, each shared by a group of query "
                            "heads (must divide the heads; from the teacher: each group's keys/values start as the "
                            "mean of its heads'); default: plain multi-head attention")
    if ffn:
        group.add_argument("--ffn-dim", type=positive_int("--ffn-dim"), default=None, help="default: the teacher's")


def shape_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The attention fields the flags of ``add_shape_args`` give (None where not given)."""
    kv = getattr(args, "kv_heads", None)
    return {"num_heads": args.block_heads, "head_dim": args.block_d_k, "attention": "gqa" if kv else None,
            "num_kv_heads": kv}


def starting_shape(args: argparse.Namespace, specs: list[LayerSpec], what: str) -> dict[str, Any]:
    """The attention fields of new units that start from checkpoints of ``specs``: theirs (one shape for all), which
    the flags, where given, must match."""
    shapes = {tuple(sorted(s.attention_shape().items())) for s in specs}
    if len(shapes) > 1:
        raise CheckpointError(f"the --model_checkpoint {what}s have different shapes "
                              f"{[dict(s) for s in sorted(shapes)]}; train them in separate runs (one --block each)")
    have = dict(shapes.pop())
    for key, want in shape_from_args(args).items():
        if want is not None and want != have.get(key):
            raise CheckpointError(f"{SHAPE_FLAGS[key]} {want} does not match the --model_checkpoint {what}'s "
                                  f"{key} {have.get(key)}")
    return have


# ---- initialisation ----
@torch.no_grad()
def head_rankings(teacher: BertForMaskedLM, probe: dict[str, torch.Tensor], layers: list[int]
                  ) -> dict[int, torch.Tensor]:
    """Importance of the heads of each teacher layer in ``layers`` on the probe batch (one teacher pass)."""
    if not layers:
        return {}
    device = next(teacher.parameters()).device
    ids, att = probe["input_ids"].to(device), probe["attention_mask"].to(device)
    feats = teacher_features(teacher, ids, att, [f"in_{i}" for i in layers])
    return {i: head_importance(teacher.layers[i].block, [(feats[f"in_{i}"], teacher.context(att), att.bool())])
            for i in layers}


def init_blocks(teacher: BertForMaskedLM, specs: dict[int, LayerSpec], init: str,
                probe: dict[str, torch.Tensor] | None) -> tuple[dict[int, BertAttention], dict[int, str]]:
    """Blocks for teacher layers ``specs`` (layer -> spec): from the teacher (heads ranked on ``probe`` where a block
    keeps fewer of them; smaller head_dim by SVD; see ``models.compress``) or random. Returns (blocks, notes)."""
    cfg = teacher.config
    rank = [i for i, s in specs.items() if init == "teacher" and probe is not None
            and s.num_heads < cfg.layers[i].num_heads]
    importance = head_rankings(teacher, probe, rank) if rank else {}
    blocks, notes = {}, {}
    for i, spec in specs.items():
        blocks[i], notes[i] = init_attention(teacher.layers[i].block, cfg, spec, init, importance.get(i))
    return blocks, notes


def init_merges(teacher: BertForMaskedLM, specs: dict[int, LayerSpec], init: str,
                probe: dict[str, torch.Tensor] | None) -> tuple[dict[int, tuple[BertLayer, LayerSpec]], dict[int, str]]:
    """One layer per pair (i, i+1) in ``specs`` (first index -> spec), from the pair's first or second layer (heads
    ranked on ``probe`` on that layer's input), their average, or random. Returns ({i: (layer, spec)}, notes)."""
    cfg = teacher.config
    offset = {"first": 0, "second": 1}.get(init)
    rank = [i for i, s in specs.items() if offset is not None and probe is not None
            and s.num_heads < cfg.num_attention_heads]
    importance = head_rankings(teacher, probe, [i + offset for i in rank]) if rank else {}
    layers, notes = {}, {}
    for i, spec in specs.items():
        imp = importance.get(i + offset) if i in rank else None
        layer, notes[i] = init_merged_layer(cfg, spec, teacher.layers[i], teacher.layers[i + 1], init, imp)
        layers[i] = (layer, spec)
    return layers, notes


# ---- conditioned merges ----
def earlier_pairs(first: int) -> list[int]:
    """The pairs merged before pair (first, first+1) in a conditioned run: (first % 2, +1), ... up to first - 2."""
    return list(range(first % 2, first, 2))


def conditioned_teacher(teacher: BertForMaskedLM, source: str | Path, first: int, teacher_hash: str,
                        force: bool = False) -> tuple[BertForMaskedLM | None, list[str]]:
    """The teacher with the earlier pairs of ``first`` merged (their merged-layer checkpoints under ``source``):
    the model whose hidden states a conditioned pair learns from. (None, []) when there is no earlier pair."""
    from .assemble import build_student

    earlier = earlier_pairs(first)
    if not earlier:
        return None, []
    model, used = build_student(teacher, [source], teacher_hash, force,
                                keep=lambda m: m["kind"] == "merged_layer" and m["layers"][0] in earlier)
    got = [s.origin[0] for s in model.config.layers if s.kind == "merged"]
    if sorted(got) != earlier:
        raise FileNotFoundError(f"conditioned training of pair ({first}, {first + 1}) needs merged layers for pairs "
                                f"starting at {earlier} in '{source}'; found {len(got)}: {used}")
    return model, used
