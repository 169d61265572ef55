"""What sensitivity_map.py, plan_student.py and bench/plans.py share: the map's flags and its making, the
fine-tune flags, and building a (planned or uniform, trained or untrained) student from map options."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from models import BertForMaskedLM
from models.compress import clone_model
from .assemble import load_model, save_model
from .cli import positive_float, positive_int
from .distill import ModelDistill, lm_targets, describe_losses
from .sensitivity import (OPTION_KINDS, build_map, build_units, compose_units, default_options, session_context,
                          train_units, write_map)
from .train import Trainer, TrainConfig, Unit, make_train_config

log = logging.getLogger("simplifying_transformers")


def int_list(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{s}'") from None
    if not v or any(x <= 0 for x in v):
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{s}'")
    return v


def option_kinds(s: str) -> tuple[str, ...]:
    v = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [x for x in v if x not in OPTION_KINDS]
    if not v or bad:
        raise argparse.ArgumentTypeError(f"options are a comma-separated subset of {','.join(OPTION_KINDS)}; got '{s}'")
    return v


def add_map_args(p: argparse.ArgumentParser) -> None:
    """Flags of the map (also the planner's when it builds the map itself)."""
    g = p.add_argument_group("map")
    g.add_argument("--options", type=option_kinds, default=OPTION_KINDS,
                   help="which kinds of option to map (combined: fewer heads and a narrower FFN in one layer or "
                        "merged pair, for budgets beyond one option per layer)")
    g.add_argument("--heads-set", type=int_list, default=None,
                   help="head counts to map, e.g. 8,6,4,2 (default: 2/3, 1/2, 1/3, 1/6 of the teacher's)")
    g.add_argument("--layers", type=int_list, default=None, help="layers to map (default: all); 0-based")
    g.add_argument("--block-loss", choices=["output", "relations", "output+relations"], default="output",
                   help="loss of the attention-block units (see retrain_single_block.py --loss-on)")
    g.add_argument("--relation-weight", type=positive_float, default=1.0, help="with --block-loss ...relations")
    g.add_argument("--max-train-sentences", type=positive_int("--max-train-sentences"), default=None,
                   help="train on the first N sentences of the training split (budget)")
    g.add_argument("--eval-sentences", type=positive_int("--eval-sentences"), default=None,
                   help="measure on the first N sentences of the validation split (budget; default all)")
    g.add_argument("--valid-batches", type=positive_int("--valid-batches"), default=4,
                   help="batches of the per-epoch validation loss (best-checkpoint choice)")
    g.add_argument("--latency-reps", type=positive_int("--latency-reps"), default=20,
                   help="timed round-robin repeats per module (median)")
    g.add_argument("--latency-batch", type=positive_int("--latency-batch"), default=32)
    g.add_argument("--no-cache", action="store_true", help="recompute teacher features every batch")
    g.add_argument("--cache-dir", default=None, help="teacher feature cache (default: <--out>/cache; shared, safe)")
    g.add_argument("--max-steps-per-epoch", type=positive_int("--max-steps-per-epoch"), default=None,
                   help="cap on training steps per epoch (budget)")


def make_map(args: argparse.Namespace, s, out: Path) -> dict:
    """Build and write the map for the teacher of Session ``s`` into ``out``; returns it."""
    n = len(s.teacher.layers)
    layers = args.layers or list(range(n))
    bad = [i for i in layers if i >= n]
    if bad:
        raise IndexError(f"--layers {bad}: the teacher has layers 0..{n - 1}")
    options = default_options(s.teacher.config, args.heads_set, args.options)
    log.info("mapping layers %s x options %s", layers, [o.name for o in options])
    ctx = session_context(s, args, make_train_config(args))
    smap = build_map(ctx, options, layers, ctx.valid_loader, out / "units", args.latency_reps, args.latency_batch,
                     args.seq_len)
    smap["args"] = {k: v for k, v in vars(args).items()}
    paths = write_map(smap, out)
    print((out / "sensitivity.md").read_text())
    log.info("map written: %s", ", ".join(str(p) for p in paths.values()))
    return smap


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    """The end-to-end fine-tune and test-budget flags (also bench/plans.py's)."""
    g = p.add_argument_group("fine-tune (end to end, KD)")
    g.add_argument("--ft-epochs", type=int, default=1, help="0: no fine-tune")
    g.add_argument("--ft-lr", type=positive_float, default=2e-4)
    g.add_argument("--temperature", type=positive_float, default=2.0)
    g.add_argument("--ft-relation-weight", type=float, default=0.0, help="relation distillation in the fine-tune")
    g.add_argument("--test-sentences", type=positive_int("--test-sentences"), default=None,
                   help="evaluate on the first N test sentences (budget; default all)")


def make_student(args: argparse.Namespace, s, ctx, choices: dict, run: Path, origin: str, train: bool = True
                 ) -> tuple[BertForMaskedLM, dict]:
    """The student of ``choices`` (first teacher layer -> Option): its units initialised from the teacher and, with
    ``train``, retrained on the teacher's features (``<run>/units``), composed into a copy of the teacher and
    fine-tuned end to end by KD (``--ft-epochs``); saved as ``<run>/model/best``. ``train=False`` gives the untrained
    baseline of the same plan (kept top heads, top FFN neurons, the first layer of a merged pair). Returns
    (student, units)."""
    teacher = s.teacher
    units = build_units(ctx, choices)
    if units and train:
        train_units(ctx, units, run / "units")
    student = clone_model(compose_units(teacher, units)).to(s.device)
    log.info("student plan:\n%s", student.config.describe())
    sources = [origin] + [f"layer {i}: {b.option.name} ({b.note}{'' if train else '; untrained'})"
                          for i, b in sorted(units.items())]
    meta = {"teacher": str(args.teacher), "teacher_hash": s.teacher_hash, "sources": sources,
            "plan": {str(i): b.option.name for i, b in units.items()}}
    if train and args.ft_epochs > 0 and units:
        masker = lm_targets(s.tokenizer, teacher) if teacher.has_mlm_head else None
        task = ModelDistill(teacher, student, masker, 1.0, 0.0, 0.0, "cosine", args.temperature, args.seed,
                            args.ft_relation_weight).to(s.device)
        cfg = TrainConfig(**{**make_train_config(args).__dict__, "epochs": args.ft_epochs, "lr": args.ft_lr})
        unit = Unit("model", student, run / "model", {"kind": "model", "config": student.config.to_dict(), **meta,
                                                      **describe_losses(task)})
        Trainer(task, [unit], cfg, run, s.device, lambda: task.evaluate(ctx.valid_loader), setup=ctx.setup,
                record=ctx.record, run_meta={"run_dir": str(run)}).fit(ctx.train_loader, ctx.sampler)
        student, _ = load_model(run / "model" / "best")
        student = student.to(s.device)
    else:
        save_model(student, run / "model" / "best", meta)
    return student, units


def read_map(path: str) -> dict:
    """A map written by sensitivity_map.py, checked against its schema (PlanError naming the file and field)."""
    from .sensitivity import PlanError, validate_map

    p = Path(path)
    p = p / "sensitivity.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"--map: no sensitivity map at '{p}' (run sensitivity_map.py first, or leave --map out)")
    try:
        smap = json.loads(p.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PlanError(f"'{p}' is not a sensitivity map: not valid JSON ({' '.join(str(e).split())[:100]})") from None
    return validate_map(smap, p)
