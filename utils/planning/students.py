"""What the map, the planner and bench/plans.py share: the map's settings and its making, and building a (planned or
uniform, trained or untrained) student from map options, fine-tuned end to end."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import SwappableModel
from models.compress import clone_model
from ..data.batches import token_ids_hash
from ..data.masking import lm_targets
from ..session import Session
from ..storage.checkpoint import read_meta
from ..training.loop import Trainer, TrainConfig, Unit, run_setup
from ..training.students import load_model, save_model
from ..training.tasks import ModelDistill, describe_losses, kd_temperature
from ..evaluation.llama_cpp import GgufTiming, LlamaCppTimer, check_llama_cpp
from ..evaluation.speed import LoadLog, Timing, load_text
from .planner import RETIME_ROUNDS, SPEED_MARGIN, Plan, PlanError, Target, aim, choose_plan
from .runtimes import check_runtime, check_runtime_teacher, runtime_map, runtime_options, time_map_in_llama_cpp
from .sensitivity import (TASK_KIND, AliasedCache, Context, Option, build_map, build_units, cache_names,
                          compose_units, default_options, load_map_trained, map_trained, option_from_dict, plan_refit,
                          random_unit, speed_fn, train_units, unit_specs, validate_map, write_map)

log = logging.getLogger("simplifying_transformers")


@dataclass
class MapConfig:
    """How the sensitivity map is made: which layers and options, on how much data, timed how (the training loop's
    settings are a ``TrainConfig`` beside it)."""

    # kinds of option; None: the teacher's task's (masked LM: heads, head_dim, merge, ffn, combined; causal LM: kv,
    # heads, linear, ffn, no_attention, drop, merge)
    options: tuple[str, ...] | None = None
    heads_set: list[int] | None = None  # head counts to map; None: 2/3, 1/2, 1/3, 1/6 of the teacher's
    layers: list[int] | None = None  # layers to map; None: all
    block_loss: str = "output"  # loss of the attention-block units: output, relations or output+relations
    relation_weight: float = 1.0
    max_train_sentences: int | None = None  # train on the first N sentences of the training split
    eval_sentences: int | None = None  # measure on the first N sentences of the validation split
    valid_batches: int = 4  # batches of the per-epoch validation loss (best-checkpoint choice)
    latency_reps: int = 20  # timed round-robin repeats per module (median)
    latency_batch: int = 32
    # CPU threads of every timing (the map's, a plan's re-timing, a student's); None: the job's. A job may train on
    # more threads than its speed-ups are stated for
    latency_threads: int | None = None
    cache_dir: str | None = None  # the teacher feature cache; None: the features are recomputed every batch
    # where the student will run (planning.runtimes): pytorch, llama.cpp or vllm; only the options it runs are mapped
    # and planned; llama.cpp: the map's savings, a plan's re-timing and the student's timing are measured in
    # llama.cpp, on GGUFs of ``gguf_type``
    runtime: str = "pytorch"
    gguf_type: str = "f16"

    def __post_init__(self) -> None:
        check_runtime(self.runtime)

    def timing(self, seq: int) -> Timing:
        """These timing settings on ``seq``-token inputs."""
        return Timing(self.latency_reps, self.latency_batch, seq, self.latency_threads)

    def gguf_timing(self, seq: int) -> GgufTiming:
        """These timing settings for llama.cpp (``runtime`` llama.cpp): one ``seq``-token sequence, the threads given
        (else one)."""
        return GgufTiming(self.gguf_type, self.latency_threads or 1, self.latency_reps, seq)


def map_options(teacher: SwappableModel, cfg: MapConfig) -> list[Option]:
    """The options a map of ``cfg`` maps for ``teacher``: its task's (``cfg.options``, ``cfg.heads_set``), only
    those ``cfg.runtime`` runs, on its FFN grid (``runtimes.runtime_options``)."""
    options = default_options(teacher.config, cfg.heads_set, cfg.options, task=teacher.TASK)
    return runtime_options(teacher.config, options, cfg.runtime)


@dataclass
class PlanFinetune:
    """The end-to-end fine-tune of a planned student (KD at masked positions) and its test budget."""

    epochs: int = 1  # 0: no fine-tune
    lr: float = 2e-4
    temperature: float | None = None  # None: the teacher's task's (training.tasks.KD_TEMPERATURE)
    relation_weight: float = 0.0  # relation distillation in the fine-tune
    test_sentences: int | None = None  # evaluate on the first N test sentences; None: all
    max_steps: int | None = None  # optimizer steps per epoch at most; None: the units' limit (TrainConfig)
    # heal on the first N training sentences (fresh text beyond the units' cached ones: a short heal that repeats a
    # few sentences for epochs overfits them); None: the units' sentences
    train_sentences: int | None = None
    # the heal's KL from the teacher's top-k next tokens cached once per training window under topk_dir
    # (storage.logits); None: the teacher runs beside the student
    teacher_topk: int | None = None
    topk_dir: str | None = None  # None: <the map's cache_dir>, else checkpoints/cache
    keep_start: bool = False  # the composed student is the heal's best unless an epoch beats it on validation


def context(s: Session, cfg: MapConfig, *, train: TrainConfig, record: dict[str, Any]) -> Context:
    """What training and measuring the map's units needs, from a Session: loaders of the (first sentences of the)
    training and validation splits, the probe batch, the shared teacher cache."""
    train_ds = s.first_sentences("train", cfg.max_train_sentences)
    valid_ds = s.first_sentences("valid", cfg.eval_sentences)
    train_loader, sampler = s.loader(train_ds, shuffle=True)
    valid_loader, _ = s.loader(valid_ds, shuffle=False)
    what = "windows" if s.teacher.TASK == "causal" else "sentences"
    log.info("train %d %s, validation %d %s", len(train_ds), what, len(valid_ds), what)
    n = len(s.teacher.layers)
    cache = None
    if cfg.cache_dir is not None:
        cache = AliasedCache(s.teacher_cache(train_ds, cache_names(n), cfg.cache_dir), n)
    return Context(teacher=s.teacher, teacher_hash=s.teacher_hash, teacher_name=s.teacher_name,
                   tokenizer=s.tokenizer, device=s.device, train_loader=train_loader, sampler=sampler,
                   valid_loader=valid_loader, probe=s.global_batch(train_ds), train_cfg=train, cache=cache,
                   ffn_probe=s.refit_probe(train_ds, train.ffn_refit_tokens),
                   valid_batches=cfg.valid_batches, setup=s.training_setup(train_ds), record=record,
                   block_loss=tuple(cfg.block_loss.split("+")), relation_weight=cfg.relation_weight,
                   eval_hash=token_ids_hash(valid_ds.ids))


def make_map(s: Session, cfg: MapConfig, *, train: TrainConfig, out: Path, record: dict[str, Any]) -> dict:
    """Build and write the map (sensitivity.json, .md, .png) for the teacher of Session ``s`` into ``out``; returns
    it. ``record`` is the units' run record; its ``args`` (the command line's, else these settings) go into the map."""
    n = len(s.teacher.layers)
    layers = cfg.layers or list(range(n))
    bad = [i for i in layers if i >= n]
    if bad:
        raise IndexError(f"`layers` {bad}: the teacher has layers 0..{n - 1}")
    check_runtime_teacher(cfg.runtime, s.teacher, s.tokenizer)
    if cfg.runtime == "llama.cpp":
        check_llama_cpp()
    options = map_options(s.teacher, cfg)
    log.info("mapping layers %s x options %s", layers, [o.name for o in options])
    ctx = context(s, cfg, train=train, record=record)
    smap = build_map(ctx, options, layers, run_dir=out / "units", timing=cfg.timing(s.data.seq_len))
    if cfg.runtime == "llama.cpp":  # the savings the planner weighs, as llama.cpp measures them
        with LlamaCppTimer(s.teacher, s.tokenizer, cfg.gguf_timing(s.data.seq_len)) as timer:
            smap = time_map_in_llama_cpp(smap, s.teacher, options, layers=layers, timer=timer)
    smap["args"] = dict(record.get("args") or {"map": dataclasses.asdict(cfg), "train": dataclasses.asdict(train)})
    smap["runtime"] = cfg.runtime
    paths = write_map(smap, out)
    log.info("map written: %s", ", ".join(str(p) for p in paths.values()))
    return smap


def student_dir(run: str | Path) -> Path:
    """Where ``make_student`` keeps the student it builds in ``run``."""
    return Path(run) / "model" / "best"


def make_student(s: Session, ctx: Context, choices: dict[int, Option], *, run: Path, origin: str,
                 finetune: PlanFinetune, train: bool = True, map_units: Path | None = None) -> SwappableModel:
    """The student of ``choices`` (first teacher layer -> Option): its units initialised from the teacher and, with
    ``train``, retrained on the teacher's features (``<run>/units``), composed into a copy of the teacher and
    fine-tuned end to end by KD (``finetune.epochs``); saved as ``<run>/model/best``. ``train=False`` gives the
    untrained baseline of the same plan (kept top heads, top FFN neurons, the first layer of a merged pair).
    ``map_units``: a map's ``units/`` folder; units it trained with this setup are loaded, not trained again (nor
    refit). A student ``<run>`` already holds, built with the same plan and settings, is loaded without building any
    unit."""
    teacher = s.teacher
    plan = {str(i): o.name for i, o in sorted(choices.items())}
    trains = train and any(TASK_KIND.get(o.kind) for o in choices.values())  # not only dropped layers
    heal_data = _heal_data(s, ctx, finetune) if train and finetune.epochs > 0 else None
    build = _build_record(ctx, finetune, train=train, units=trains, map_units=map_units if trains else None,
                          heal_setup=heal_data.setup if heal_data else ctx.setup,
                          refit=plan_refit(ctx, choices, unit_specs(ctx, choices)))
    why = unfinished_student(run, ctx, plan, build=build, heal_epochs=finetune.epochs if train and choices else 0)
    if why is None:  # asked before any unit is built (a refit runs the teacher over its probe)
        log.info("student %s: built before with the same plan and settings; loaded", run)
        student, _ = load_model(student_dir(run))
        return student.to(s.device)
    log.info("student %s: building it (%s)", run, why)
    from_map = map_trained(ctx, choices, map_units) if trains and map_units is not None else {}
    units = build_units(ctx, choices, no_refit=from_map)  # the map's units are loaded over their start
    load_map_trained(units, from_map)
    rest = {i: b for i, b in units.items() if i not in from_map}
    if rest and train:
        train_units(ctx, rest, run / "units")
    student = clone_model(compose_units(teacher, units)).to(s.device)
    log.info("student plan:\n%s", student.config.describe())
    sources = [origin] + [f"layer {i}: {b.option.name} ({b.note}{'' if train else '; untrained'})"
                          for i, b in sorted(units.items())]
    meta = {"teacher": ctx.teacher_name, "teacher_hash": s.teacher_hash, "sources": sources,
            "plan": plan, "build": build}
    if not (train and finetune.epochs > 0 and units):
        save_model(student, student_dir(run), meta)
        return student
    student.requires_grad_(True)  # end to end: the teacher's layers it kept (frozen in the teacher) train too
    task = _heal_task(s, ctx, student, finetune=finetune, heal_data=heal_data)
    cfg = _heal_config(ctx, finetune)
    unit = Unit("model", student, run / "model", {"kind": "model", "config": student.config.to_dict(), **meta,
                                                  **describe_losses(task)})
    Trainer(task, [unit], cfg, run_dir=run, device=s.device, evaluate=lambda: task.evaluate(ctx.valid_loader),
            setup=heal_data.setup, record=ctx.record, run_meta={"run_dir": str(run)}
            ).fit(heal_data.loader, heal_data.sampler)
    student, _ = load_model(student_dir(run))
    return student.to(s.device)


def _heal_task(s: Session, ctx: Context, student: SwappableModel, *, finetune: PlanFinetune,
               heal_data: "HealData") -> ModelDistill:
    """The KD task of a student's end-to-end fine-tune (the KL alone; with ``finetune.teacher_topk`` read from the
    teacher's top-k cache of the heal's training windows)."""
    teacher = s.teacher
    masker = lm_targets(s.tokenizer, teacher) if teacher.has_mlm_head else None
    topk = None
    if finetune.teacher_topk is not None:
        topk = s.topk_cache(heal_data.loader.dataset, finetune.topk_dir or "checkpoints/cache",
                            k=finetune.teacher_topk, temperature=kd_temperature(teacher, finetune.temperature))
    return ModelDistill(teacher, student, masker, kl_weight=1.0, mlm_weight=0.0, hidden_weight=0.0,
                        hidden_criterion="cosine", temperature=finetune.temperature, seed=ctx.train_cfg.seed,
                        relation_weight=finetune.relation_weight, topk=topk).to(s.device)


@dataclass
class HealData:
    """The training text of a student's end-to-end fine-tune: its loader, sampler and setup record (data hash)."""

    loader: Any
    sampler: Any
    setup: dict[str, Any]


def _heal_data(s: Session, ctx: Context, finetune: PlanFinetune) -> HealData:
    """The units' training loader, or the first ``finetune.train_sentences`` training sentences' own."""
    if finetune.train_sentences is None:
        return HealData(ctx.train_loader, ctx.sampler, ctx.setup)
    ds = s.first_sentences("train", finetune.train_sentences)
    loader, sampler = s.loader(ds, shuffle=True)
    what = "windows" if s.teacher.TASK == "causal" else "sentences"
    log.info("fine-tune on the first %d training sentences: %d %s", finetune.train_sentences, len(ds), what)
    return HealData(loader, sampler, s.training_setup(ds))


def _build_record(ctx: Context, finetune: PlanFinetune, *, train: bool, units: bool, map_units: Path | None,
                  heal_setup: dict[str, Any], refit: dict[str, int]) -> dict[str, Any]:
    """What a student is built with besides its plan (stored in its meta; a different record means build anew): the
    units' training setup and whose trained units it loads (``units``: it has units to train), the heal's setup
    (``heal_setup``: its data hash and batch size), how its narrower feed-forward parts started (``refit``, trained
    or not: ``units_refit``)."""
    setup = {**run_setup(ctx.train_cfg, ctx.setup), "epochs": ctx.train_cfg.epochs,
             "block_loss": list(ctx.block_loss), "relation_weight": ctx.relation_weight}
    heal = _heal_config(ctx, finetune)
    return json.loads(json.dumps({
        "trained": train, "units": setup if units else None, "map_units": str(map_units) if map_units else None,
        **refit,
        "heal": {**run_setup(heal, heal_setup), "epochs": heal.epochs,
                 "temperature": kd_temperature(ctx.teacher, finetune.temperature),
                 "relation_weight": finetune.relation_weight,
                 **({"teacher_topk": finetune.teacher_topk} if finetune.teacher_topk else {}),
                 **({"keep_start": True} if finetune.keep_start else {})} if train else None}))


def _heal_config(ctx: Context, finetune: PlanFinetune) -> TrainConfig:
    """The heal's training settings. A finished heal is loaded from ``model/best`` (``unfinished_student``), never
    continued, so its final resume point (optimizer state twice the student's size) is not kept; a heal stopped
    part-way keeps its points and resumes."""
    return dataclasses.replace(ctx.train_cfg, epochs=finetune.epochs, lr=finetune.lr, keep_start=finetune.keep_start,
                               max_steps_per_epoch=finetune.max_steps or ctx.train_cfg.max_steps_per_epoch,
                               keep_final_resume=False)


def unfinished_student(run: Path, ctx: Context, plan: dict[str, str], *, build: dict[str, Any], heal_epochs: int
                       ) -> str | None:
    """Why ``<run>/model/best`` cannot stand for the student of ``plan`` built as ``build`` says (None: it can): none
    there, another teacher, plan or build record, or a heal of ``heal_epochs`` epochs not finished. Lets a stopped
    bench or plan resume, and a bench reuse students another run built alike."""
    best = student_dir(run)
    if not (best / "meta.json").is_file():
        return f"no student in '{best}'"
    meta = read_meta(best)
    if meta.get("teacher_hash") != ctx.teacher_hash or meta.get("plan") != plan:
        return f"'{best}' holds another teacher's or plan's student"
    if meta.get("build") != build:
        return f"'{best}' was built with other settings"
    last = run / "model" / "last" / "meta.json"
    done = json.loads(last.read_text()).get("epoch", 0) if last.is_file() else 0
    if done < heal_epochs:
        return f"its fine-tune stopped after {done} of {heal_epochs} epochs"
    return None


def time_plan(teacher: SwappableModel, choices: dict[int, Option], *, speed: str, timing: Timing,
              llama: LlamaCppTimer | None = None, load: LoadLog | None = None) -> dict[str, float]:
    """The plan's units (untrained: the same shapes and speed) composed into the teacher and timed against it,
    round-robin (``timing``; with ``llama``, in llama.cpp: both as GGUF files): ``measured_speedup`` and each model's
    ``*_ms``; a PyTorch timing logs the machine's load in ``load`` when given."""
    student = compose_units(teacher, {i: random_unit(teacher, o, i) for i, o in choices.items()})
    if llama is not None:
        ms = llama.ms(student, (speed,))
        return {"measured_speedup": ms[f"teacher_{speed}_ms"] / ms[f"student_{speed}_ms"], "in": "llama.cpp",
                **{k.replace(f"_{speed}_ms", "_ms"): v for k, v in ms.items()}}
    ms = timing.ms({who: speed_fn(m, speed, batch=timing.batch, seq=timing.seq)
                    for who, m in (("teacher", teacher), ("student", student))}, next(teacher.parameters()).device,
                   load=load)
    return {"measured_speedup": ms["teacher"] / ms["student"], **{f"{k}_ms": v for k, v in ms.items()}}


def retimed_plan(teacher: SwappableModel, smap: dict[str, Any], target: Target, *, cost: str, timing: Timing,
                 rounds: int = RETIME_ROUNDS, margin: float = SPEED_MARGIN, runtime: str = "pytorch",
                 llama: LlamaCppTimer | None = None) -> tuple[Plan, list[dict[str, float]]]:
    """The plan for ``target`` from the units of ``smap`` that ``runtime`` runs (``runtimes.runtime_map``); for a
    speed-up, re-timed before anything is trained: each candidate plan's units (untrained: the same shapes and speed)
    composed into the teacher and timed against it round-robin (with ``llama``, in llama.cpp), the ask searched
    (``planner.aim``, at most ``rounds`` timings) for the plan that meets the target as measured, by ``margin`` and
    twice, with the least overshoot. Every round is explained in the plan's lines. Returns (plan, the rounds'
    measurements)."""
    smap = runtime_map(smap, teacher.config, runtime)
    kw = dict(target_params=target.params, target_kv_cache=target.kv_cache, speed=target.speed, cost=cost)
    plan = choose_plan(smap, target.speedup, **kw)
    if target.speedup is None or rounds == 0:
        return plan, []
    options = {o["name"]: option_from_dict(o) for o in smap["options"]}
    load = LoadLog()

    def measure(p: Plan) -> dict[str, float]:
        return time_plan(teacher, {i: options[name] for i, name in p.choices.items()}, speed=target.speed,
                         timing=timing, llama=llama, load=load)

    best, rounds_done, lines = aim(target.speedup, lambda ask: choose_plan(smap, ask, **kw), measure, rounds=rounds,
                                   margin=margin)
    on, mapped = (llama.timing.threads if llama else timing.threads_used()), smap["timing"].get("threads")
    where = f"in llama.cpp, {llama.timing.gguf_type} GGUF files, " if llama else ""
    busy = load_text(load.summary())
    best.lines += [f"re-timing ({target.speed}, {where}median of {timing.reps} round-robin runs, CPU threads: {on}"
                   f"{'; ' + busy if busy else ''}):"]
    if llama is not None and smap["timing"].get("in") != "llama.cpp":
        best.lines.append("  note: the map's savings are PyTorch timings; the re-timing measures llama.cpp")
    elif mapped is not None and mapped != on:  # a map from before threads were recorded: nothing to compare
        best.lines.append(f"  note: the map was timed on {mapped} CPU thread(s); its per-unit savings may add up "
                          "differently on these (--latency-threads)")
    best.lines += lines
    return best, rounds_done


def read_map(path: str | Path, *, teacher_layers: int | None = None) -> dict:
    """A map written by ``make_map`` (its sensitivity.json, or the folder holding it), checked against its schema
    and, with ``teacher_layers``, against the teacher's layer count (PlanError naming the file and field)."""
    p = Path(path)
    p = p / "sensitivity.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"`map`: no sensitivity map at '{p}' (run sensitivity_map.py first, or leave `map` "
                                "out)")
    try:
        smap = json.loads(p.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PlanError(f"'{p}' is not a sensitivity map: not valid JSON ({' '.join(str(e).split())[:100]})") from None
    return validate_map(smap, p, teacher_layers=teacher_layers)
