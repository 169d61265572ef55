"""Which layers can be simplified, and by how much: a per-layer sensitivity map and a planner over it.

The map: for every teacher layer and every option (fewer heads, half the head_dim, merged with the next layer, half
the feed-forward width, and combinations within one unit: fewer heads *and* a narrower FFN in one layer or in a
merged pair, which reach deeper budgets than one option per layer can) one unit is initialised from the teacher
(``models.compress``), retrained alone against the teacher's features (the distillation tasks of
``utils.training.tasks`` on the one ``Trainer``, one shared teacher cache), put alone into the teacher, and measured on
the validation split (``utils.evaluation.metrics.compare_models``): top-1 drop, agreement, KL. Each unit's latency and
the teacher layers' it replaces are timed round-robin on the device. The planner over the map is ``planner``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

import torch
from torch import nn

from models.base import SwappableModel
from models.compress import compose, init_attention, init_merged_layer
from models.config import LayerSpec
from models.hf import weights_hash
from models.staging import read_kept, write_kept, write_staged
from ..evaluation.metrics import UnitEvaluator
from ..evaluation.speed import LoadLog, Timing, load_text
from ..storage.checkpoint import load_checkpoint, load_into, read_meta
from ..storage.features import TeacherCache
from ..training.loop import TrainConfig, Trainer, Unit, run_setup, stored_unit_meta
from ..training.tasks import BlockDistill, LayerDistill, MergeDistill, describe_losses
from ..errors import SettingError
from ..training.units import head_rankings, narrows_ffn, neuron_rankings, refit_setup, unit_meta
from .planner import COSTS, PlanError

log = logging.getLogger(__name__)

KINDS = ("block", "merge", "ffn", "layer", "drop")
SPEC_KIND = {"block": "block", "merge": "merged", "ffn": "layer", "layer": "layer", "drop": "dropped"}  # -> LayerSpec
TASK_KIND = {"block": "block", "merge": "merge", "ffn": "layer", "layer": "layer"}  # option kind -> training task
OPTION_KINDS = ("heads", "head_dim", "merge", "ffn", "combined")  # what default_options maps for a masked LM
DECODER_OPTION_KINDS = ("kv", "heads", "linear", "ffn", "no_attention", "drop", "merge")  # ... for a causal LM
ALL_OPTION_KINDS = tuple(dict.fromkeys(OPTION_KINDS + DECODER_OPTION_KINDS))


@dataclass(frozen=True)
class Option:
    """One way to simplify one layer: ``kind`` block (the attention block of the given shape), merge (this layer and
    the next become one layer of the given shape / feed-forward width), ffn (feed-forward width; the teacher's
    attention), layer (a whole layer of the given attention and feed-forward width: several options in one unit) or
    drop (the layer removed: attention none, no feed-forward part; nothing to train). ``attention`` and
    ``num_kv_heads`` are the attention kind's (``models.kinds``); kinds without heads have 0 heads of size 0."""

    name: str
    kind: str
    num_heads: int
    head_dim: int
    ffn: int
    attention: str = "mha"
    num_kv_heads: int | None = None

    def applies(self, layer: int, n_layers: int) -> bool:
        return self.kind != "merge" or layer + 1 < n_layers

    def covers(self, layer: int) -> list[int]:
        return [layer, layer + 1] if self.kind == "merge" else [layer]

    def spec(self, layer: int, teacher_cfg) -> LayerSpec:
        """The unit's whole layer spec at ``layer`` (a block keeps the teacher layer's feed-forward size)."""
        ffn = teacher_cfg.layers[layer].intermediate_size if self.kind == "block" else self.ffn
        return LayerSpec(self.num_heads, self.head_dim, ffn, self.covers(layer), SPEC_KIND[self.kind],
                         attention=self.attention, num_kv_heads=self.num_kv_heads)

    @property
    def trained(self) -> bool:
        return self.kind != "drop"


def default_options(cfg, heads: list[int] | None = None, kinds: tuple[str, ...] | None = None, *, task: str = "mlm"
                    ) -> list[Option]:
    """Options adapted to the teacher (``task``: its ``TASK``; ``kinds``: which of them, default all of the task's)."""
    if task == "causal":
        return decoder_options(cfg, heads, kinds or DECODER_OPTION_KINDS)
    return encoder_options(cfg, heads, kinds or OPTION_KINDS)


def encoder_options(cfg, heads: list[int] | None = None, kinds: tuple[str, ...] = OPTION_KINDS) -> list[Option]:
    """A masked LM's options: head counts 2/3, 1/2, 1/3, 1/6 of its own (12 -> 8, 6, 4, 2) unless ``heads`` is
    given, head_dim halved, merge with the next layer, FFN width halved; combined: 1/3 of the heads with half the FFN
    and 1/6 of the heads with a quarter of it in one layer, and a merged pair with half the heads and half the FFN
    (12 heads / 1536: heads 4 ffn 768, heads 2 ffn 384, merge heads 6 ffn 768)."""
    H, d, f = cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
    if heads is None:
        heads = sorted({max(1, round(H * r)) for r in (2 / 3, 1 / 2, 1 / 3, 1 / 6)} - {H}, reverse=True)
    out = []
    if "heads" in kinds:
        out += [Option(f"heads {h}", "block", h, d, f) for h in heads]
    if "head_dim" in kinds and d >= 2:
        out.append(Option(f"head_dim {d // 2}", "block", H, d // 2, f))
    if "merge" in kinds:
        out.append(Option("merge next", "merge", H, d, f))
    if "ffn" in kinds and f >= 2:
        out.append(Option(f"ffn {f // 2}", "ffn", H, d, f // 2))
    if "combined" in kinds and f >= 4:
        for h, width in ((max(1, round(H / 3)), f // 2), (max(1, round(H / 6)), f // 4)):
            out.append(Option(f"heads {h} ffn {width}", "layer", h, d, width))
        out.append(Option(f"merge heads {max(1, H // 2)} ffn {f // 2}", "merge", max(1, H // 2), d, f // 2))
    if not out:
        raise ValueError(f"no option to map: choose from {', '.join(OPTION_KINDS)} (got {kinds})")
    return out


def _gqa(heads: int, kv: int) -> dict[str, Any]:
    """The attention fields of ``heads`` query heads over ``kv`` key/value heads (one each: plain multi-head)."""
    return {"attention": "mha"} if kv == heads else {"attention": "gqa", "num_kv_heads": kv}


def decoder_options(cfg, heads: list[int] | None = None, kinds: tuple[str, ...] = DECODER_OPTION_KINDS
                    ) -> list[Option]:
    """A decoder's options (the teacher: H query heads over G key/value heads, FFN f): one key/value head (multi-query);
    fewer query heads (2/3 and 1/3 of H, multiples of G, unless ``heads`` is given), each group keeping its best;
    attention replaced by a linear map; FFN at 3/4, 1/2, 1/4; attention removed (the FFN retrained), and removed with
    half the FFN; the layer dropped; merged with the next layer (SmolLM2, 9 / 3 heads, FFN 1536: kv 1, heads 6,
    heads 3, linear, ffn 1152 / 768 / 384, no attention, no attention ffn 768, drop, merge next)."""
    H, d, f = cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
    G = cfg.layers[0].kv_heads
    teacher = _gqa(H, G)
    if heads is None:
        heads = sorted({max(G, round(H * r / G) * G) for r in (2 / 3, 1 / 3)} - {H}, reverse=True)
    out = []
    if "kv" in kinds and G > 1:
        out.append(Option("kv 1", "block", H, d, f, "gqa", 1))
    if "heads" in kinds:
        out += [Option(f"heads {h}", "block", h, d, f, **_gqa(h, G)) for h in heads if h % G == 0]
    if "linear" in kinds:
        out.append(Option("linear", "block", 0, 0, f, "linear"))
    if "ffn" in kinds:
        out += [Option(f"ffn {w}", "ffn", H, d, w, **teacher) for w in (f * 3 // 4, f // 2, f // 4) if w > 0]
    if "no_attention" in kinds:
        out += [Option("no attention", "layer", 0, 0, f, "none"),
                Option(f"no attention ffn {f // 2}", "layer", 0, 0, f // 2, "none")]
    if "drop" in kinds:
        out.append(Option("drop", "drop", 0, 0, 0, "none"))
    if "merge" in kinds:
        out.append(Option("merge next", "merge", H, d, f, **teacher))
    if not out:
        raise ValueError(f"no option to map: choose from {', '.join(DECODER_OPTION_KINDS)} (got {kinds})")
    return out


def option_from_dict(d: dict[str, Any]) -> Option:
    return Option(**{k: d[k] for k in ("name", "kind", "num_heads", "head_dim", "ffn")},
                  attention=d.get("attention", "mha"), num_kv_heads=d.get("num_kv_heads"))


class AliasedCache:
    """A ``TeacherCache`` read under every feature name the tasks ask for: ``out_i`` is the stored ``in_{i+1}``
    (the same tensor), so blocks, merges and whole layers share one copy of each hidden state."""

    def __init__(self, cache: TeacherCache, n_layers: int):
        self.cache, self.n = cache, n_layers

    def canonical(self, name: str) -> str:
        kind, _, i = name.partition("_")
        return f"in_{int(i) + 1}" if kind == "out" and int(i) + 1 < self.n else name

    def batch(self, names: list[str], index: torch.Tensor, *, length: int, device: torch.device
              ) -> dict[str, torch.Tensor]:
        real = {n: self.canonical(n) for n in names}
        got = self.cache.batch(sorted(set(real.values())), index, length=length, device=device)
        return {n: got[r] for n, r in real.items()}


def cache_names(n_layers: int) -> list[str]:
    """Every feature the map's units need, each hidden state once."""
    return [f"in_{i}" for i in range(n_layers)] + [f"block_{i}" for i in range(n_layers)] + [f"out_{n_layers - 1}"]


@dataclass
class Context:
    """What training and measuring units needs; built from a Session by ``utils.planning.students.context``."""

    teacher: SwappableModel
    teacher_hash: str
    teacher_name: str
    tokenizer: Any
    device: torch.device
    train_loader: Any
    sampler: Any
    valid_loader: Any
    eval_hash: str  # of the windows / sentences of valid_loader, on which units are measured (their reuse's key)
    probe: dict[str, torch.Tensor]
    train_cfg: TrainConfig
    # the first training tokens a narrower feed-forward part is ranked and refit on (None: no refit; ``probe``)
    ffn_probe: dict[str, torch.Tensor] | None = None
    cache: AliasedCache | None = None
    valid_batches: int | None = None  # per-epoch validation loss on this many batches
    setup: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    block_loss: tuple[str, ...] = ("output",)
    relation_weight: float = 1.0


@dataclass
class Built:
    """A unit made for ``layer`` and ``option``: the module, the layer spec it gives the model, how it started."""

    layer: int
    option: Option
    module: nn.Module
    spec: LayerSpec
    note: str


def unit_specs(ctx: Context, choices: dict[int, Option]) -> dict[int, LayerSpec]:
    """The layer spec each of ``choices`` (first teacher layer -> Option) gives the model; raises where an option
    does not apply to its layer or its kind is unknown."""
    t, cfg = ctx.teacher, ctx.teacher.config
    specs: dict[int, LayerSpec] = {}
    for i, opt in sorted(choices.items()):
        if not opt.applies(i, len(t.layers)):
            raise ValueError(f"option '{opt.name}' does not apply to layer {i} "
                             f"(the teacher has {len(t.layers)} layers)")
        if opt.kind not in SPEC_KIND:
            raise ValueError(f"unknown option kind '{opt.kind}'; expected one of {KINDS}")
        try:
            specs[i] = opt.spec(i, cfg)
        except ValueError as e:
            raise SettingError(f"option '{opt.name}' at layer {i}: {e}") from None
    return specs


def build_units(ctx: Context, choices: dict[int, Option], *, no_refit: Collection[int] = ()) -> dict[int, Built]:
    """Teacher-initialised units (query heads ranked on the probe batch, SVD head_dim, feed-forward neurons ranked by
    activation on it, a single layer's instead on the refit probe, where its output projection is then refit; a
    merged pair from its first layer), built by ``models.compress`` as the scripts build theirs; a dropped layer is
    an empty layer. Layers in ``no_refit`` (whose trained weights are loaded over the start) skip the refit."""
    t, cfg = ctx.teacher, ctx.teacher.config
    specs = unit_specs(ctx, choices)
    importance = head_rankings(t, ctx.probe, [i for i, s in specs.items() if s.attention in ("mha", "gqa")
                                              and s.num_heads < cfg.layers[i].num_heads])
    narrow = [i for i, s in specs.items() if narrows_ffn(cfg, i, s)]
    refit = [i for i in narrow if choices[i].kind != "merge" and ctx.ffn_probe is not None and i not in no_refit]
    neurons = {**neuron_rankings(t, ctx.probe, [i for i in narrow if i not in refit]),
               **neuron_rankings(t, ctx.ffn_probe, refit, keep_inputs=True)}
    out = {}
    for i, opt in sorted(choices.items()):
        spec = specs[i]
        if opt.kind == "block":
            mod, note = init_attention(t.layers[i].block, cfg, spec, importance=importance.get(i))
        else:  # a merged pair starts from its first layer; a narrower layer from the layer itself
            second = t.layers[i + 1] if opt.kind == "merge" else t.layers[i]
            n = neurons.get(i)
            mod, note = init_merged_layer(cfg, spec, t.layers[i], second=second, mode="first",
                                          importance=importance.get(i), neuron_score=n.scores if n else None,
                                          ffn_inputs=n.inputs if n else None)
        out[i] = Built(i, opt, mod.to(ctx.device), spec, note)
    return out


def train_units(ctx: Context, units: dict[int, Built], run_dir: Path) -> dict[str, float]:
    """Train every unit against the teacher's features (each kind on its task, all layers of a kind together on one
    shared teacher pass or the cache) with the shared Trainer; afterwards each module holds its best (validation)
    weights. Returns the final validation losses."""
    t, cfg = ctx.teacher, ctx.teacher.config
    finals: dict[str, float] = {}
    groups = {k: {i: b for i, b in units.items() if TASK_KIND.get(b.option.kind) == k}
              for k in ("block", "merge", "layer")}  # a dropped layer has nothing to train
    for kind, group in groups.items():
        if not group:
            continue
        if kind == "block":
            task = BlockDistill(t, {i: b.module for i, b in group.items()}, list(ctx.block_loss), cache=ctx.cache,
                                seed=ctx.train_cfg.seed, relation_weight=ctx.relation_weight)
            prefix, ukind = "block", "block"
        elif kind == "merge":
            task = MergeDistill(t, {i: (b.module, b.spec) for i, b in group.items()}, "hidden", cache=ctx.cache,
                                seed=ctx.train_cfg.seed)
            prefix, ukind = "merge", "merged_layer"
        else:
            task = LayerDistill(t, {i: (b.module, b.spec) for i, b in group.items()}, cache=ctx.cache,
                                seed=ctx.train_cfg.seed)
            prefix, ukind = "layer", "layer"
        task = task.to(ctx.device)
        tl = []
        for i, b in group.items():
            meta = unit_meta(ukind, b.spec, cfg, teacher=ctx.teacher_name, teacher_hash=ctx.teacher_hash,
                             **describe_losses(task), option=b.option.name, init=b.note)
            tl.append(Unit(f"{prefix}_{i}", b.module, run_dir / f"{prefix}_{i}", meta))
        trainer = Trainer(task, tl, ctx.train_cfg.unsharded(), run_dir=run_dir, device=ctx.device,
                          evaluate=lambda task=task: task.evaluate(ctx.valid_loader, ctx.valid_batches),
                          run_meta={"run_dir": str(run_dir)}, setup=unit_setup(ctx, group), record=ctx.record)
        finals.update(trainer.fit(ctx.train_loader, ctx.sampler))
        for u in tl:
            sd, _, _ = load_checkpoint(u.out_dir / "best")
            load_into(u.module, sd, u.out_dir / "best")
    return finals


def plan_refit(ctx: Context, choices: dict[int, Option], specs: dict[int, LayerSpec]) -> dict[str, int]:
    """``{"ffn_refit_tokens": N}`` where a single layer's feed-forward part among ``choices`` (of ``specs``,
    ``unit_specs``) starts from the refit (``training.units.refit_setup``), else empty."""
    if ctx.ffn_probe is None:
        return {}
    single = {i: specs[i] for i, o in choices.items() if o.kind in ("ffn", "layer")}
    return refit_setup(ctx.teacher.config, single, ctx.train_cfg.ffn_refit_tokens)


def unit_setup(ctx: Context, units: dict[int, Built]) -> dict[str, Any]:
    """The training setup of ``units`` trained together: the context's, and the refit where there was one."""
    return {**ctx.setup, **plan_refit(ctx, {i: b.option for i, b in units.items()},
                                      {i: b.spec for i, b in units.items()})}


def map_trained(ctx: Context, choices: dict[int, Option], folder: Path) -> dict[int, Path]:
    """The units of ``choices`` a map already trained in ``folder`` (its ``units/``: same option, layer, teacher and
    training setup, trained for all the epochs asked): layer -> the unit's folder. Known before any unit is built,
    so those units need neither the refit nor training (``load_map_trained``)."""
    specs = unit_specs(ctx, choices)
    found = {}
    for i, opt in sorted(choices.items()):
        kind = TASK_KIND.get(opt.kind)
        if kind is None:  # a dropped layer: nothing to train
            continue
        d = folder / opt.name.replace(" ", "_") / f"{kind}_{i}"
        setup = {**ctx.setup, **plan_refit(ctx, {i: opt}, {i: specs[i]})}
        why = _trained_elsewhere(d, opt, ctx, setup=json.loads(json.dumps(run_setup(ctx.train_cfg, setup))))
        if why:
            log.info("layer %d %s: training it (%s)", i, opt.name, why)
        else:
            found[i] = d
    return found


def load_map_trained(units: dict[int, Built], found: dict[int, Path]) -> None:
    """Load into ``units`` the map's trained units ``found`` (``map_trained``); their notes say how the map's unit
    started and where it was trained."""
    for i, d in found.items():
        sd, _, _ = load_checkpoint(d / "best")
        load_into(units[i].module, sd, d / "best")
        started = read_meta(d / "best").get("init") or units[i].note
        units[i].note = f"{started}; trained by the map ({d})"


def _trained_elsewhere(d: Path, option: Option, ctx: Context, *, setup: dict[str, Any]) -> str | None:
    """Why the unit in ``d`` cannot stand for a unit of ``option`` trained with ``setup`` (None: it can)."""
    if not (d / "best" / "meta.json").is_file() or not (d / "run.json").is_file():
        return f"no trained unit in '{d}'"
    last = json.loads((d / "last" / "meta.json").read_text()) if (d / "last" / "meta.json").is_file() else {}
    if last.get("teacher_hash") != ctx.teacher_hash or last.get("option") != option.name:
        return f"'{d}' holds another teacher's or option's unit"
    if option.kind == "block" and last.get("loss_on") != list(ctx.block_loss):
        return f"'{d}' was trained on {last.get('loss_on')}, not {list(ctx.block_loss)}"
    if last.get("epoch", 0) < ctx.train_cfg.epochs:
        return f"'{d}' trained {last.get('epoch', 0)} of {ctx.train_cfg.epochs} epochs"
    theirs = json.loads((d / "run.json").read_text()).get("setup") or {}
    diffs = sorted(k for k in set(theirs) | set(setup) if theirs.get(k) != setup.get(k))
    if diffs:
        return f"'{d}' was trained with another {', '.join(f'{k} ({theirs.get(k)!r})' for k in diffs)}"
    return None


def compose_units(teacher: SwappableModel, units: dict[int, Built]) -> SwappableModel:
    """The teacher with every unit in place (sharing the teacher's other modules; nothing is copied)."""
    return compose(teacher, blocks={i: b.module for i, b in units.items() if b.option.kind == "block"},
                   merges={i: (b.module, b.spec) for i, b in units.items() if b.option.kind == "merge"},
                   layers={i: (b.module, b.spec) for i, b in units.items()
                           if b.option.kind in ("ffn", "layer", "drop")})


# ---------------------------------------------------------------------------------------------------------------
# timing
def _layer_with(layer: nn.Module, attention: nn.Module) -> nn.Module:
    new = copy.copy(layer)
    new._modules = dict(layer._modules)
    new.set_block(attention)
    return new


def encoder_inputs(teacher: SwappableModel, *, batch: int, seq: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, teacher.config.vocab_size - 1), teacher.config.vocab_size, (batch, seq), generator=g)
    return ids.to(device), torch.ones(batch, seq, dtype=torch.long, device=device)


def speed_fn(model: SwappableModel, speed: str, *, batch: int, seq: int) -> Callable[[], Any]:
    """What ``speed`` times for a whole model: ``prefill``, a batch x seq pass without the vocabulary projection (the
    encoder pass of a masked LM); ``decode``, one new token after ``seq`` cached ones, its logits included."""
    device = next(model.parameters()).device
    ids, att = encoder_inputs(model, batch=batch, seq=seq, device=device)
    if speed == "prefill":
        return lambda: model(ids, att, with_logits=False)
    one, step = ids[:1, :1], model.context(None, 1, cache=PastCache(seq))
    return lambda: model.lm_logits(model.run_layers(model.embed(one), step)[:, -1])


class PastCache:
    """A KV cache holding ``length`` random past tokens per attention block, for timing one decode step: a new
    token attends to them and its own key and value, and nothing is kept, so every call costs the same."""

    def __init__(self, length: int):
        self.length = length
        self.past: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, block: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if block not in self.past:
            shape = (k.shape[0], k.shape[1], self.length, k.shape[3])
            self.past[block] = (torch.randn(shape, dtype=k.dtype, device=k.device),
                                torch.randn(shape, dtype=v.dtype, device=v.device))
        pk, pv = self.past[block]
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def _unit_module(teacher: SwappableModel, b: Built) -> nn.Module:
    """What a unit replaces, as a whole layer (a block inside a copy of its teacher layer)."""
    mod = _layer_with(teacher.layers[b.layer], b.module) if b.option.kind == "block" else b.module
    return mod.eval()


@torch.no_grad()
def time_units(teacher: SwappableModel, units: list[Built], timing: Timing) -> dict[str, Any]:
    """Latency of the teacher (embeddings + layers, no vocabulary projection), of its embeddings and of each of its
    layers, and of each unit as the layer(s) it replaces, on one batch x seq input, timed round-robin (``timing``; its
    settings are recorded beside the numbers). For a causal
    LM also one decode step: one new token after ``seq`` cached ones (``decode_ms`` for the whole model, its
    vocabulary projection included, ``decode_layer_ms``, ``decode_unit_ms``). ``load``: the machine's load average
    while they ran (``LoadLog.summary``), which tells a timing shared with other work."""
    device, batch, seq = next(teacher.parameters()).device, timing.batch, timing.seq
    ids, att = encoder_inputs(teacher, batch=batch, seq=seq, device=device)
    h, ctx = teacher.embed(ids), teacher.context(None, seq)
    fns: dict[str, Callable[[], Any]] = {"encoder": lambda: teacher(ids, att, with_logits=False),
                                         "embeddings": lambda: teacher.embed(ids)}
    mods = {f"layer {i}": layer for i, layer in enumerate(teacher.layers)}
    mods.update({f"{b.layer}/{b.option.name}": _unit_module(teacher, b) for b in units})
    fns.update({k: (lambda m=m: m(h, ctx)) for k, m in mods.items()})
    causal = teacher.TASK == "causal"
    if causal:
        one, past = ids[:1, :1], PastCache(seq)
        step = teacher.context(None, 1, cache=past)
        h1 = teacher.embed(one)
        fns["decode"] = lambda: teacher.lm_logits(teacher.run_layers(teacher.embed(one), step)[:, -1])
        fns.update({f"decode {k}": (lambda m=m: m(h1, step)) for k, m in mods.items()})
    load = LoadLog()
    ms = timing.ms(fns, device, load=load)
    n = len(teacher.layers)
    out = {"encoder_ms": ms["encoder"], "embeddings_ms": ms["embeddings"],
           "layer_ms": [ms[f"layer {i}"] for i in range(n)],
           "unit_ms": {k: v for k, v in ms.items() if "/" in k and not k.startswith("decode")},
           "batch": batch, "seq": seq, "reps": timing.reps, "threads": timing.threads_used(), "load": load.summary()}
    if causal:
        out.update(decode_ms=ms["decode"], decode_layer_ms=[ms[f"decode layer {i}"] for i in range(n)],
                   decode_unit_ms={k[len("decode "):]: v for k, v in ms.items()
                                   if k.startswith("decode ") and "/" in k},
                   decode_past=seq)
    return out


def kv_bytes_saved(cfg, covers: list[int], spec: LayerSpec) -> int:
    """KV-cache bytes per token (fp16 keys and values) a unit of ``spec`` saves against the teacher layers it covers."""
    kv = sum(cfg.layers[j].kv_heads * cfg.layers[j].head_dim for j in covers)
    return 2 * 2 * (kv - spec.kv_heads * spec.head_dim)


def unit_savings(teacher: SwappableModel, b: Built, timing: dict[str, Any] | None) -> dict[str, float]:
    """What a unit saves against the teacher layer(s) it replaces: parameters, KV-cache bytes per token (fp16) and,
    with ``timing``, prefill (encoder) ms and decode ms."""
    covers = b.option.covers(b.layer)
    out: dict[str, float] = {"params_saved": replaced_params(teacher, b),
                             "kv_bytes_saved": kv_bytes_saved(teacher.config, covers, b.spec)}
    key = f"{b.layer}/{b.option.name}"
    if timing:
        out["unit_ms"] = timing["unit_ms"][key]
        out["latency_saved_ms"] = sum(timing["layer_ms"][j] for j in covers) - out["unit_ms"]
    if timing and "decode_ms" in timing:
        out["decode_unit_ms"] = timing["decode_unit_ms"][key]
        out["decode_saved_ms"] = sum(timing["decode_layer_ms"][j] for j in covers) - out["decode_unit_ms"]
    return out


def replaced_params(teacher: SwappableModel, b: Built) -> int:
    """Parameters the unit removes from the model (teacher modules it replaces minus its own)."""
    own = sum(p.numel() for p in b.module.parameters())
    if b.option.kind == "block":
        old = sum(p.numel() for p in teacher.layers[b.layer].block.parameters())
    else:
        old = sum(p.numel() for i in b.option.covers(b.layer) for p in teacher.layers[i].parameters())
    return old - own


# ---------------------------------------------------------------------------------------------------------------
# the map
REPORTED = ("student_top1", "agreement_top1", "kl_teacher_student", "hidden_cosine")


def build_map(ctx: Context, options: list[Option], layers: list[int], *, run_dir: Path, timing: Timing
              ) -> dict[str, Any]:
    """Train, measure (on ``ctx.valid_loader``) and time (``timing``) every (layer, option) unit; one option's units
    (all layers) train together. An option whose units a stopped run trained and measured is neither trained nor
    measured again (``measured.json`` beside them); its units are timed with the others."""
    teacher = ctx.teacher
    n = len(teacher.layers)
    t0 = time.perf_counter()
    judge = UnitEvaluator(teacher, ctx.valid_loader, device=ctx.device)
    base = judge.teacher_metrics()
    entries, all_units = [], []
    for opt in options:
        choices = {i: opt for i in layers if opt.applies(i, n)}
        if not choices:
            continue
        t1 = time.perf_counter()
        folder = run_dir / opt.name.replace(" ", "_")
        resumed = _resumed_starts(ctx, opt, layers=list(choices), folder=folder)
        units = build_units(ctx, choices, no_refit=resumed)  # resumed units continue from their own weights
        for i, note in resumed.items():
            units[i].note = note or units[i].note
        finals = train_units(ctx, units, folder)  # units a stopped run trained are loaded, not trained again
        train_s = time.perf_counter() - t1
        all_units.extend(units.values())
        key = measurement_key(ctx, opt, units)
        done = measured_before(folder / MEASURED, key)
        if done is not None:
            log.info("map: %s on layers %s measured by an earlier run of these units (%s)", opt.name,
                     [e["layer"] for e in done], folder / MEASURED)
            entries.extend(done)
            continue
        mine = []
        for i, b in units.items():
            m = judge.measure(compose_units(teacher, {i: b}), start=i)
            e = {"layer": i, "option": opt.name, "kind": opt.kind, "covers": opt.covers(i),
                 "num_heads": opt.num_heads, "head_dim": opt.head_dim, "ffn": opt.ffn, "attention": opt.attention,
                 "num_kv_heads": opt.num_kv_heads, "init": b.note, "train_s_option": round(train_s, 1),
                 "val_loss": next((v for k, v in finals.items() if k.endswith(f"_{i}/loss")), None)}
            e.update(_quality(m, base))
            mine.append(e)
            log.info("map: layer %d %-12s top-1 drop %s  agreement %s  KL %s%s", i, opt.name,
                     _f(e.get("top1_drop")), _f(e.get("agreement_top1")), _f(e.get("kl_teacher_student")),
                     f"  perplexity x{e['perplexity_ratio']:.4f}" if "perplexity_ratio" in e else "")
        entries.extend(mine)
        write_kept(folder / MEASURED, key, {"entries": mine})
    timed = time_units(teacher, all_units, timing)
    by_key = {(b.layer, b.option.name): b for b in all_units}
    for e in entries:
        e.update(unit_savings(teacher, by_key[(e["layer"], e["option"])], timed))
    return {"teacher": ctx.teacher_name, "teacher_hash": ctx.teacher_hash, "layers": n, "task": teacher.TASK,
            "options": [asdict(o) for o in options], "mapped_layers": layers,
            "teacher_params": teacher.num_parameters(),
            "teacher_kv_bytes_per_token": teacher.config.kv_cache_bytes_per_token(),
            "teacher_metrics": {k: base[k] for k in ("teacher_top1", "teacher_top5", "sentences", "teacher_perplexity",
                                                      "predicted_tokens") if k in base},
            "eval_sentences": base.get("predicted_tokens", base["sentences"]), "timing": timed, "entries": entries,
            "device": str(ctx.device), "wall_s": round(time.perf_counter() - t0, 1)}


def _resumed_starts(ctx: Context, opt: Option, *, layers: list[int], folder: Path) -> dict[int, str]:
    """How each unit of ``opt`` on ``layers`` started (layer -> note), read from its resume point in ``folder``, where
    the run resumes and every one of them has a point: the Trainer then continues from those weights, so their start
    (a refit's teacher pass among it) is not needed. Empty otherwise."""
    kind = TASK_KIND.get(opt.kind)
    if kind is None or not ctx.train_cfg.resume:
        return {}
    notes = {}
    for i in layers:
        meta = stored_unit_meta(folder / f"{kind}_{i}")
        if meta is None:
            return {}
        notes[i] = meta.get("init", "")
    return notes


MEASURED = "measured.json"  # beside an option's units: their map entries, for a run that was stopped after them


def measurement_key(ctx: Context, opt: Option, units: dict[int, Built]) -> dict[str, Any]:
    """What one option's measurements depend on: the teacher, the evaluation text, the device, the option and each
    unit's weights as trained (hashed as a resume point checks them)."""
    return {"teacher_hash": ctx.teacher_hash, "eval_hash": ctx.eval_hash, "device": str(ctx.device),
            "option": asdict(opt), "units": {str(i): weights_hash(b.module) for i, b in sorted(units.items())}}


def measured_before(path: Path, key: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The entries an earlier run measured for exactly ``key`` (same teacher, text, device and unit weights), from
    ``path``; None when there are none, or they are for anything else, or the file cannot be read."""
    kept = read_kept(path, key)
    return None if kept is None else kept.get("entries")


def _quality(m: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A unit's map entry from its metrics: the reported ones and the drops against the teacher (``COSTS``)."""
    e = {k: m[k] for k in REPORTED if k in m}
    if "student_top1" in m and "teacher_top1" in base:
        e["top1_drop"] = base["teacher_top1"] - m["student_top1"]
        e["agreement_drop"] = 1.0 - m["agreement_top1"]
    if "student_perplexity" in m:
        e["student_perplexity"] = m["student_perplexity"]
        e["perplexity_ratio"] = m["student_perplexity"] / base["teacher_perplexity"]
        e["perplexity_increase"] = e["perplexity_ratio"] - 1.0
    return e


def _f(v: float | None, fmt: str = "{:.4f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def grid(smap: dict[str, Any]) -> tuple[list[str], list[int], dict[tuple[int, str], dict[str, Any]]]:
    names = [o["name"] for o in smap["options"]]
    cells = {(e["layer"], e["option"]): e for e in smap["entries"]}
    return names, list(range(smap["layers"])), cells


def _load_note(timing: dict[str, Any]) -> str:
    """The machine's load while a map was timed, for its table's heading ("" for a map that did not record it)."""
    text = load_text(timing.get("load") or {})
    return f"; {text}" if text else ""


def map_markdown(smap: dict[str, Any]) -> str:
    """Layers x options; each cell: top-1 drop (a decoder: perplexity ratio) / agreement / KL / ms saved (a decoder:
    prefill and decode ms saved)."""
    names, layers, cells = grid(smap)
    t, tm = smap["timing"], smap["teacher_metrics"]
    causal = "decode_ms" in t
    if causal:
        head = (f"Teacher {smap['teacher']}: perplexity {_f(tm.get('teacher_perplexity'), '{:.3f}')} on "
                f"{smap['eval_sentences']} predicted validation tokens; prefill {t['encoder_ms']:.1f} ms per "
                f"{t['batch']}x{t['seq']} batch, decode {t['decode_ms']:.2f} ms per token after {t['seq']} on "
                f"{smap['device']} (median of {t['reps']}{_load_note(t)}). Cell: perplexity ratio / agreement / "
                "KL(t‖s) per token / prefill ms saved / decode ms saved.")
    else:
        head = (f"Teacher {smap['teacher']}: top-1 {_f(tm.get('teacher_top1'))} on {smap['eval_sentences']} "
                f"validation sentences; encoder {t['encoder_ms']:.1f} ms per {t['batch']}x{t['seq']} batch on "
                f"{smap['device']} (median of {t['reps']}{_load_note(t)}). Cell: top-1 drop / agreement / KL(t‖s) / "
                "encoder ms saved.")
    lines = [head, "", "| layer (ms) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i in layers:
        row = [f"{i} ({t['layer_ms'][i]:.1f})"]
        for n in names:
            e = cells.get((i, n))
            if e is None:
                row.append("—")
            elif causal:
                row.append(f"{_f(e.get('perplexity_ratio'), '{:.3f}')} / {_f(e.get('agreement_top1'), '{:.3f}')} / "
                           f"{_f(e.get('kl_teacher_student'), '{:.3f}')} / {e['latency_saved_ms']:.1f} / "
                           f"{e['decode_saved_ms']:.2f}")
            else:
                row.append(f"{_f(e.get('top1_drop'), '{:+.4f}')} / {_f(e.get('agreement_top1'), '{:.3f}')} / "
                           f"{_f(e.get('kl_teacher_student'), '{:.3f}')} / {e['latency_saved_ms']:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_map(smap: dict[str, Any], path: Path) -> Path:
    """Heatmaps layers x options: KL(teacher || student) (or the hidden cosine without an MLM head) and ms saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names, layers, cells = grid(smap)
    has_kl = any("kl_teacher_student" in e for e in smap["entries"])
    causal = "decode_ms" in smap["timing"]
    key, label = ("kl_teacher_student", "KL(teacher ‖ student) " + ("per token" if causal else "at the mask")) \
        if has_kl else ("hidden_cosine", "final hidden-state cosine")
    panels = [(key, label, "magma_r" if has_kl else "magma"),
              ("latency_saved_ms", "prefill ms saved" if causal else "encoder ms saved", "viridis")]
    if causal:
        panels.append(("decode_saved_ms", "decode ms saved (one token)", "viridis"))
    fig, axes = plt.subplots(1, len(panels), figsize=(2 + 2.2 * len(names) * len(panels) / 2, 1.5 + 0.35 * len(layers)),
                             squeeze=False)
    for ax, (k, lab, cmap) in zip(axes[0], panels):
        a = np.full((len(layers), len(names)), np.nan)
        for (i, n), e in cells.items():
            if k in e:
                a[i, names.index(n)] = e[k]
        im = ax.imshow(a, cmap=cmap, aspect="auto")
        for (i, n), e in cells.items():
            if k in e:
                txt = f"{e[k]:.3f}" if k not in ("latency_saved_ms", "decode_saved_ms") else f"{e[k]:.2f}"
                if k == key and "top1_drop" in e:
                    txt += f"\nΔtop1 {e['top1_drop']:+.3f}"
                ax.text(names.index(n), i, txt, ha="center", va="center", fontsize=7, color="gray")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
        ax.set_title(lab)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"Sensitivity map — {Path(str(smap['teacher'])).name} (one unit retrained and put alone into the "
                 "teacher; — : not applicable)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_map(smap: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sensitivity.json", "md": out / "sensitivity.md", "png": out / "sensitivity.png"}
    write_staged({paths["md"]: map_markdown(smap) + "\n", paths["json"]: json.dumps(smap, indent=2, default=str)})
    plot_map(smap, paths["png"])
    return paths


def _map_problem(smap: Any, teacher_layers: int | None = None) -> tuple[str, str, Any] | None:
    """(field, expected, found) of the first field of a map that the planner cannot use, or None. With
    ``teacher_layers``, the map's ``layers`` must be the teacher's layer count: the planner builds per-layer tables of
    that size, so a huge number there would exhaust memory before any entry is looked at."""
    from ..storage.checkpoint import _int, _is, _num

    if not isinstance(smap, dict):
        return ("(the whole file)", "a JSON object written by sensitivity_map.py", smap)
    top = {"layers": _int(1), "teacher": _is(str, "a string"), "teacher_hash": _is(str, "a non-empty string", True),
           "teacher_params": _int(1), "timing": _is(dict, "an object"), "options": _is(list, "a non-empty list", True),
           "entries": _is(list, "a list")}
    for key, check in top.items():
        if key not in smap:
            return (key, "present", "nothing")
        if (want := check(smap[key])) is not None:
            return (key, want, smap[key])
    if teacher_layers is not None and smap["layers"] != teacher_layers:
        return ("layers", f"{teacher_layers} (the teacher's number of layers)", smap["layers"])
    if (want := _num(0, lo_open=True)(smap["timing"].get("encoder_ms"))) is not None:
        return ("timing.encoder_ms", want, smap["timing"].get("encoder_ms"))
    n, options = smap["layers"], {}
    for i, o in enumerate(smap["options"]):
        name = f"options[{i}]"
        if not isinstance(o, dict):
            return (name, "an object", o)
        fields = {"name": _is(str, "a non-empty string", True), "kind": lambda v: None if v in KINDS else
                  f"one of {', '.join(KINDS)}", "num_heads": _int(0), "head_dim": _int(0), "ffn": _int(0)}
        for key, check in fields.items():
            if (want := check(o.get(key))) is not None:
                return (f"{name}.{key}", want, o.get(key))
        if o["name"] in options:
            return (f"{name}.name", "a name no other option has", o["name"])
        try:
            options[o["name"]] = option_from_dict(o)
            opt = options[o["name"]]
            LayerSpec(opt.num_heads, opt.head_dim, opt.ffn, [0], attention=opt.attention, num_kv_heads=opt.num_kv_heads)
        except (TypeError, ValueError) as e:
            return (name, f"an option of a valid layer shape ({e})", o)
    for k, e in enumerate(smap["entries"]):
        if (problem := _entry_problem(f"entries[{k}]", e, n, options=options)) is not None:
            return problem
    return None


def _entry_problem(name: str, e: Any, n: int, *, options: dict[str, Option]) -> tuple[str, str, Any] | None:
    """(field, expected, found) of the first unusable field of the map entry ``e`` (a map of ``n`` layers), or
    None."""
    from ..storage.checkpoint import _int, _num

    if not isinstance(e, dict):
        return (name, "an object", e)
    layer = e.get("layer")
    if _int(0)(layer) is not None or layer >= n:
        return (f"{name}.layer", f"a layer index in [0, {n})", layer)
    opt = options.get(e.get("option")) if isinstance(e.get("option"), str) else None
    if opt is None:
        return (f"{name}.option", f"the name of one of the map's options {sorted(options)}", e.get("option"))
    if e.get("kind") != opt.kind:
        return (f"{name}.kind", f"'{opt.kind}' (the kind of option '{opt.name}')", e.get("kind"))
    if not opt.applies(layer, n) or e.get("covers") != opt.covers(layer):
        return (f"{name}.covers", f"{opt.covers(layer)} (layers of {n} that option '{opt.name}' replaces)",
                e.get("covers"))
    if _int(-2 ** 62)(e.get("params_saved")) is not None:
        return (f"{name}.params_saved", "an integer", e.get("params_saved"))
    numbers = ("latency_saved_ms", *(k for k in ("decode_saved_ms", "kv_bytes_saved") if k in e),
               *(m for m in COSTS.values() if m in e))
    for key in numbers:
        if _num(-math.inf)(e.get(key)) is not None:
            return (f"{name}.{key}", "a finite number", e.get(key))
    return None


def validate_map(smap: Any, where: str | Path, *, teacher_layers: int | None = None) -> dict[str, Any]:
    """Check a map read from a file against the fields the planner uses (types, ranges, options and layers that
    exist, what each entry covers; with ``teacher_layers``, the map's layer count against the teacher's); PlanError
    naming the file, the first bad field, what was expected and found."""
    from ..storage.checkpoint import _show

    problem = _map_problem(smap, teacher_layers)
    if problem:
        key, want, got = problem
        raise PlanError(f"'{where}' is not a sensitivity map the planner can use: field '{key}' must be {want}, "
                        f"found {_show(got)}")
    return smap


def reach_map(teacher: SwappableModel, options: list[Option], layers: list[int], *, timing: Timing | None = None
              ) -> dict[str, Any]:
    """The parameter and KV-cache savings of every (layer, option) of a map and, with ``timing``, its latency
    savings, from untrained units (random weights: the same shapes, sizes and speed as trained ones), without
    training or evaluating anything: what ``budget_problem`` needs to refuse a budget before a map is built, and
    what the planner's re-timing composes. The teacher's layers share one shape, so each option's unit is made and
    timed once, at its first layer."""
    cfg, n = teacher.config, len(teacher.layers)
    device = next(teacher.parameters()).device
    units = []
    for opt in options:
        first = next((i for i in layers if opt.applies(i, n)), None)
        if first is not None:
            units.append(random_unit(teacher, opt, first))
    smap: dict[str, Any] = {"layers": n, "teacher_params": teacher.num_parameters(), "entries": [],
                            "teacher_kv_bytes_per_token": cfg.kv_cache_bytes_per_token(), "device": str(device)}
    timed = time_units(teacher, units, timing) if timing is not None else None
    for b in units:
        for i in (i for i in layers if b.option.applies(i, n)):
            e = {"layer": i, "option": b.option.name, "covers": b.option.covers(i)}
            moved = Built(i, b.option, b.module, b.option.spec(i, cfg), b.note)
            saved = unit_savings(teacher, moved, None)
            if timed:  # timed at the option's first layer: the same shapes at every layer
                saved.update({k: v for k, v in unit_savings(teacher, b, timed).items() if k not in saved})
            e.update(saved)
            smap["entries"].append(e)
    if timed:
        smap["timing"] = timed
    return smap


def random_unit(teacher: SwappableModel, opt: Option, layer: int) -> Built:
    """An untrained unit of ``opt`` at ``layer`` (random weights): for sizes and timings."""
    cfg = teacher.config
    spec = opt.spec(layer, cfg)
    device = next(teacher.parameters()).device
    if opt.kind == "block":
        mod, _ = init_attention(teacher.layers[layer].block, cfg, spec, init="random")
    else:
        mod, _ = init_merged_layer(cfg, spec, teacher.layers[layer], second=teacher.layers[layer], mode="random")
    return Built(layer, opt, mod.to(device).eval(), spec, "random")
