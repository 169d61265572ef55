"""The Python API: what the scripts do, as functions a notebook calls with keyword arguments and dataclasses.

    from utils import api

    s = api.load_teacher("path/to/teacher", data=api.DataConfig(data_dir="path/to/text", batch_size=16))
    run = api.retrain_blocks(s, layers=[0, 1], shape=api.UnitShape(num_heads=2), train=api.TrainConfig(epochs=1),
                             out="runs")
    model = api.assemble(s, [run.run_dir], out="runs/assembled").model
    print(api.evaluate(s, model, out="runs/eval").metrics["student_top1"])

Every function takes a started ``Session`` (``load_teacher``), or the ``SessionConfig`` to start one from; from a
config the teacher is loaded only after the units are claimed and everything that can be checked is checked, as the
scripts do (the scripts are thin front ends over these functions). The guarantees are the library's, whoever calls:
one job per unit (a lock naming the holder), settings checked before any work (``SettingError``, a ValueError,
naming the setting), atomic checkpoints, exact resume. Messages name settings as `field` (a keyword argument here or
a dataclass field); the command line shows its flag instead.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from models import LayerSpec, ModelConfig, SwappableModel, family_of, load_teacher as _load_model_and_tokenizer
from models.compress import (clone_model, compose, drop_every_second as _drop_every_second, fit_problem,
                             teacher_start_problem)
from models.kinds import get_kind
from models.staging import write_staged
from . import runtime
from . import session as _session
from .data.masking import OneMasker, lm_targets
from .data.text import DataConfig, TrainText
from .errors import SettingError
from .evaluation.harness import (HarnessComparison, HarnessConfig, Tasks, compare as compare_lm_eval, load_tasks,
                                 need_causal_lm)
from .evaluation.chat import Chat, ChatConfig, check_chat, evaluate_chat
from .evaluation.metrics import CausalComparison, EvalConfig, EvalResult, compare_models
from .evaluation.teacher_text import TeacherText, TeacherTextConfig, write_teacher_text as _write_teacher_text
from .evaluation.report import counted, write_report
from .evaluation.llama_cpp import LlamaCppTimer, check_llama_cpp, llama_timer
from .evaluation.speed import LoadLog, Timing, decoder_costs
from .evaluation.texts import EvalText, read_texts, score_texts, write_scalars
from .planning.planner import RETIME_ROUNDS, SPEED_MARGIN, SPEED_KEYS, Plan, Target, budget_problem
from .planning.runtimes import check_runtime_teacher, runtime_map
from .planning.sensitivity import option_from_dict, reach_map, speed_fn, validate_map
from .planning.students import (MapConfig, PlanFinetune, context, make_map, make_student, map_options, read_map,
                                retimed_plan)
from .session import Session, SessionConfig, check_teacher
from .storage.checkpoint import CheckpointError, check_output_dir, read_meta
from .storage.export import ExportConfig, check_export_targets, check_export_teacher, run_exports
from .storage.lock import claim_units
from .storage.logits import check_topk
from .training.loop import TrainConfig, Trainer, Unit, run_record, stored_unit_meta
from .training.students import (build_student, conditioned_teacher, dropped_layers, load_block, load_layer,
                                load_merged_layer, load_model, newest_units, save_model)
from .training.tasks import (BlockDistill, BlockLoss, FinetuneLoss, LayerDistill, MergeDistill, MergeLoss,
                             ModelDistill, balance_terms, check_topk_terms, describe_losses, kd_temperature)
from .training.units import (UNIT_PREFIX, UnitShape, init_blocks, init_layers, init_merges, refit_setup, set_dropout,
                             spec_from_meta, starting_shape, unit_meta, unit_spec)

__all__ = [
    "DataConfig", "TrainText", "SessionConfig", "Session", "TrainConfig", "UnitShape", "BlockLoss", "MergeLoss",
    "FinetuneLoss", "EvalConfig", "EvalText", "ChatConfig", "TeacherTextConfig", "ExportConfig", "MapConfig",
    "PlanFinetune", "HarnessConfig", "SettingError",
    "load_teacher", "retrain_blocks", "retrain_merges", "cache_features", "assemble", "finetune", "evaluate",
    "sensitivity_map", "plan_student", "export", "load_model", "write_teacher_text",
]

log = logging.getLogger("simplifying_transformers")
REPORTED = ("student_top1", "agreement_top1", "kl_teacher_student", "hidden_cosine")  # per-epoch fine-tune metrics
PLAN_REPORTED = ("student_top1", "student_top5", "agreement_top1", "kl_teacher_student", "hidden_cosine",
                 "teacher_top1", "teacher_perplexity", "student_perplexity", "predicted_tokens", "perplexity_ratio",
                 "teacher_overconfidence", "student_overconfidence")


# ---- results ----
@dataclass
class UnitResult:
    """One trained unit: its name (block_3, merge_0, model), how it started, its best and last validation loss."""

    name: str
    init: str
    best: float
    last: float


@dataclass
class TrainedUnits:
    """A training run: its folder (what ``assemble`` and ``finetune`` take), its units, the final validation
    metrics."""

    run_dir: Path
    units: list[UnitResult]
    metrics: dict[str, float]


@dataclass
class Assembled:
    """A model built from the teacher and trained units, saved in ``out`` (reload with ``load_model``)."""

    model: SwappableModel
    out: Path
    sources: list[str]
    plan: str  # the per-layer plan, one line per layer
    teacher_params: int
    student_params: int
    exports: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    """A comparison with the teacher: metrics, one row per sentence, notes; written to ``out``."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    notes: list[str]
    out: Path
    model: SwappableModel
    lm_eval: HarnessComparison | None = None  # lm-eval's tasks on teacher and student, when asked for
    chat: dict[str, Any] | None = None  # the chat comparison (``chat``): results.json's "chat"
    texts: dict[str, dict[str, Any]] = field(default_factory=dict)  # per named text (``EvalConfig.texts``)


@dataclass
class FineTuned:
    """A fine-tuned student: its run folder, the best model, its evaluation on the test split, the exports."""

    run_dir: Path
    model: SwappableModel
    evaluation: Evaluation
    sources: list[str]
    exports: list[str]


@dataclass
class PlannedStudent:
    """A planned student: the plan, the results written to ``run/results.json``, and the map it came from."""

    run: Path
    plan: Plan
    results: dict[str, Any]
    model: SwappableModel | None  # None: ``plan_only``
    map: dict[str, Any]
    map_built: Path | None  # where the map was built for this plan (None: it was given)


# ---- starting ----
def load_teacher(teacher: str = "bert-base-uncased", *, data: DataConfig | None = None, device: str = "auto",
                 teacher_device_map: str | dict[str, str | int] | None = None) -> Session:
    """The teacher (a Hugging Face hub id or a local folder) with its tokenizer on ``device`` (or read on the CPU,
    then spread over the devices of ``teacher_device_map``), and the data settings every later call reads: what the
    other functions take first."""
    return _session.start(SessionConfig(teacher=teacher, data=data or DataConfig(), device=device,
                                        teacher_device_map=teacher_device_map))


def _prepare(session: Session | SessionConfig, *, judge: str | None = None, cache_dir: str | None = None) -> Session:
    """The session to work in: a started one as it is, or one started from its config once what can be checked
    without loading weights is checked (teacher and judge files and positions, the cache folder)."""
    seq_len = session.data.seq_len
    if isinstance(session, SessionConfig):
        check_teacher(session.teacher, seq_len)
    if judge:
        check_teacher(judge, seq_len, "judge")
    if cache_dir is not None:
        check_output_dir(cache_dir, "cache_dir", keep=True)
    return session if isinstance(session, Session) else _session.start(session)


def _teacher_plan(session: Session | SessionConfig) -> ModelConfig:
    """The teacher's per-layer plan: the loaded teacher's, or read from its config alone."""
    return session.teacher.config if isinstance(session, Session) else _session.model_config(session.teacher)


def _samples(s: Session, make_student: Callable[[], SwappableModel], loader) -> Callable[[], str]:
    """``print_samples``: true word, teacher's and partially retrained model's prediction for a few sentences."""
    def samples() -> str:
        if not s.teacher.has_mlm_head:
            return "samples: the teacher has no masked-LM head; nothing to print"
        res = compare_models(s.teacher, make_student(), loader, tokenizer=s.tokenizer, device=s.device, max_batches=1)
        return "\n".join(f"GT: {r['true']:>15}  TEACHER: {r['teacher']:>15}  PRED: {r['student']:>15}  | {r['masked']}"
                         for r in res.rows[:8])
    return samples


def _first_layers(given: Sequence[int] | None, *, n_layers: int, what: str) -> list[int]:
    """The first teacher layer of each unit (``what``: layers, one per block; pairs, N of each (N, N+1)): ``given``,
    checked against the teacher; None: every layer, or the pairs (0, 1), (2, 3), ..."""
    span = 2 if what == "pairs" else 1
    if given is None:
        return list(range(0, n_layers - span + 1, span))
    firsts = list(given)
    bad = [i for i in firsts if not 0 <= i <= n_layers - span]
    if not firsts or bad:
        raise SettingError(f"`{what}` {bad or firsts}: the teacher has layers 0..{n_layers - 1}"
                           + (f" (a pair starts at 0..{n_layers - 2})" if span == 2 else ""))
    return firsts


# ---- retraining attention blocks ----
@dataclass
class _UnitRun:
    """What a retraining run decided before it claims its units (its units' specs, how they start, where they go)."""

    specs: dict[int, LayerSpec]
    train: TrainConfig
    init: str
    started: dict[int, tuple[Path, dict]]  # first teacher layer -> the checkpoint (path, metadata) it starts from
    dropout: float | None
    run_dir: Path
    cache_dir: str | None
    print_samples: bool
    record: dict[str, Any]


@dataclass
class _BlockRun(_UnitRun):
    loss: BlockLoss
    start_from: str | Path | None


def retrain_blocks(session: Session | SessionConfig, *, layers: Sequence[int] | None = None,
                   shape: UnitShape = UnitShape(), loss: BlockLoss = BlockLoss(), train: TrainConfig = TrainConfig(),
                   init: str | None = None, start_from: str | Path | None = None, dropout: float | None = None,
                   out: str | Path = "checkpoints", run_name: str | None = None, name_suffix: str = "",
                   cache_dir: str | None = None, print_samples: bool = False,
                   record: dict[str, Any] | None = None) -> TrainedUnits:
    """Retrain smaller units of ``shape`` to mimic the teacher's layers ``layers`` (None: every layer), all on one
    teacher pass per batch (or the teacher cache under ``cache_dir``).

    The units are attention blocks (fewer heads or key/value heads, a smaller head_dim, another kind of attention:
    ``shape.attention``, e.g. linear) trained on the block output as ``loss`` says; or, where
    ``shape.whole_layers()`` (attention none, or a feed-forward width ``shape.ffn_dim`` of their own), whole layers
    trained on the layer output (a whole layer keeps the teacher's attention unless ``shape`` says otherwise; its
    feed-forward part keeps the neurons most active on a probe batch). ``init``: teacher (its most important heads,
    SVD to a smaller head_dim), random, or None: teacher, but random for the teacher's own shape (an exact copy would
    train nothing). ``start_from``: a folder of unit checkpoints the units start from instead. Each unit owns
    ``<out>/<run_name>/block_<i>`` (``layer_<i>``; default run name from the shape and loss, plus ``name_suffix``);
    ``dropout`` sets the new units' dropout. Shapes this teacher cannot take are refused before it loads.
    """
    tcfg = _teacher_plan(session)
    layers = _first_layers(layers, n_layers=len(tcfg.layers), what="layers")
    unit = "layer" if shape.whole_layers() else "block"
    started = newest_units(start_from, unit, layers) if start_from else {}
    specs = _unit_specs(tcfg, layers, unit=unit, shape=shape, started=started)
    spec = specs[layers[0]]
    _check_block_loss(tcfg, spec, loss, unit=unit)
    init = _block_init(init, spec, tcfg.layers[layers[0]], started=bool(started))
    _check_fit(tcfg, specs, shape=shape, init=None if started else init)
    name = (f"blocks_{spec.shape_tag()}" if unit == "block" else f"layers_{spec.shape_tag()}_f{spec.intermediate_size}")
    run_dir = Path(out) / (run_name or f"{name}_{_loss_tag(loss)}{name_suffix}")
    extras = {k: v for k, v in spec.attention_shape().items() if k not in ("num_heads", "head_dim") and v != "mha"}
    if unit == "layer":
        extras["ffn_dim"] = spec.intermediate_size
    rec = run_record(record, batch_size=session.data.batch_size, train=train, mask_inputs=loss.mask_inputs,
                     score_target=loss.score_target, block_dropout=dropout, percentage_data=session.data.fraction,
                     init=init, loss_on=list(loss.loss_on), criterion=loss.criterion,
                     score_criterion=loss.scores_by(), heads=spec.num_heads, head_dim=spec.head_dim, **extras)
    job = _BlockRun(specs=specs, train=train, init=init, started=started, dropout=dropout, run_dir=run_dir,
                    cache_dir=cache_dir, print_samples=print_samples, record=rec, loss=loss, start_from=start_from)
    with claim_units([run_dir / f"{UNIT_PREFIX[unit]}_{i}" for i in layers], unit) as locks:
        return (_train_blocks if unit == "block" else _train_layers)(_prepare(session, cache_dir=cache_dir), job,
                                                                    locks)


def _check_block_loss(tcfg: ModelConfig, spec: LayerSpec, loss: BlockLoss, *, unit: str) -> None:
    """Refuse a loss that cannot apply to these units or this teacher (SettingError), before any work."""
    loss_on = list(loss.loss_on)
    if spec.intermediate_size == 0 and not get_kind(spec.attention).has_block:
        raise SettingError("`attention` none with `ffn_dim` 0 is a dropped layer: nothing to train. Drop layers with "
                           "`drop_layers` when assembling (python -m utils.assemble) or fine-tuning "
                           "(finetune_merged.py)")
    if loss.mask_inputs:
        _need_masked_lm(tcfg, "`mask_inputs` puts one [MASK] token into each training sentence")
        if loss_on == ["mlm"]:
            raise SettingError("`mask_inputs` does not combine with `loss_on` mlm, which masks its inputs itself")
    if unit == "layer" and (loss_on != ["output"] or loss.mask_inputs):
        what = "`mask_inputs`" if loss.mask_inputs else f"`loss_on` {'+'.join(loss_on)}"
        raise SettingError(f"{what} does not apply to whole-layer units (`attention` {spec.attention}, `ffn_dim` "
                           f"{spec.intermediate_size}): they are trained on the layer's output (`loss_on` output)")
    needs_heads = [x for x in loss_on if x in ("scores", "relations")]
    if needs_heads and not get_kind(spec.attention).has_heads:
        raise SettingError(f"`loss_on` {needs_heads[0]} compares what attention heads compute; `attention` "
                           f"{spec.attention} has no heads (use output, or mlm)")


def _need_masked_lm(tcfg: ModelConfig, what: str) -> None:
    """Refuse a setting (``what`` it does) that only a masked-LM teacher has a use for."""
    if family_of(tcfg).task != "mlm":
        raise SettingError(f"{what}: that needs a masked-LM teacher, and this teacher is a causal LM "
                           f"({family_of(tcfg).name} family)")


def _unit_specs(tcfg: ModelConfig, firsts: list[int], *, unit: str, shape: UnitShape,
                started: dict[int, tuple[Path, dict]]) -> dict[int, LayerSpec]:
    """The spec of each unit (``unit``: block, layer or merged_layer, standing for teacher layer i, or i and i+1):
    ``shape``, else the starting checkpoints' (which ``shape`` must match)."""
    ffn = None if unit == "block" else shape.ffn_dim
    if started:
        specs = [spec_from_meta(m, tcfg) for _, m in started.values()]
        fields = starting_shape(shape, specs, "block" if unit == "block" else "layer")
        if unit != "block":
            ffns = {s.intermediate_size for s in specs}
            if len(ffns) > 1:
                raise CheckpointError(f"the `start_from` layers have different feed-forward sizes {sorted(ffns)}; "
                                      "train them in separate runs (one each)")
            if ffn is not None and ffn != min(ffns):
                raise CheckpointError(f"`ffn_dim` {ffn} does not match the `start_from` layer's {min(ffns)}")
            ffn = ffns.pop()
    else:
        fields = shape.attention_fields()
    span, kind = (2, "merged") if unit == "merged_layer" else (1, unit)
    return {i: unit_spec(tcfg, list(range(i, i + span)), kind, intermediate_size=ffn, **fields) for i in firsts}


def _check_fit(tcfg: ModelConfig, specs: dict[int, LayerSpec], *, shape: UnitShape, init: str | None) -> None:
    """Refuse units this teacher's family cannot build, or that cannot start from the teacher layer ``init`` names
    (teacher, first, second, average): from the shapes alone, before the teacher loads (SettingError)."""
    for spec in specs.values():
        problem = fit_problem(tcfg, spec)
        if problem is None and init in ("teacher", "first", "second", "average"):
            source = tcfg.layers[spec.origin[-1] if init == "second" else spec.origin[0]]
            problem = teacher_start_problem(tcfg, spec, source)
            problem = problem and f"{problem} (keep the teacher's, or start the unit with `init` random)"
        if problem:
            given = {**shape.attention_fields(), "ffn_dim": shape.ffn_dim}
            asked = ", ".join(f"`{k}` {v}" for k, v in given.items() if v is not None) or "the teacher's shape"
            raise SettingError(f"the unit asked for ({asked}) does not fit this teacher: {problem}")


def _block_init(init: str | None, spec: LayerSpec, teacher_spec: LayerSpec, *, started: bool) -> str:
    """The initialisation of new units: ``init``; None: teacher, but random for the teacher's own shape."""
    same = (spec.attention_shape() == teacher_spec.attention_shape()
            and spec.intermediate_size == teacher_spec.intermediate_size)
    if started or not same:
        return init or "teacher"
    if init == "teacher":
        raise SettingError(f"`init` teacher with the teacher's own shape ({spec.num_heads} heads x {spec.head_dim}) "
                           "makes an exact copy of the teacher's block: nothing to train. Give a smaller `num_heads` / "
                           "`head_dim` (e.g. `num_heads` 4), or `init` random")
    if init is None:
        log.info("the new block has the teacher's shape (%d heads x %d): starting it random, as an exact copy of the "
                 "teacher's block would train nothing (a smaller `num_heads` / `head_dim` starts from the "
                 "teacher's most important heads)", spec.num_heads, spec.head_dim)
        return "random"
    return init


def _loss_tag(loss: BlockLoss) -> str:
    """The loss part of a block run's default name: output_mse, scores_crossentropy_logits, relations, ..."""
    loss_on = list(loss.loss_on)
    tag = "+".join(loss_on) + ("" if loss_on in (["mlm"], ["relations"]) else f"_{loss.criterion.lower()}")
    if "scores" in loss_on and loss.score_target == "logits" and loss.scores_by() in ("MSE", "L1"):
        tag += "_logits"
    return tag


def _start_blocks(s: Session, job: _BlockRun, probe: dict) -> tuple[dict[int, Any], dict[int, str]]:
    """The new blocks, from their starting checkpoints or initialised (heads ranked on ``probe``)."""
    cfg = s.teacher.config
    if job.started:
        blocks = {i: load_block(p, cfg, s.teacher_hash, force=job.train.force)[1].to(s.device)
                  for i, (p, _) in job.started.items()}
        notes = {i: f"from {job.start_from}" for i in job.specs}
    else:
        blocks, notes = init_blocks(s.teacher, job.specs, init=job.init, probe=probe)
    for i, spec in job.specs.items():
        if job.dropout is not None:
            set_dropout(blocks[i], job.dropout, hidden=False)
        t_attn = s.teacher.layers[i].block
        log.info("block %d: %d heads x %d -> %d heads x %d%s; init %s", i, t_attn.num_heads, t_attn.head_dim,
                 spec.num_heads, spec.head_dim, spec.attention_note(), notes[i])
    return blocks, notes


@dataclass
class _Data:
    """The loaders of a training run and what a resume must share (``Session.training_setup``)."""

    train_ds: Any
    train_loader: Any
    sampler: Any
    valid_loader: Any
    setup: dict[str, Any]


def _data(s: Session) -> _Data:
    train_ds, valid_ds = s.sentences("train"), s.sentences("valid")
    train_loader, sampler = s.loader(train_ds, shuffle=True)
    return _Data(train_ds, train_loader, sampler, s.loader(valid_ds, shuffle=False)[0], s.training_setup(train_ds))


def _fit(s: Session, job: _UnitRun, *, task: Any, units: list[Unit], data: _Data, locks: list,
         view: Callable[[], Any], notes: dict[str, str], run_dir: Path | None = None) -> TrainedUnits:
    """Train ``units`` of ``task`` with the one training loop (its records in ``run_dir``, default the job's);
    ``view``: the teacher with the units in place (for printed samples)."""
    samples = _samples(s, view, data.valid_loader) if job.print_samples else None
    final = Trainer(task, units, job.train, run_dir=run_dir or job.run_dir, device=s.device, samples=samples,
                    evaluate=lambda: task.evaluate(data.valid_loader), run_meta={"run_dir": str(job.run_dir)},
                    setup=data.setup, record=job.record, locks=locks).fit(data.train_loader, data.sampler)
    return TrainedUnits(job.run_dir, _unit_results(units, notes, final), final)


def _train_blocks(s: Session, job: _BlockRun, locks: list) -> TrainedUnits:
    cfg, loss = s.teacher.config, job.loss
    data = _data(s)
    probe = s.global_batch(data.train_ds)  # drawn in every case: its loader draws from the global RNG
    blocks, notes = _start_blocks(s, job, probe)
    cache = None
    if job.cache_dir is not None:
        if list(loss.loss_on) == ["mlm"] or loss.mask_inputs:
            log.warning("`cache_dir` ignored with %s: the inputs are re-masked every step",
                        "`mask_inputs`" if loss.mask_inputs else "`loss_on` mlm")
        else:
            cache = s.teacher_cache(data.train_ds, block_features(list(job.specs)), job.cache_dir)
    task = BlockDistill(s.teacher, blocks, list(loss.loss_on), criterion=loss.criterion,
                        score_criterion=loss.scores_by(), temperature=loss.temperature, seed=job.train.seed,
                        masker=lm_targets(s.tokenizer, s.teacher) if list(loss.loss_on) == ["mlm"] else None,
                        cache=cache, score_target=loss.score_target,
                        input_masker=OneMasker(s.tokenizer) if loss.mask_inputs else None,
                        relation_heads=loss.relation_heads, relation_weight=loss.relation_weight,
                        score_weight=loss.score_weight, balance_ratio=loss.balance_ratio).to(s.device)
    _balance(task, lambda: probe, {f"block_{i}": job.run_dir / f"block_{i}" for i in job.specs},
             resume=job.train.resume)
    units = [Unit(f"block_{i}", blocks[i], job.run_dir / f"block_{i}",
                  unit_meta("block", job.specs[i], cfg, teacher=s.teacher_name, teacher_hash=s.teacher_hash,
                            **describe_losses(task, f"block_{i}"), init=notes[i]))
             for i in job.specs]
    return _fit(s, job, task=task, units=units, data=data, locks=locks, view=lambda: compose(s.teacher, blocks=blocks),
                notes={f"block_{i}": n for i, n in notes.items()})


def _start_layers(s: Session, job: _BlockRun, probe: dict, *, ffn_probe: dict | None
                  ) -> tuple[dict[int, tuple[Any, LayerSpec]], dict[int, str]]:
    """The new whole layers, from their starting checkpoints or initialised (heads and neurons ranked on ``probe``;
    a narrower feed-forward part's neurons ranked and its output refit on the first ``ffn_refit_tokens`` tokens)."""
    if job.started:
        layers = {}
        for i, (p, _) in job.started.items():
            _, layer, spec = load_layer(p, s.teacher.config, s.teacher_hash, force=job.train.force)
            layers[i] = (layer.to(s.device), spec)
        notes = {i: f"from {job.start_from}" for i in job.specs}
    else:
        layers, notes = init_layers(s.teacher, job.specs, init=job.init, probe=probe, ffn_probe=ffn_probe)
        layers = {i: (layer.to(s.device), spec) for i, (layer, spec) in layers.items()}
    for i, (layer, spec) in layers.items():
        if job.dropout is not None:
            set_dropout(layer, job.dropout)
        log.info("layer %d -> %s; init %s", i, spec.describe(), notes[i])
    return layers, notes


def _train_layers(s: Session, job: _BlockRun, locks: list) -> TrainedUnits:
    """Whole layers, each trained on its teacher layer's input and output (``LayerDistill``)."""
    cfg = s.teacher.config
    data = _data(s)
    probe = s.global_batch(data.train_ds)  # drawn in every case: its loader draws from the global RNG
    refit = refit_setup(cfg, job.specs, job.train.ffn_refit_tokens) if job.init == "teacher" and not job.started else {}
    data.setup.update(refit)
    ffn_probe = s.refit_probe(data.train_ds, job.train.ffn_refit_tokens) if refit else None
    layers, notes = _start_layers(s, job, probe, ffn_probe=ffn_probe)
    names = LayerDistill.features_of(list(job.specs), len(cfg.layers))
    cache = s.teacher_cache(data.train_ds, names, job.cache_dir) if job.cache_dir is not None else None
    task = LayerDistill(s.teacher, layers, criterion=job.loss.criterion, cache=cache, seed=job.train.seed).to(s.device)
    units = [Unit(f"layer_{i}", layers[i][0], job.run_dir / f"layer_{i}",
                  unit_meta("layer", job.specs[i], cfg, teacher=s.teacher_name, teacher_hash=s.teacher_hash,
                            **describe_losses(task), init=notes[i]))
             for i in job.specs]
    return _fit(s, job, task=task, units=units, data=data, locks=locks, view=lambda: compose(s.teacher, layers=layers),
                notes={f"layer_{i}": n for i, n in notes.items()})


def _balance(task: Any, probe: Callable[[], dict], unit_dirs: dict[str, Path], *, resume: bool) -> None:
    """The scales of the task's balanced loss terms: with ``resume``, those stored with each unit's resume point
    (never recomputed), else measured on the batch ``probe()`` gives, at the units' start (``balance_terms``)."""
    if not task.balances():
        return
    stored = {}
    for name, d in unit_dirs.items():
        meta = stored_unit_meta(d) if resume else None
        if meta and "loss_balance" in meta:
            stored[name] = meta["loss_balance"]
    balance_terms(task, probe(), stored=stored)


def _unit_results(units: list[Unit], notes: dict[str, str], final: dict[str, float]) -> list[UnitResult]:
    return [UnitResult(u.name, notes.get(u.name, ""), u.best, final.get(u.name + "/loss", float("nan")))
            for u in units]


# ---- retraining merged pairs ----
@dataclass
class _MergeRun(_UnitRun):
    loss: MergeLoss
    conditioned: bool
    conditioned_on: Path


def retrain_merges(session: Session | SessionConfig, *, pairs: Sequence[int] | None = None,
                   shape: UnitShape = UnitShape(), loss: MergeLoss = MergeLoss(), train: TrainConfig = TrainConfig(),
                   init: str = "first", start_from: str | Path | None = None, dropout: float | None = None,
                   conditioned: bool = False, conditioned_on: str | Path | None = None,
                   out: str | Path = "checkpoints", run_name: str | None = None, name_suffix: str = "",
                   cache_dir: str | None = None, print_samples: bool = False,
                   record: dict[str, Any] | None = None) -> TrainedUnits:
    """Replace each pair of teacher layers (N, N+1), N in ``pairs`` (None: 0, 2, 4, ...), by one trained layer of
    ``shape`` (``shape.ffn_dim``: its feed-forward width), initialised from the pair's ``init`` layer (first, second,
    average, random) or from the merged-layer checkpoints under ``start_from``.

    ``conditioned``: pair by pair, each trained on the hidden states of the model whose earlier pairs are merged
    already (their checkpoints under ``conditioned_on``, default this run's folder). Each pair owns
    ``<out>/<run_name>/merge_<N>``; ``dropout`` sets the merged layers' dropout.
    """
    tcfg = _teacher_plan(session)
    n = len(tcfg.layers)
    if n < 2:
        raise SettingError("the teacher has a single layer: nothing to merge")
    pairs = _first_layers(pairs, n_layers=n, what="pairs")
    if loss.mask_inputs:
        _need_masked_lm(tcfg, "`mask_inputs` puts one [MASK] token into each training sentence")
        if loss.loss_on == "mlm":
            raise SettingError("`mask_inputs` does not combine with `loss_on` mlm, which masks its inputs itself")
    started = newest_units(start_from, "merged_layer", pairs) if start_from else {}
    specs = _unit_specs(tcfg, pairs, unit="merged_layer", shape=shape, started=started)
    _check_fit(tcfg, specs, shape=shape, init=None if started else init)
    spec = specs[pairs[0]]
    tag = "mlm" if loss.loss_on == "mlm" else loss.criterion.lower()
    run_dir = Path(out) / (run_name or f"merge_{spec.shape_tag()}_f{spec.intermediate_size}_{tag}"
                                       f"{'_conditioned' if conditioned else ''}{name_suffix}")
    rec = run_record(record, batch_size=session.data.batch_size, train=train, mask_inputs=loss.mask_inputs,
                     dropout=dropout, percentage_data=session.data.fraction, init=init, heads=spec.num_heads,
                     head_dim=spec.head_dim, ffn_dim=spec.intermediate_size, criterion=loss.criterion)
    job = _MergeRun(specs=specs, train=train, init=init, started=started, dropout=dropout, run_dir=run_dir,
                    cache_dir=cache_dir, print_samples=print_samples, record=rec, loss=loss,
                    conditioned=conditioned, conditioned_on=Path(conditioned_on) if conditioned_on else run_dir)
    with claim_units([run_dir / f"merge_{i}" for i in pairs], "merged pair") as locks:
        return _train_merges(_prepare(session, cache_dir=cache_dir), job, locks)


def _start_merges(s: Session, job: _MergeRun, probe: dict) -> tuple[dict[int, tuple[Any, LayerSpec]], dict[str, str]]:
    """The merged layers, from their starting checkpoints or initialised from the teacher."""
    layers, notes = {}, {}
    if job.started:
        for i, (p, _) in job.started.items():
            _, layer, spec = load_merged_layer(p, s.teacher.config, s.teacher_hash, force=job.train.force)
            layers[i], notes[f"merge_{i}"] = (layer.to(s.device), spec), f"from {p}"
    else:
        made, why = init_merges(s.teacher, job.specs, init=job.init, probe=probe)
        for i, (layer, spec) in made.items():
            layers[i], notes[f"merge_{i}"] = (layer.to(s.device), spec), why[i]
            log.info("pair (%d, %d) -> one layer, %d heads x %d%s, ffn %d; init %s", i, i + 1, spec.num_heads,
                     spec.head_dim, spec.attention_note(), spec.intermediate_size, why[i])
    if job.dropout is not None:
        for layer, _ in layers.values():
            set_dropout(layer, job.dropout)
    return layers, notes


def _train_merges(s: Session, job: _MergeRun, locks: list) -> TrainedUnits:
    data = _data(s)
    probe = s.global_batch(data.train_ds)  # the same on every rank
    layers, notes = _start_merges(s, job, probe)
    cache = None
    if job.cache_dir is not None and job.loss.mask_inputs:
        log.warning("`cache_dir` ignored with `mask_inputs`: the inputs are re-masked every step")
    elif job.cache_dir is not None and job.loss.loss_on != "mlm":
        cache = s.teacher_cache(data.train_ds, merge_features(list(job.specs), conditioned=job.conditioned),
                                job.cache_dir)
    if not job.conditioned:
        return _train_pairs(s, job, list(job.specs), layers=layers, notes=notes, cache=cache, data=data, locks=locks)
    results, final = [], {}
    for i in job.specs:  # conditioned: pair by pair, each fed by the model whose earlier pairs are merged already
        inputs_from, used = conditioned_teacher(s.teacher, job.conditioned_on, i, teacher_hash=s.teacher_hash,
                                                force=job.train.force)
        if inputs_from is not None:
            log.info("pair (%d, %d) conditioned on: %s", i, i + 1, "; ".join(used))
        done = _train_pairs(s, job, [i], layers=layers, notes=notes, cache=cache, data=data, locks=locks,
                            inputs_from=inputs_from, group_dir=job.run_dir / f"merge_{i}")
        results += done.units
        final.update(done.metrics)
    return TrainedUnits(job.run_dir, results, final)


def _train_pairs(s: Session, job: _MergeRun, group: list[int], *, layers: dict, notes: dict[str, str], cache,
                 data: _Data, locks: list, inputs_from: SwappableModel | None = None,
                 group_dir: Path | None = None) -> TrainedUnits:
    """One Trainer over the merged layers of ``group`` (all pairs, or one pair of a conditioned run)."""
    cfg, loss = s.teacher.config, job.loss
    task = MergeDistill(s.teacher, {i: layers[i] for i in group}, loss.loss_on, criterion=loss.criterion,
                        masker=lm_targets(s.tokenizer, s.teacher) if loss.loss_on == "mlm" else None,
                        cache=cache, inputs_from=inputs_from, temperature=loss.temperature, seed=job.train.seed,
                        input_masker=OneMasker(s.tokenizer) if loss.mask_inputs else None).to(s.device)
    units = [Unit(f"merge_{i}", layers[i][0], job.run_dir / f"merge_{i}",
                  unit_meta("merged_layer", layers[i][1], cfg, teacher=s.teacher_name, teacher_hash=s.teacher_hash,
                            conditioned=job.conditioned, **describe_losses(task), init=notes[f"merge_{i}"]))
             for i in group]
    return _fit(s, job, task=task, units=units, data=data, locks=locks, notes=notes, run_dir=group_dir,
                view=lambda: compose(inputs_from or s.teacher, merges={i: layers[i] for i in group}))


# ---- the teacher cache alone ----
def block_features(layers: Sequence[int]) -> list[str]:
    """The teacher features retraining the blocks of ``layers`` reads from the cache: each block's input and
    output."""
    return [f"{k}_{i}" for i in layers for k in ("in", "block")]


def merge_features(pairs: Sequence[int], *, conditioned: bool = False) -> list[str]:
    """The teacher features retraining the pairs (N, N+1), N in ``pairs``, reads from the cache: the hidden state
    leaving N+1, and entering N (a conditioned pair takes its input from the earlier merged pairs instead, except
    the first: N < 2)."""
    return [f"out_{i + 1}" for i in pairs] + [f"in_{i}" for i in pairs if not conditioned or i < 2]


@dataclass
class CachedFeatures:
    """Teacher features on disk: the cache folder (``<cache_dir>/<key>``) and its files, which of them were built now
    (the others were there), and the training tokens they hold."""

    folder: Path
    features: list[str]
    built: list[str]
    tokens: int

    @property
    def files(self) -> list[Path]:
        return [self.folder / f"{n}.npy" for n in self.features]


def cache_features(session: Session | SessionConfig, *, units: str = "blocks", layers: Sequence[int] | None = None,
                   conditioned: bool = False, cache_dir: str = "checkpoints/cache") -> CachedFeatures:
    """Build the teacher features that retraining ``units`` (blocks, or pairs) of ``layers`` (None: all) reads from
    the cache under ``cache_dir``, and nothing else; no unit is trained or claimed. The data settings must be those of
    the jobs that will read them (the cache is keyed by teacher, token ids and sequence length). With the teacher
    spread over several devices (``SessionConfig.teacher_device_map``) this is the one job that needs them all:
    the per-unit jobs then read only their own files."""
    if units not in ("blocks", "pairs"):
        raise SettingError(f"`units` must be blocks or pairs, got '{units}'")
    n_layers = len(_teacher_plan(session).layers)
    if units == "pairs" and n_layers < 2:
        raise SettingError("the teacher has a single layer: nothing to merge")
    firsts = _first_layers(layers, n_layers=n_layers, what="layers" if units == "blocks" else "pairs")
    names = block_features(firsts) if units == "blocks" else merge_features(firsts, conditioned=conditioned)
    s = _prepare(session, cache_dir=cache_dir)
    cache = s.teacher_cache(s.sentences("train"), names, cache_dir)
    return CachedFeatures(cache.dir, names, cache.built, int(cache.offsets[-1]))


# ---- a student from trained units, its fine-tune, its evaluation ----
def assemble(session: Session | SessionConfig, checkpoints: Sequence[str | Path] = (), *,
             out: str | Path = "checkpoints/assembled", which: str = "best", force: bool = False,
             drop_layers: Sequence[int] = (), export: ExportConfig = ExportConfig()) -> Assembled:
    """A model from the teacher plus every block / merged-layer / whole-layer / model checkpoint under
    ``checkpoints`` (found by their metadata; ``which``: best or last), with the teacher layers ``drop_layers``
    dropped (no attention, no feed-forward part: nothing to train), saved to ``out`` with the tokenizer, and
    exported where ``export`` says. ``force`` accepts checkpoints made against another teacher (never another
    shape)."""
    check_output_dir(out)
    check_export_targets(export)
    _check_drop(session, drop_layers, checkpoints)
    s = _prepare(session)
    check_export_teacher(export, s.teacher, s.tokenizer)
    model, sources = build_student(s.teacher, checkpoints, s.teacher_hash, force=force, which=which,
                                   drop=drop_layers)
    save_model(model, out, {"teacher": s.teacher_name, "teacher_hash": s.teacher_hash, "sources": sources})
    s.tokenizer.save_pretrained(str(Path(out) / "tokenizer"))
    exports = run_exports(model.cpu(), s.tokenizer, export) if export.wanted else []
    return Assembled(model, Path(out), sources, model.config.describe(), s.teacher.num_parameters(),
                     model.num_parameters(), exports)


def _check_drop(session: Session | SessionConfig, drop_layers: Sequence[int], checkpoints: Sequence) -> None:
    """Layers to drop that this teacher does not have or cannot drop are refused before it loads; so is a student
    of nothing (no checkpoint folder and no layer dropped)."""
    if not checkpoints and not drop_layers:
        raise SettingError("nothing to build a student from: give checkpoint folders or `drop_layers`")
    if drop_layers:
        dropped_layers(_teacher_plan(session), drop_layers)


@dataclass
class _FinetuneRun:
    checkpoints: Sequence[str | Path]
    drop_every_second: bool
    drop_layers: Sequence[int]
    which: str
    objective: FinetuneLoss
    train: TrainConfig
    dropout: float | None
    run_dir: Path
    eval_batches: int | None
    export: ExportConfig
    print_samples: bool
    record: dict[str, Any]
    cache_dir: str | Path | None = None


def finetune(session: Session | SessionConfig, *, checkpoints: Sequence[str | Path] = ("checkpoints",),
             drop_every_second: bool = False, drop_layers: Sequence[int] = (), which: str = "best",
             objective: FinetuneLoss = FinetuneLoss(), train: TrainConfig = TrainConfig(),
             dropout: float | None = None, out: str | Path = "checkpoints", run_name: str | None = None,
             eval_batches: int | None = None, export: ExportConfig = ExportConfig(), print_samples: bool = False,
             record: dict[str, Any] | None = None, cache_dir: str | Path | None = None) -> FineTuned:
    """Fine-tune a compressed model end to end by distillation: the teacher with the merged layers / blocks / whole
    layers / model under ``checkpoints`` and the layers ``drop_layers`` dropped (or, with ``drop_every_second``, the
    teacher without layers 1, 3, 5, ...), trained on ``objective``, evaluated on the test split (``<run>/eval``) and
    exported where ``export`` says. The run folder is ``<out>/<run_name>`` (default finetune_merged, finetune_dropped,
    or finetune_dropped_layers for dropped layers alone); ``eval_batches`` limits the per-epoch comparison with the
    teacher. With ``objective.teacher_topk`` the KL reads the teacher's top-k next tokens, cached once per training
    window under ``cache_dir`` (default ``<out>/cache``; ``storage.logits``)."""
    o = objective
    if o.teacher_topk is not None:
        _check_teacher_topk(session, o.teacher_topk, {"kl": o.kl_weight, "mlm": o.mlm_weight,
                                                       "hidden": o.hidden_weight, "relations": o.relation_weight})
    if o.kl_weight == o.mlm_weight == o.hidden_weight == 0:
        raise SettingError("`kl_weight`, `mlm_weight` and `hidden_weight` are all 0: nothing to train on")
    if drop_every_second and drop_layers:
        raise SettingError("`drop_layers` does not combine with `drop_every_second`: give the layers to drop in one")
    check_export_targets(export)  # an export that cannot be written fails now, not after training
    if not drop_every_second:
        _check_drop(session, drop_layers, checkpoints)
    default = ("finetune_dropped" if drop_every_second else
               "finetune_dropped_layers" if drop_layers and not checkpoints else "finetune_merged")
    run_dir = Path(out) / (run_name or default)
    rec = run_record(record, batch_size=session.data.batch_size, train=train, dropout=dropout,
                     percentage_data=session.data.fraction,
                     **({"drop_layers": sorted(set(drop_layers))} if drop_layers else {}))
    job = _FinetuneRun(checkpoints=checkpoints, drop_every_second=drop_every_second, drop_layers=drop_layers,
                       which=which, objective=objective, train=train, dropout=dropout, run_dir=run_dir,
                       eval_batches=eval_batches, export=export, print_samples=print_samples, record=rec,
                       cache_dir=cache_dir if cache_dir is not None else Path(out) / "cache")
    with claim_units([run_dir / "model"], "fine-tuned model") as locks:
        s = _prepare(session, cache_dir=str(job.cache_dir) if objective.teacher_topk is not None else None)
        check_export_teacher(export, s.teacher, s.tokenizer)  # a GGUF the teacher rules out: before training
        return _finetune(s, job, locks)


def _finetune(s: Session, job: _FinetuneRun, locks: list) -> FineTuned:
    if job.drop_every_second:
        student, sources = _drop_every_second(s.teacher)
    else:
        student, sources = build_student(s.teacher, job.checkpoints, s.teacher_hash, force=job.train.force,
                                         which=job.which, drop=job.drop_layers)
    # the whole student trains (its copies of the teacher's modules come frozen once a task has frozen the teacher)
    student = student.to(s.device).requires_grad_(True)
    if job.dropout is not None:
        set_dropout(student, job.dropout)
    for line in sources:
        log.info("student: %s", line)
    log.info("student plan:\n%s", student.config.describe())
    train_ds, valid_ds = s.sentences("train"), s.sentences("valid")
    train_loader, sampler = s.loader(train_ds, shuffle=True)
    valid_loader, _ = s.loader(valid_ds, shuffle=False)
    o = job.objective
    task = ModelDistill(s.teacher, student, lm_targets(s.tokenizer, s.teacher),
                        kl_weight=o.kl_weight, mlm_weight=o.mlm_weight, hidden_weight=o.hidden_weight,
                        hidden_criterion=o.hidden_criterion, temperature=o.temperature, seed=job.train.seed,
                        relation_weight=o.relation_weight, relation_heads=o.relation_heads,
                        balance_ratio=o.balance_ratio, topk=_topk(s, train_ds, o, cache_dir=job.cache_dir)).to(s.device)
    _balance(task, lambda: s.global_batch(train_ds), {"model": job.run_dir / "model"}, resume=job.train.resume)
    meta = {"kind": "model", "config": student.config.to_dict(), "teacher": s.teacher_name,
            "teacher_hash": s.teacher_hash, "sources": sources, **describe_losses(task, "model")}

    def evaluate() -> dict[str, float]:
        if s.teacher.TASK == "causal":  # the task's own pass scores every next token: the metrics read its outputs
            task.watch = CausalComparison(s.teacher, student, max_batches=job.eval_batches)
            try:
                m = task.evaluate(valid_loader)
                cmp = task.watch.result(s.device)
            finally:
                task.watch = None
        else:  # a masked LM's validation draws its own masks: the comparison reads the loader's, in a pass of its own
            m = task.evaluate(valid_loader)
            cmp = compare_models(s.teacher, student, valid_loader, tokenizer=s.tokenizer, device=s.device,
                                 keep_rows=False, max_batches=job.eval_batches).metrics
        m.update({f"model/{k}": float(cmp[k]) for k in REPORTED if k in cmp})
        return m

    Trainer(task, [Unit("model", student, job.run_dir / "model", meta)], job.train, run_dir=job.run_dir,
            device=s.device, evaluate=evaluate,
            samples=_samples(s, lambda: student, valid_loader) if job.print_samples else None,
            run_meta={"run_dir": str(job.run_dir)}, setup=s.training_setup(train_ds),
            record={"sources": sources, **job.record}, locks=locks).fit(train_loader, sampler)
    runtime.barrier()  # rank 0 wrote the best checkpoint
    best, _ = load_model(job.run_dir / "model" / "best")
    ev = _evaluate(s, best, EvalConfig(), out=job.run_dir / "eval",
                   extra={"model": str(job.run_dir / "model" / "best"), "sources": sources})
    exports = run_exports(best.cpu(), s.tokenizer, job.export) if runtime.is_main_process() else []
    return FineTuned(job.run_dir, best, ev, sources, exports)


def _check_teacher_topk(session: Session | SessionConfig, k: int, terms: dict[str, float | str]) -> None:
    """A top-k cache needs a decoder teacher, 1 <= k <= its vocabulary and a KL-only loss (``terms``: term -> weight):
    refused before the teacher loads."""
    plan = _teacher_plan(session)
    check_topk(k, plan.vocab_size, family_of(plan).task)
    check_topk_terms(terms)


def _topk(s: Session, train_ds, objective: FinetuneLoss, *, cache_dir: str | Path | None):
    """The teacher's top-k cache of the training windows when ``objective.teacher_topk`` asks for one, else None."""
    if objective.teacher_topk is None:
        return None
    return s.topk_cache(train_ds, str(cache_dir), k=objective.teacher_topk,
                        temperature=kd_temperature(s.teacher, objective.temperature))


def evaluate(session: Session | SessionConfig, model: SwappableModel | str | Path, *,
             evaluation: EvalConfig = EvalConfig(), out: str | Path = "checkpoints/eval", force: bool = False,
             extra: dict[str, Any] | None = None, lm_eval: HarnessConfig | None = None,
             chat: ChatConfig | None = None) -> Evaluation:
    """Compare ``model`` with the teacher on one seeded [MASK] per sentence of ``evaluation.split`` (a decoder: on
    every next token of its windows) and on each of ``evaluation.texts`` alike, and write results.json and
    predictions.tsv to ``out`` (checked first; with texts also tensorboard scalars per text in ``out/tb``).

    ``model``: a model, or a checkpoint folder: a whole model, or a merged layer (put into the teacher in place of its
    pair). ``force`` accepts a checkpoint made against another teacher; ``extra`` goes into results.json.
    ``lm_eval``: also run these lm-evaluation-harness tasks on a decoder teacher and the model (checked before the
    teacher loads), side by side in results.json (``lm_eval``) and ``Evaluation.lm_eval``. ``chat`` (a decoder
    teacher): also compare their replies through the teacher's chat template (``evaluation.chat``)."""
    check_output_dir(out)  # before any work: results that cannot be written are lost
    if chat is not None:
        check_chat(family_of(_teacher_plan(session)).task, chat.prompts, what="`chat`")
    docs = read_texts(evaluation.texts)  # texts that cannot be read are refused before the teacher loads
    if evaluation.judge:
        _need_masked_lm(_teacher_plan(session), "`judge` ranks the predictions of masked tokens")
    tasks = None
    if lm_eval is not None:
        need_causal_lm(_teacher_plan(session))
        tasks = load_tasks(lm_eval)
    s = _prepare(session, judge=evaluation.judge)
    found: dict[str, Any] = {}
    if isinstance(model, (str, os.PathLike)):
        model, found = _student_from(s, Path(model), force=force)
    return _evaluate(s, model, evaluation, out=Path(out), extra={**found, **(extra or {})}, lm_eval=tasks,
                     chat=chat, docs=docs)


def _student_from(s: Session, path: Path, *, force: bool) -> tuple[SwappableModel, dict[str, Any]]:
    """The model a checkpoint folder stands for, and what results.json says about where it came from."""
    if read_meta(path)["kind"] == "merged_layer":
        first, layer, spec = load_merged_layer(path, s.teacher.config, s.teacher_hash, force=force)
        model = clone_model(compose(s.teacher, merges={first: (layer.to(s.device), spec)}))
        return model, {"merged_layer": str(path), "pair": [first, first + 1]}
    model, meta = load_model(path, s.teacher_hash, force=force, teacher_config=s.teacher.config)
    if model.config.max_position_embeddings < s.data.seq_len:  # it must read the same token ids at seq_len positions
        raise SettingError(f"`seq_len` {s.data.seq_len} is longer than the model '{path}' allows: its "
                           f"max_position_embeddings is {model.config.max_position_embeddings}")
    return model, {"model": str(path), "sources": meta.get("sources")}


def _evaluate(s: Session, student: SwappableModel, evaluation: EvalConfig, *, out: Path,
              extra: dict[str, Any], lm_eval: Tasks | None = None, chat: ChatConfig | None = None,
              docs: dict | None = None) -> Evaluation:
    """The one comparison of a student with the session's teacher (on the split and each named text; ``docs``:
    the texts already read), and its report (rank 0) in ``out``."""
    judge = judge_tok = None
    if evaluation.judge:
        judge, judge_tok = _load_model_and_tokenizer(evaluation.judge, s.device)
    ds = s.sentences(evaluation.split)
    loader, _ = s.loader(ds, shuffle=False)
    res: EvalResult = compare_models(s.teacher, student.to(s.device).eval(), loader, tokenizer=s.tokenizer,
                                     device=s.device, judge=judge, judge_tokenizer=judge_tok,
                                     max_batches=evaluation.max_batches)
    if s.teacher.TASK == "causal":  # a decoder's cost is also its KV cache and its prefill / decode speed
        res.metrics.update(decoder_costs(s.teacher, student, next(iter(loader))["input_ids"].to(s.device)))
        extra = {"windows": ds.describe(), **extra}
    if evaluation.texts:
        res.texts = score_texts(s, student, evaluation.texts, docs=docs, max_batches=evaluation.max_batches)
    compared = None
    if lm_eval is not None and runtime.is_main_process():
        compared = compare_lm_eval(s.teacher, student, s.tokenizer, tasks=lm_eval)
        extra = {**extra, "lm_eval": compared.to_json()}
    if chat is not None and runtime.is_main_process():
        extra["chat"] = _chat(s, student, chat, out=out)
    if runtime.is_main_process():
        write_report(res, out, {"teacher": s.teacher_name, "judge": evaluation.judge, "split": evaluation.split,
                                "percentage_data": s.data.fraction, "seq_len": s.data.seq_len,
                                "mask_seed": s.data.seed, "device": str(s.device), **extra})
        if res.texts:
            write_scalars(out, res.metrics, res.texts, split=evaluation.split)
    return Evaluation(res.metrics, res.rows, res.notes, Path(out), student, compared, extra.get("chat"), res.texts)


def write_teacher_text(session: Session | SessionConfig, *, config: TeacherTextConfig = TeacherTextConfig(),
                       out: str | Path = "checkpoints/teacher_text", force: bool = False) -> TeacherText:
    """The teacher's own replies to a prompt set, sampled through its chat template, as a text folder the training
    text mixture can name (``evaluation.teacher_text``: chunked, resumable, the same bytes on a rerun)."""
    check_output_dir(out, keep=True)
    check_chat(family_of(_teacher_plan(session)).task, config.prompts, what="teacher-written text", default="train")
    s = _prepare(session)
    chat = Chat.of(s.tokenizer, s.teacher_name)
    return _write_teacher_text(s.teacher, chat, config=config, out=out, force=force,
                               teacher_record={"teacher": s.teacher_name, "teacher_hash": s.teacher_hash})


# ---- the sensitivity map and the planner ----
def sensitivity_map(session: Session | SessionConfig, *, config: MapConfig = MapConfig(),
                    train: TrainConfig = TrainConfig(keep_start=True), out: str | Path = "checkpoints/sensitivity",
                    record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every layer x option of ``config``: one unit retrained alone (``train``; by default each unit keeps its
    starting weights, taken from the teacher, unless training beats them on validation), put alone into the teacher,
    measured and timed; written to ``out`` (sensitivity.json, .md, .png) and returned (what ``plan_student``
    takes)."""
    out = Path(out)
    with claim_units([out], "sensitivity map"):
        s = _prepare(session)
        return make_map(s, config, train=train, out=out,
                        record=run_record(record, batch_size=s.data.batch_size, train=train,
                                          percentage_data=s.data.fraction))


def plan_student(session: Session | SessionConfig, *, target_speedup: float | None = None,
                 target_params: int | None = None, target_kv_cache: float | None = None, speed: str = "prefill",
                 map: dict | str | Path | None = None, cost: str = "kl", config: MapConfig = MapConfig(),
                 finetune: PlanFinetune = PlanFinetune(), train: TrainConfig = TrainConfig(keep_start=True),
                 out: str | Path = "checkpoints/plan", record: dict[str, Any] | None = None,
                 export: ExportConfig | None = None, reuse_map_units: bool = True,
                 plan_only: bool = False, retime_rounds: int = RETIME_ROUNDS,
                 speed_margin: float = SPEED_MARGIN, texts: Sequence[EvalText] = (),
                 chat: ChatConfig | None = None) -> PlannedStudent:
    """A student that meets one target (a ``speed`` = prefill or decode speed-up, at most ``target_params``
    parameters, or at most ``target_kv_cache`` times the teacher's KV cache per token) at the least summed ``cost``
    of the map (``map``: the map, its file or folder; None: built into ``<out>/map`` with ``config``). A speed plan is
    re-timed before training (its untrained units composed and timed against the teacher, at most ``retime_rounds``
    timings; planned again until it measures ``speed_margin`` above the target twice, with the least overshoot; every
    timing with ``config``'s latency settings, on ``config.latency_threads`` CPU threads when given).
    Then its units are retrained (``train``, as the map's), composed, fine-tuned end to end (``finetune``),
    evaluated on the test split (and each of ``texts`` alike: "texts" in the results; its ``chat`` replies vs the
    teacher's: "chat", chat.md), timed against the teacher and exported (``export``); with ``reuse_map_units``,
    units the map trained with this same setup are loaded from its ``units/`` folder instead. Writes plan.log and
    results.json to ``out``; ``train.force`` accepts a map made for another teacher. ``plan_only``: stop after the
    plan (and its re-timing), before any training; ``results`` then hold the plan and its timings, ``model`` is
    None. ``config.runtime``: where the student will run (pytorch, llama.cpp, vllm; ``planning.runtimes``): only the
    units it runs are mapped and planned; for llama.cpp the re-timing and the student's timing (results'
    ``llama_cpp``, what ``target_met_measured`` reads) run in llama.cpp itself, on GGUF files of
    ``config.gguf_type``."""
    target = Target(target_speedup, target_params, target_kv_cache, speed)
    docs = read_texts(texts)  # before any work
    run = Path(out)
    in_llama = _check_plan_request(session, target, config=config, export=export, chat=chat, plan_only=plan_only,
                                   timed=bool(target.speedup and retime_rounds))
    if finetune.teacher_topk is not None:
        _check_teacher_topk(session, finetune.teacher_topk, {"kl": 1.0, "relations": finetune.relation_weight})
    given = _given_map(session, map)
    with claim_units([run], "planned student"):
        s = _prepare(session)
        check_export_teacher(export or ExportConfig(), s.teacher, s.tokenizer)
        check_runtime_teacher(config.runtime, s.teacher, s.tokenizer)
        rec = run_record(record, batch_size=s.data.batch_size, train=train, percentage_data=s.data.fraction)
        smap, built = _plan_map(s, given, config=config, train=train, out=run / "map", record=rec, target=target)
        timing = config.timing(s.data.seq_len)
        with llama_timer(s.teacher, s.tokenizer, config.gguf_timing(s.data.seq_len) if in_llama else None) as llama:
            plan, rounds = retimed_plan(s.teacher, smap, target, cost=cost, timing=timing, rounds=retime_rounds,
                                        margin=speed_margin, runtime=config.runtime, llama=llama)
            _write_plan(plan, run)
            if plan_only:
                return PlannedStudent(run, plan, _plan_only(run, plan, rounds, runtime=config.runtime), None, smap,
                                      built)
            ctx = context(s, config, train=train, record=rec)
            student, res = _build_planned(s, ctx, plan, smap=smap, run=run, finetune=finetune, timing=timing,
                                          target=target, llama=llama,
                                          map_units=_map_units(map, built) if reuse_map_units else None)
        res.update(retiming=rounds, runtime=config.runtime, **_target_met(res, target),
                   **_plan_texts(s, student, texts, docs=docs, run=run, test=res["metrics"], chat=chat))
        if export is not None:
            res["exports"] = run_exports(student.cpu(), s.tokenizer, export)
            student.to(s.device)
        write_staged({run / "results.json": json.dumps(res, indent=2)})
        return PlannedStudent(run, plan, res, student, smap, built)


def _check_plan_request(session: Session | SessionConfig, target: Target, *, config: MapConfig,
                        export: ExportConfig | None, chat: ChatConfig | None, plan_only: bool, timed: bool) -> bool:
    """``plan_student``'s checks before any work: the chat prompts, the export targets, llama.cpp where it times
    (a student, or a plan's re-timing). Returns whether llama.cpp times anything."""
    if chat is not None:
        check_chat(family_of(_teacher_plan(session)).task, chat.prompts, what="`chat`")
    if export is not None and export.wanted and plan_only:
        raise SettingError("`plan_only` makes no model to export: leave out `hf_dir`, `onnx_file` and `gguf_file`")
    if export is not None:
        check_export_targets(export)
    in_llama = config.runtime == "llama.cpp" and (not plan_only or timed)
    if in_llama:
        check_llama_cpp()
    return in_llama


def _plan_only(run: Path, plan: Plan, rounds: list[dict[str, float]], *, runtime: str) -> dict[str, Any]:
    """The results of a plan made without a student (``plan_only``), also written to plan.json."""
    res = {"plan_only": True, "budget": plan.budget, "plan": plan.choices, "map_cost": plan.cost,
           "map_saved": plan.saved, "needed": plan.needed, "runtime": runtime, "retiming": rounds}
    write_staged({run / "plan.json": json.dumps(res, indent=2)})
    return res


def _build_planned(s: Session, ctx: Any, plan: Plan, *, smap: dict[str, Any], run: Path, finetune: PlanFinetune,
                   timing: Timing, target: Target, llama: LlamaCppTimer | None, map_units: Path | None
                   ) -> tuple[SwappableModel, dict[str, Any]]:
    """The student of ``plan`` made (``make_student``) and measured (``_measure_plan``): (student, results)."""
    options = {o["name"]: option_from_dict(o) for o in smap["options"]}
    student = make_student(s, ctx, {i: options[name] for i, name in plan.choices.items()}, run=run,
                           origin=f"plan from {smap.get('teacher')} map: {plan.budget}", finetune=finetune,
                           map_units=map_units)
    return student, _measure_plan(s, student, smap=smap, plan=plan, finetune=finetune, trained=bool(plan.choices),
                                  timing=timing, target=target, llama=llama)


def _write_plan(plan: Plan, run: Path) -> None:
    """plan.log in ``run``, its lines in the debug log and the choices in one info line."""
    write_staged({run / "plan.log": "\n".join(plan.lines) + "\n"})
    for line in plan.lines:
        log.debug("plan: %s", line)
    log.info("plan: %s (%s)", ", ".join(f"{i}: {c}" for i, c in sorted(plan.choices.items())) or "the teacher",
             run / "plan.log")


def _plan_texts(s: Session, student: SwappableModel, texts: Sequence[EvalText], *, docs: dict, run: Path,
                test: dict[str, Any], chat: ChatConfig | None = None) -> dict[str, Any]:
    """The planned student on each named text (its results' "texts"; with the ``test`` split's metrics, tensorboard
    scalars in ``run/tb``) and, with ``chat``, on the chat prompts as an evaluation compares it ("chat")."""
    out: dict[str, Any] = {}
    if chat is not None:
        out["chat"] = _chat(s, student, chat, out=run)
    if not texts:
        return out
    scored = score_texts(s, student, texts, docs=docs)
    write_scalars(run, test, scored)
    return {"texts": scored, **out}


def _chat(s: Session, student: SwappableModel, chat: ChatConfig, *, out: Path) -> dict[str, Any]:
    """The student's chat replies compared with the teacher's (``evaluation.chat``; results.json's "chat")."""
    return evaluate_chat(s.teacher, student.to(s.device), s.tokenizer, teacher_name=s.teacher_name, config=chat,
                         out=out)


def _map_units(given: dict | str | Path | None, built: Path | None) -> Path | None:
    """The trained units beside the map: in the map built now, or next to the sensitivity.json given."""
    if built is not None:
        return built / "units"
    if isinstance(given, (str, Path)):
        p = Path(given)
        return (p if p.is_dir() else p.parent) / "units"
    return None


def _given_map(session: Session | SessionConfig, given: dict | str | Path | None) -> dict[str, Any] | None:
    """The map given (a dict, its file or folder) checked against its schema and the teacher's layer count (from
    its config alone), before the teacher loads and before anything is planned; None when none is given."""
    if given is None:
        return None
    n = len(_teacher_plan(session).layers)
    if isinstance(given, dict):
        return validate_map(given, "map", teacher_layers=n)
    return read_map(given, teacher_layers=n)


def _plan_map(s: Session, smap: dict[str, Any] | None, *, config: MapConfig, train: TrainConfig, out: Path,
              record: dict[str, Any], target: Target) -> tuple[dict[str, Any], Path | None]:
    """The map to plan from: the one given (checked by ``_given_map``; made for this teacher, unless
    ``train.force``; only its entries ``config.runtime`` runs), or one built now; either way, a ``target`` it cannot
    reach is refused first (before a map is built: its options as untrained units)."""
    if smap is None:
        _check_reach(s, None, config=config, target=target)  # before minutes of training for an unreachable target
        return make_map(s, config, train=train, out=out, record=record), out
    if smap.get("teacher_hash") != s.teacher_hash and not train.force:
        raise CheckpointError(f"`map` was made for another teacher ({smap.get('teacher')}); pass `force` to use it")
    smap = runtime_map(smap, s.teacher.config, config.runtime)
    _check_reach(s, smap, config=config, target=target)
    return smap, None


def _check_reach(s: Session, smap: dict[str, Any] | None, *, config: MapConfig, target: Target) -> None:
    """Refuse a target the map (or, before it is built, the options it would map, made untrained and timed alone)
    cannot reach, saying what they reach (SettingError)."""
    if smap is None:
        n = len(s.teacher.layers)
        options = map_options(s.teacher, config)
        smap = reach_map(s.teacher, options, [i for i in (config.layers or range(n)) if i < n],
                         timing=config.timing(s.data.seq_len) if target.speedup else None)
    problem = budget_problem(smap, target.speedup, target.params, target_kv_cache=target.kv_cache,
                             speed=target.speed)
    if problem:
        raise SettingError(problem)


def _measure_plan(s: Session, student: SwappableModel, *, smap: dict[str, Any], plan: Plan,
                  finetune: PlanFinetune, trained: bool, timing: Timing, target: Target,
                  llama: LlamaCppTimer | None = None) -> dict[str, Any]:
    """The planned student on the test split and timed against the teacher (prefill and, for a decoder, decode;
    with ``llama``, in llama.cpp too: ``llama_cpp``), beside what the map predicted."""
    teacher = s.teacher
    test_loader, _ = s.loader(s.first_sentences("test", finetune.test_sentences), shuffle=False)
    m = compare_models(teacher, student, test_loader, tokenizer=s.tokenizer, device=s.device, keep_rows=False).metrics
    res = {"target": plan.budget, "target_kind": target.name, "plan": {str(i): n for i, n in plan.choices.items()},
           "plan_cost": plan.cost, "metrics": {k: m[k] for k in PLAN_REPORTED if k in m},
           f"test_{counted(m)}": m["sentences"], "student_params": student.num_parameters(),
           "teacher_params": teacher.num_parameters(), "device": str(s.device),
           "teacher_kv_bytes_per_token": teacher.config.kv_cache_bytes_per_token(),
           "student_kv_bytes_per_token": student.config.kv_cache_bytes_per_token(),
           "fine_tune_epochs": finetune.epochs if trained else 0}
    load = LoadLog()
    for speed in ("prefill", "decode") if teacher.TASK == "causal" else ("prefill",):
        total_key, gain_key, _ = SPEED_KEYS[speed]
        ms = timing.ms({who: speed_fn(model, speed, batch=timing.batch, seq=timing.seq)
                        for who, model in (("teacher", teacher), ("student", student))}, s.device, load=load)
        predicted = smap["timing"][total_key] - sum(e[gain_key] for e in smap["entries"]
                                                   if plan.choices.get(e["layer"]) == e["option"])
        prefix = "" if speed == "prefill" else "decode_"  # the prefill keys keep their names of the BERT days
        res.update({f"{prefix}map_encoder_ms": smap["timing"][total_key], f"{prefix}predicted_encoder_ms": predicted,
                    f"{prefix}predicted_speedup": smap["timing"][total_key] / predicted,
                    f"{prefix}measured_encoder_ms": {"teacher": ms["teacher"], "student": ms["student"]},
                    f"{prefix}measured_speedup": ms["teacher"] / ms["student"]})
    res["timing_load"] = load.summary()
    if llama is not None:
        res["llama_cpp"] = llama.speeds(student)
    return res


def _target_met(res: dict[str, Any], target: Target) -> dict[str, Any]:
    if target.params is not None:
        return {"target_met": res["student_params"] <= target.params}
    if target.kv_cache is not None:
        return {"target_met": res["student_kv_bytes_per_token"]
                <= target.kv_cache * res["teacher_kv_bytes_per_token"] + 1e-9}
    prefix = "" if target.speed == "prefill" else "decode_"
    measured = res["llama_cpp"][f"{target.speed}_speedup"] if "llama_cpp" in res else res[f"{prefix}measured_speedup"]
    return {"target_met_by_map": res[f"{prefix}predicted_speedup"] >= target.speedup - 1e-9,
            "target_met_measured": measured >= target.speedup}


# ---- export ----
def export(model: SwappableModel, tokenizer, *, hf_dir: str | Path | None = None, hf_layout: str = "auto",
           onnx_file: str | Path | None = None, gguf_file: str | Path | None = None,
           gguf_type: str = "f16") -> list[str]:
    """Write ``model`` for use outside this repository: a Hugging Face folder (plain BertForMaskedLM, or CompactBERT
    loaded with trust_remote_code=True; a decoder with ``hf_layout`` nemotron-nas as DeciLM), ONNX graphs checked
    against PyTorch with ONNX Runtime, and / or a decoder as a GGUF file for llama.cpp (``gguf_type`` f32, f16 or
    q8_0). Returns one line per file written."""
    cfg = ExportConfig(hf_dir=str(hf_dir) if hf_dir else None, hf_layout=hf_layout,
                       onnx_file=str(onnx_file) if onnx_file else None,
                       gguf_file=str(gguf_file) if gguf_file else None, gguf_type=gguf_type)
    check_export_targets(cfg)
    return run_exports(model, tokenizer, cfg)
