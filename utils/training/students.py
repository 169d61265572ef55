"""Students from checkpoints: trained units (retrained blocks, merged layers) loaded and checked against the teacher,
put into a copy of it (``build_student``), whole models saved and loaded with their per-layer plan.

Any folder given is searched recursively for ``best`` (or ``last``) checkpoints, found by their metadata; a folder that
is itself a checkpoint is used as is. A ``model`` checkpoint among them becomes the base the others are applied to.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn

from models import LayerSpec, ModelConfig, SwappableAttention, SwappableLayer, SwappableModel, build_model
from models.compress import clone_model, compose, fit_problem, make_block, make_layer
from ..errors import SettingError
from ..storage.checkpoint import (CheckpointError, check_meta, find_checkpoints, load_checkpoint, load_into,
                                  save_checkpoint)
from .units import spec_from_meta

UNIT_KINDS = ("block", "merged_layer", "layer", "model")  # the checkpoint kinds a student is assembled from

log = logging.getLogger(__name__)


def _check(meta: dict[str, Any], path: Path, cfg: ModelConfig, *, teacher_hash: str, force: bool) -> None:
    check_meta(meta, path, force_teacher=force, teacher_hash=teacher_hash, hidden_size=cfg.hidden_size)


def load_block(path: Path, cfg: ModelConfig, teacher_hash: str, *, force: bool = False
               ) -> tuple[int, SwappableAttention]:
    """A retrained block and the teacher layer it replaces, checked against the teacher (``force``: another
    teacher's weights are accepted, never another shape)."""
    sd, meta, _ = load_checkpoint(path)
    check_meta(meta, path, kind="block")
    _check(meta, path, cfg, teacher_hash=teacher_hash, force=force)
    if not 0 <= meta["layer"] < len(cfg.layers):
        raise CheckpointError(f"checkpoint '{path}' is for layer {meta['layer']}, the teacher has {len(cfg.layers)}")
    attn = make_block(cfg, spec_from_meta(meta, cfg))
    load_into(attn, sd, path)
    return meta["layer"], attn


def load_merged_layer(path: Path, cfg: ModelConfig, teacher_hash: str, *, force: bool = False
                      ) -> tuple[int, SwappableLayer, LayerSpec]:
    """A merged layer, the first layer of the pair it replaces and its spec, checked against the teacher."""
    sd, meta, _ = load_checkpoint(path)
    check_meta(meta, path, kind="merged_layer")
    _check(meta, path, cfg, teacher_hash=teacher_hash, force=force)
    first, second = meta["layers"]
    if second != first + 1 or second >= len(cfg.layers):
        raise CheckpointError(f"checkpoint '{path}' merges layers {meta['layers']}, not a pair of this teacher")
    spec = spec_from_meta(meta, cfg)
    if spec.origin != [first, second]:
        raise CheckpointError(f"checkpoint '{path}': its spec stands for teacher layers {spec.origin}, its metadata "
                              f"says {meta['layers']}")
    layer = make_layer(cfg, spec)
    load_into(layer, sd, path)
    return first, layer, spec


def load_layer(path: Path, cfg: ModelConfig, teacher_hash: str, *, force: bool = False
               ) -> tuple[int, SwappableLayer, LayerSpec]:
    """A whole-layer unit, the teacher layer it stands for and its spec, checked against the teacher."""
    sd, meta, _ = load_checkpoint(path)
    check_meta(meta, path, kind="layer")
    _check(meta, path, cfg, teacher_hash=teacher_hash, force=force)
    spec = spec_from_meta(meta, cfg)
    if not 0 <= meta["layer"] < len(cfg.layers) or spec.origin != [meta["layer"]]:
        raise CheckpointError(f"checkpoint '{path}' is for layer {meta['layer']} (its spec: teacher layers "
                              f"{spec.origin}); the teacher has layers 0..{len(cfg.layers) - 1}")
    layer = make_layer(cfg, spec)
    load_into(layer, sd, path)
    return meta["layer"], layer, spec


def dropped_layers(cfg: ModelConfig, drop: Iterable[int]) -> dict[int, tuple[nn.Module, LayerSpec]]:
    """Teacher layer -> (an empty layer, its spec) for each layer of ``drop``: no attention, no feed-forward part, the
    identity (LayerSpec kind ``dropped``); for ``compose(layers=...)``."""
    out = {}
    for i in sorted(set(drop)):
        if not 0 <= i < len(cfg.layers):
            raise SettingError(f"`drop_layers`: layer {i} does not exist; the teacher has layers "
                               f"0..{len(cfg.layers) - 1}")
        spec = LayerSpec(0, 0, 0, [i], "dropped", attention="none")
        problem = fit_problem(cfg, spec)
        if problem:
            raise SettingError(f"`drop_layers`: a {cfg.family} model cannot drop a layer: {problem}")
        out[i] = (make_layer(cfg, spec), spec)
    return out


def save_model(model: SwappableModel, directory: str | Path, meta: dict[str, Any]) -> Path:
    """A whole model as a ``model`` checkpoint carrying its per-layer plan (``load_model`` rebuilds it alone)."""
    return save_checkpoint(directory, model.state_dict(),
                           {"kind": "model", "config": model.config.to_dict(), **meta})


def check_fits(cfg: ModelConfig, teacher_cfg: ModelConfig, where: str | Path) -> None:
    """A model used with (compared to, or built on) a teacher shares its vocabulary and hidden size; ``force`` accepts
    another teacher's weights, never another shape."""
    problems = [f"{key}: the model has {getattr(cfg, key)}, the teacher {getattr(teacher_cfg, key)}"
                for key in ("vocab_size", "hidden_size") if getattr(cfg, key) != getattr(teacher_cfg, key)]
    if problems:
        raise CheckpointError(f"model '{where}' does not fit this teacher: " + "; ".join(problems)
                              + " (it was built from a teacher of another shape or vocabulary)")


def load_model(directory: str | Path, teacher_hash: str | None = None, *, force: bool = False,
               teacher_config: ModelConfig | None = None) -> tuple[SwappableModel, dict[str, Any]]:
    """A saved compressed model, rebuilt from its checkpoint alone (the per-layer plan is in the metadata).

    With ``teacher_config``, the model must also fit that teacher (vocabulary and hidden size, see check_fits).
    """
    sd, meta, _ = load_checkpoint(directory)
    check_meta(meta, directory, kind="model")
    if teacher_hash is not None:
        check_meta(meta, directory, force_teacher=force, teacher_hash=teacher_hash)
    if teacher_config is not None:
        check_fits(ModelConfig.from_dict(meta["config"]), teacher_config, directory)
    model = build_model(ModelConfig.from_dict(meta["config"]))
    load_into(model, sd, directory)
    return model.eval(), meta


def build_student(teacher: SwappableModel, roots: Iterable[str | Path], teacher_hash: str, *, force: bool = False,
                  which: str = "best", keep: Callable[[dict[str, Any]], bool] | None = None,
                  drop: Iterable[int] = ()) -> tuple[SwappableModel, list[str]]:
    """Teacher + every block / merged layer / whole layer / model checkpoint under ``roots`` (those ``keep``
    accepts), with the teacher layers ``drop`` dropped (``dropped_layers``).

    Returns (an independent model, a description of each source).
    """
    drop = sorted(set(drop))
    found = find_checkpoints(list(roots), UNIT_KINDS, which) if roots else []
    if keep is not None:
        found = [(p, m) for p, m in found if keep(m)]
    if not found and not drop:
        raise CheckpointError(f"no '{which}' block, merged-layer, layer or model checkpoint under "
                              f"{list(map(str, roots))}")
    cfg = teacher.config
    base, sources = teacher, []
    models = [(p, m) for p, m in found if m["kind"] == "model"]
    if len(models) > 1:
        raise CheckpointError(f"more than one model checkpoint to start from: {[str(p) for p, _ in models]}")
    if models:
        base, _ = load_model(models[0][0], teacher_hash, force=force, teacher_config=cfg)
        base = base.to(next(teacher.parameters()).device)
        sources.append(f"base model {models[0][0]}")
    units = _load_units([(p, m) for p, m in found if m["kind"] != "model"], cfg, teacher_hash=teacher_hash,
                        force=force, drop=drop)
    sources += units.sources + [f"dropped layer {i}" for i in drop]
    device = next(teacher.parameters()).device
    layers = {**units.layers, **dropped_layers(cfg, drop)}
    for m in list(units.blocks.values()) + [l for l, _ in [*units.merges.values(), *layers.values()]]:
        m.to(device)
    model = clone_model(compose(base, units.blocks, units.merges, layers=layers)).eval()
    return model, sources


@dataclass
class _Units:
    """Trained units read from checkpoints, by the first teacher layer each stands for."""

    blocks: dict[int, nn.Module] = field(default_factory=dict)
    merges: dict[int, tuple[nn.Module, LayerSpec]] = field(default_factory=dict)
    layers: dict[int, tuple[nn.Module, LayerSpec]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def _load_units(found: list[tuple[Path, dict[str, Any]]], cfg: ModelConfig, *, teacher_hash: str, force: bool,
                drop: list[int]) -> _Units:
    """The block, merged-layer and whole-layer checkpoints ``found``; a teacher layer replaced twice (or replaced and
    dropped) is refused."""
    units = _Units()
    where: dict[int, Path | str] = {i: "`drop_layers`" for i in drop}
    for path, meta in found:
        if meta["kind"] == "block":
            i, attn = load_block(path, cfg, teacher_hash, force=force)
            covered = [i]
            units.blocks[i] = attn
        elif meta["kind"] == "layer":
            i, layer, spec = load_layer(path, cfg, teacher_hash, force=force)
            covered = [i]
            units.layers[i] = (layer, spec)
        else:
            i, layer, spec = load_merged_layer(path, cfg, teacher_hash, force=force)
            covered = [i, i + 1]
            units.merges[i] = (layer, spec)
        for c in covered:
            if c in where:
                raise CheckpointError(f"teacher layer {c} is replaced twice: by {_named(where[c])} and '{path}'; "
                                      "pass only one of them")
            where[c] = path
        spec = spec_from_meta(meta, cfg)
        ffn = "" if meta["kind"] == "block" else f" ffn={spec.intermediate_size}"
        units.sources.append(f"{meta['kind']} {covered} h={spec.num_heads} d={spec.head_dim}"
                             f"{spec.attention_note()}{ffn} from {path}")
    return units


def _named(where: Path | str) -> str:
    return where if isinstance(where, str) else f"'{where}'"


def newest_units(path: str | Path, kind: str, firsts: list[int]) -> dict[int, tuple[Path, dict[str, Any]]]:
    """The newest ``best`` checkpoint (path, metadata) of ``kind`` (block or merged_layer) under ``path`` for each
    first teacher layer in ``firsts``: where new units start from."""
    newest: dict[int, tuple[Path, dict[str, Any]]] = {}
    for p, m in find_checkpoints([path], [kind], "best"):
        first = m["layers"][0] if kind == "merged_layer" else m["layer"]
        if first in firsts and m.get("saved_at", "") >= newest.get(first, (None, {}))[1].get("saved_at", ""):
            newest[first] = (p, m)
    missing = [i for i in firsts if i not in newest]
    if missing:
        what = ("merged-layer checkpoint for pair(s) starting at" if kind == "merged_layer"
                else f"{kind} checkpoint for layer(s)")
        raise CheckpointError(f"`start_from` '{path}' holds no {what} {missing}")
    return newest


def earlier_pairs(first: int) -> list[int]:
    """The pairs merged before pair (first, first+1) in a conditioned run: (first % 2, +1), ... up to first - 2."""
    return list(range(first % 2, first, 2))


def conditioned_teacher(teacher: SwappableModel, source: str | Path, first: int, *, teacher_hash: str,
                        force: bool = False) -> tuple[SwappableModel | None, list[str]]:
    """The teacher with the earlier pairs of ``first`` merged (their merged-layer checkpoints under ``source``):
    the model whose hidden states a conditioned pair learns from. (None, []) when there is no earlier pair."""
    earlier = earlier_pairs(first)
    if not earlier:
        return None, []
    model, used = build_student(teacher, [source], teacher_hash, force=force,
                                keep=lambda m: m["kind"] == "merged_layer" and m["layers"][0] in earlier)
    got = [s.origin[0] for s in model.config.layers if s.kind == "merged"]
    if sorted(got) != earlier:
        raise FileNotFoundError(f"conditioned training of pair ({first}, {first + 1}) needs merged layers for pairs "
                                f"starting at {earlier} in '{source}'; found {len(got)}: {used}")
    return model, used
