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
from typing import Any, Callable

import torch
from torch import nn

from models.bert import BertForMaskedLM
from models.compress import compose, init_attention, init_merged_layer
from models.config import LayerSpec
from ..evaluation.metrics import compare_models
from ..evaluation.speed import round_robin_ms
from ..storage.checkpoint import load_checkpoint, load_into
from ..storage.features import TeacherCache
from ..training.loop import TrainConfig, Trainer, Unit
from ..training.tasks import BlockDistill, LayerDistill, MergeDistill, describe_losses
from ..training.units import head_rankings, unit_meta, unit_spec
from .planner import COSTS, PlanError

log = logging.getLogger(__name__)

KINDS = ("block", "merge", "ffn", "layer")
SPEC_KIND = {"block": "block", "merge": "merged", "ffn": "layer", "layer": "layer"}  # option kind -> LayerSpec.kind
TASK_KIND = {"block": "block", "merge": "merge", "ffn": "layer", "layer": "layer"}  # option kind -> training task
OPTION_KINDS = ("heads", "head_dim", "merge", "ffn", "combined")  # what default_options can map


@dataclass(frozen=True)
class Option:
    """One way to simplify one layer: ``kind`` block (attention heads x head_dim), merge (this layer and the next
    become one layer of the given heads / feed-forward width), ffn (feed-forward width) or layer (a whole layer of
    the given heads and feed-forward width: several options in one unit)."""

    name: str
    kind: str
    num_heads: int
    head_dim: int
    ffn: int

    def applies(self, layer: int, n_layers: int) -> bool:
        return self.kind != "merge" or layer + 1 < n_layers

    def covers(self, layer: int) -> list[int]:
        return [layer, layer + 1] if self.kind == "merge" else [layer]


def default_options(cfg, heads: list[int] | None = None, kinds: tuple[str, ...] = OPTION_KINDS) -> list[Option]:
    """Options adapted to the teacher: head counts 2/3, 1/2, 1/3, 1/6 of its own (12 -> 8, 6, 4, 2) unless
    ``heads`` is given, head_dim halved, merge with the next layer, FFN width halved; combined: 1/3 of the heads with
    half the FFN and 1/6 of the heads with a quarter of it in one layer, and a merged pair with half the heads and
    half the FFN (12 heads / 1536: heads 4 ffn 768, heads 2 ffn 384, merge heads 6 ffn 768)."""
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


def option_from_dict(d: dict[str, Any]) -> Option:
    return Option(**{k: d[k] for k in ("name", "kind", "num_heads", "head_dim", "ffn")})


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

    teacher: BertForMaskedLM
    teacher_hash: str
    teacher_name: str
    tokenizer: Any
    device: torch.device
    train_loader: Any
    sampler: Any
    valid_loader: Any
    probe: dict[str, torch.Tensor]
    train_cfg: TrainConfig
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


def build_units(ctx: Context, choices: dict[int, Option]) -> dict[int, Built]:
    """Teacher-initialised units (importance-ranked heads on the probe batch, SVD head_dim, top FFN neurons), built
    by ``utils.training.units`` exactly as the training scripts build theirs."""
    t, cfg = ctx.teacher, ctx.teacher.config
    specs: dict[int, LayerSpec] = {}
    for i, opt in sorted(choices.items()):
        if not opt.applies(i, len(t.layers)):
            raise ValueError(f"option '{opt.name}' does not apply to layer {i} (the teacher has {len(t.layers)} layers)")
        if opt.kind not in SPEC_KIND:
            raise ValueError(f"unknown option kind '{opt.kind}'; expected one of {KINDS}")
        ffn = None if opt.kind == "block" else opt.ffn
        specs[i] = unit_spec(cfg, opt.covers(i), SPEC_KIND[opt.kind], intermediate_size=ffn,
                             num_heads=opt.num_heads, head_dim=opt.head_dim)
    importance = head_rankings(t, ctx.probe, [i for i, o in choices.items() if o.num_heads < cfg.layers[i].num_heads])
    out = {}
    for i, opt in sorted(choices.items()):
        spec = specs[i]
        if opt.kind == "block":
            mod, note = init_attention(t.layers[i].block, cfg, spec, importance=importance.get(i))
        else:  # a merged pair starts from its first layer; a narrower layer from the layer itself
            second = t.layers[i + 1] if opt.kind == "merge" else t.layers[i]
            mod, note = init_merged_layer(cfg, spec, t.layers[i], second=second, mode="first",
                                             importance=importance.get(i))
        out[i] = Built(i, opt, mod.to(ctx.device), spec, note)
    return out


def train_units(ctx: Context, units: dict[int, Built], run_dir: Path) -> dict[str, float]:
    """Train every unit against the teacher's features (each kind on its task, all layers of a kind together on one
    shared teacher pass or the cache) with the shared Trainer; afterwards each module holds its best (validation)
    weights. Returns the final validation losses."""
    t, cfg = ctx.teacher, ctx.teacher.config
    finals: dict[str, float] = {}
    groups = {k: {i: b for i, b in units.items() if TASK_KIND[b.option.kind] == k}
              for k in ("block", "merge", "layer")}
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
        trainer = Trainer(task, tl, ctx.train_cfg, run_dir=run_dir, device=ctx.device,
                          evaluate=lambda task=task: task.evaluate(ctx.valid_loader, ctx.valid_batches),
                          run_meta={"run_dir": str(run_dir)}, setup=ctx.setup, record=ctx.record)
        finals.update(trainer.fit(ctx.train_loader, ctx.sampler))
        for u in tl:
            sd, _, _ = load_checkpoint(u.out_dir / "best")
            load_into(u.module, sd, u.out_dir / "best")
    return finals


def compose_units(teacher: BertForMaskedLM, units: dict[int, Built]) -> BertForMaskedLM:
    """The teacher with every unit in place (sharing the teacher's other modules; nothing is copied)."""
    blocks = {i: b.module for i, b in units.items() if b.option.kind == "block"}
    merges = {i: (b.module, b.spec) for i, b in units.items() if b.option.kind == "merge"}
    view = compose(teacher, blocks, merges)
    for i, b in units.items():
        if TASK_KIND[b.option.kind] == "layer":
            idx = view.layer_index_of([i])
            view.layers[idx] = b.module
            view.config.layers[idx] = copy.deepcopy(b.spec)
    return view


# ---------------------------------------------------------------------------------------------------------------
# timing
def _layer_with(layer: nn.Module, attention: nn.Module) -> nn.Module:
    new = copy.copy(layer)
    new._modules = dict(layer._modules)
    new.set_block(attention)
    return new


def encoder_inputs(teacher: BertForMaskedLM, *, batch: int, seq: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, teacher.config.vocab_size - 1), teacher.config.vocab_size, (batch, seq), generator=g)
    return ids.to(device), torch.ones(batch, seq, dtype=torch.long, device=device)


@torch.no_grad()
def time_units(teacher: BertForMaskedLM, units: list[Built], *, reps: int, batch: int = 32, seq: int = 40
               ) -> dict[str, Any]:
    """Encoder-only latency (embeddings + layers, no vocabulary projection) of the teacher, of its embeddings and of
    each of its layers, and of each unit as the layer(s) it replaces; all on one batch x seq input."""
    device = next(teacher.parameters()).device
    ids, att = encoder_inputs(teacher, batch=batch, seq=seq, device=device)
    h = teacher.embed(ids)
    fns: dict[str, Callable[[], Any]] = {"encoder": lambda: teacher(ids, att, with_logits=False),
                                         "embeddings": lambda: teacher.embed(ids)}
    for i, layer in enumerate(teacher.layers):
        fns[f"layer {i}"] = lambda layer=layer: layer(h, None)
    for b in units:
        mod = _layer_with(teacher.layers[b.layer], b.module) if b.option.kind == "block" else b.module
        mod.eval()
        fns[f"{b.layer}/{b.option.name}"] = lambda mod=mod: mod(h, None)
    ms = round_robin_ms(fns, reps, device)
    return {"encoder_ms": ms["encoder"], "embeddings_ms": ms["embeddings"],
            "layer_ms": [ms[f"layer {i}"] for i in range(len(teacher.layers))],
            "unit_ms": {k: v for k, v in ms.items() if "/" in k}, "batch": batch, "seq": seq, "reps": reps}


def replaced_params(teacher: BertForMaskedLM, b: Built) -> int:
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


def build_map(ctx: Context, options: list[Option], layers: list[int], *, eval_loader, run_dir: Path,
              latency_reps: int, latency_batch: int = 32, latency_seq: int = 40) -> dict[str, Any]:
    """Train, measure and time every (layer, option) unit; one option's units (all layers) train together."""
    teacher = ctx.teacher
    n = len(teacher.layers)
    t0 = time.perf_counter()
    base = compare_models(teacher, teacher, eval_loader, tokenizer=ctx.tokenizer, device=ctx.device,
                          keep_rows=False).metrics
    teacher_top1 = base.get("teacher_top1")
    entries, all_units = [], []
    for opt in options:
        choices = {i: opt for i in layers if opt.applies(i, n)}
        if not choices:
            continue
        t1 = time.perf_counter()
        units = build_units(ctx, choices)
        finals = train_units(ctx, units, run_dir / opt.name.replace(" ", "_"))
        train_s = time.perf_counter() - t1
        for i, b in units.items():
            model = compose_units(teacher, {i: b}).eval()
            m = compare_models(teacher, model, eval_loader, tokenizer=ctx.tokenizer, device=ctx.device,
                               keep_rows=False).metrics
            e = {"layer": i, "option": opt.name, "kind": opt.kind, "covers": opt.covers(i),
                 "num_heads": opt.num_heads, "head_dim": opt.head_dim, "ffn": opt.ffn, "init": b.note,
                 "params_saved": replaced_params(teacher, b), "train_s_option": round(train_s, 1),
                 "val_loss": next((v for k, v in finals.items() if k.endswith(f"_{i}/loss")), None)}
            e.update({k: m[k] for k in REPORTED if k in m})
            if teacher_top1 is not None and "student_top1" in m:
                e["top1_drop"] = teacher_top1 - m["student_top1"]
                e["agreement_drop"] = 1.0 - m["agreement_top1"]
            entries.append(e)
            log.info("map: layer %d %-12s top-1 drop %s  agreement %s  KL %s", i, opt.name,
                     _f(e.get("top1_drop")), _f(e.get("agreement_top1")), _f(e.get("kl_teacher_student")))
        all_units.extend(units.values())
    timing = time_units(teacher, all_units, reps=latency_reps, batch=latency_batch, seq=latency_seq)
    for e in entries:
        covered = sum(timing["layer_ms"][j] for j in e["covers"])
        e["unit_ms"] = timing["unit_ms"][f"{e['layer']}/{e['option']}"]
        e["latency_saved_ms"] = covered - e["unit_ms"]
    return {"teacher": ctx.teacher_name, "teacher_hash": ctx.teacher_hash, "layers": n,
            "options": [asdict(o) for o in options], "mapped_layers": layers,
            "teacher_params": teacher.num_parameters(),
            "teacher_metrics": {k: base[k] for k in ("teacher_top1", "teacher_top5", "sentences") if k in base},
            "eval_sentences": base["sentences"], "timing": timing, "entries": entries,
            "device": str(ctx.device), "wall_s": round(time.perf_counter() - t0, 1)}


def _f(v: float | None, fmt: str = "{:.4f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def grid(smap: dict[str, Any]) -> tuple[list[str], list[int], dict[tuple[int, str], dict[str, Any]]]:
    names = [o["name"] for o in smap["options"]]
    cells = {(e["layer"], e["option"]): e for e in smap["entries"]}
    return names, list(range(smap["layers"])), cells


def map_markdown(smap: dict[str, Any]) -> str:
    """Layers x options; each cell: top-1 drop / agreement / KL / encoder ms saved."""
    names, layers, cells = grid(smap)
    t = smap["timing"]
    lines = [f"Teacher {smap['teacher']}: top-1 {_f(smap['teacher_metrics'].get('teacher_top1'))} on "
             f"{smap['eval_sentences']} validation sentences; encoder {t['encoder_ms']:.1f} ms per "
             f"{t['batch']}x{t['seq']} batch on {smap['device']} (median of {t['reps']}). "
             "Cell: top-1 drop / agreement / KL(t‖s) / encoder ms saved.", "",
             "| layer (ms) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i in layers:
        row = [f"{i} ({t['layer_ms'][i]:.1f})"]
        for n in names:
            e = cells.get((i, n))
            row.append("—" if e is None else f"{_f(e.get('top1_drop'), '{:+.4f}')} / {_f(e.get('agreement_top1'), '{:.3f}')} / "
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
    key, label = ("kl_teacher_student", "KL(teacher ‖ student) at the mask") if has_kl else \
        ("hidden_cosine", "final hidden-state cosine")
    panels = [(key, label, "magma_r" if has_kl else "magma"), ("latency_saved_ms", "encoder ms saved", "viridis")]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(names), 1.5 + 0.55 * len(layers)), squeeze=False)
    for ax, (k, lab, cmap) in zip(axes[0], panels):
        a = np.full((len(layers), len(names)), np.nan)
        for (i, n), e in cells.items():
            if k in e:
                a[i, names.index(n)] = e[k]
        im = ax.imshow(a, cmap=cmap, aspect="auto")
        for (i, n), e in cells.items():
            if k in e:
                txt = f"{e[k]:.3f}" if k != "latency_saved_ms" else f"{e[k]:.1f}"
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
    paths["json"].write_text(json.dumps(smap, indent=2, default=str))
    paths["md"].write_text(map_markdown(smap) + "\n")
    plot_map(smap, paths["png"])
    return paths


def _map_problem(smap: Any) -> tuple[str, str, Any] | None:
    """(field, expected, found) of the first field of a map that the planner cannot use, or None."""
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
    if (want := _num(0, lo_open=True)(smap["timing"].get("encoder_ms"))) is not None:
        return ("timing.encoder_ms", want, smap["timing"].get("encoder_ms"))
    n, options = smap["layers"], {}
    for i, o in enumerate(smap["options"]):
        name = f"options[{i}]"
        if not isinstance(o, dict):
            return (name, "an object", o)
        fields = {"name": _is(str, "a non-empty string", True), "kind": lambda v: None if v in KINDS else
                  f"one of {', '.join(KINDS)}", "num_heads": _int(1), "head_dim": _int(1), "ffn": _int(1)}
        for key, check in fields.items():
            if (want := check(o.get(key))) is not None:
                return (f"{name}.{key}", want, o.get(key))
        if o["name"] in options:
            return (f"{name}.name", "a name no other option has", o["name"])
        options[o["name"]] = option_from_dict(o)
    for k, e in enumerate(smap["entries"]):
        name = f"entries[{k}]"
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
        numbers = ("latency_saved_ms", *(m for m in COSTS.values() if m in e))
        for key in numbers:
            if (want := _num(-math.inf)(e.get(key))) is not None:
                return (f"{name}.{key}", "a finite number", e.get(key))
    return None


def validate_map(smap: Any, where: str | Path) -> dict[str, Any]:
    """Check a map read from a file against the fields the planner uses (types, ranges, options and layers that
    exist, what each entry covers); PlanError naming the file, the first bad field, what was expected and found."""
    from ..storage.checkpoint import _show

    problem = _map_problem(smap)
    if problem:
        key, want, got = problem
        raise PlanError(f"'{where}' is not a sensitivity map the planner can use: field '{key}' must be {want}, "
                        f"found {_show(got)}")
    return smap


def reach_map(teacher: BertForMaskedLM, options: list[Option], layers: list[int], *, latency_reps: int = 0,
              latency_batch: int = 32, latency_seq: int = 40) -> dict[str, Any]:
    """The parameter savings of every (layer, option) of a map and, with ``latency_reps``, its latency savings, from
    untrained units (random weights: the same shapes, sizes and speed as trained ones), without training or
    evaluating anything: what ``budget_problem`` needs to refuse a budget before a map is built. The teacher's
    layers share one shape, so each option's unit is made and timed once, at its first layer."""
    cfg, n = teacher.config, len(teacher.layers)
    device = next(teacher.parameters()).device
    units = []
    for opt in options:
        first = next((i for i in layers if opt.applies(i, n)), None)
        if first is None:
            continue
        spec = unit_spec(cfg, opt.covers(first), SPEC_KIND[opt.kind],
                         intermediate_size=None if opt.kind == "block" else opt.ffn, num_heads=opt.num_heads,
                         head_dim=opt.head_dim)
        if opt.kind == "block":
            mod, _ = init_attention(teacher.layers[first].block, cfg, spec, init="random")
        else:
            mod, _ = init_merged_layer(cfg, spec, teacher.layers[first], mode="random")
        units.append(Built(first, opt, mod.to(device).eval(), spec, "random"))
    smap: dict[str, Any] = {"layers": n, "teacher_params": teacher.num_parameters(), "entries": [],
                            "device": str(device)}
    timing = (time_units(teacher, units, reps=latency_reps, batch=latency_batch, seq=latency_seq)
              if latency_reps else None)
    for b in units:
        for i in (i for i in layers if b.option.applies(i, n)):
            e = {"layer": i, "option": b.option.name, "covers": b.option.covers(i),
                 "params_saved": replaced_params(teacher, Built(i, b.option, b.module, b.spec, b.note))}
            if timing:
                e["latency_saved_ms"] = (sum(timing["layer_ms"][j] for j in e["covers"])
                                         - timing["unit_ms"][f"{b.layer}/{b.option.name}"])
            smap["entries"].append(e)
    if timing:
        smap["timing"] = timing
    return smap
