"""Plan, train, fine-tune and evaluate a student under a speed or size budget, from a per-layer sensitivity map.

    python plan_student.py --target-speedup 1.5 --map checkpoints/sensitivity --teacher DIR --data-dir DIR
    python plan_student.py --target-params 18e6 --teacher DIR --data-dir DIR   # builds the map first (map flags)

The plan takes one option per layer (a merge takes two) from the map so that the encoder latency (the map's
timings on its device) or the parameter count meets the target, at the least summed cost (--cost: the units' KL,
top-1 drop or disagreement measured alone in the teacher); the choice is explained in <run>/plan.log. Then the
plan's units are retrained from the teacher cache, put together, the whole student is fine-tuned end to end by KD
(KL at masked positions, optionally + relation distillation), evaluated on the test split, and its encoder latency
is measured against the teacher's on this device.
"""
from __future__ import annotations

from utils.stops import install_stop_handlers

if __name__ == "__main__":  # first, before the imports below: a stop while they load is one line, 143 / 130
    install_stop_handlers()

import argparse
import json
import logging
import sys
from pathlib import Path

from utils.checkpoint import CheckpointError
from utils.cli import UsageError, add_training_args, common_parser
from utils.evaluate import compare_models
from utils.planning import add_finetune_args, add_map_args, make_map, make_student, read_map
from utils.sensitivity import (COSTS, budget_problem, choose_plan, default_options, encoder_inputs, limited_sentences,
                               option_from_dict, reach_map, round_robin_ms, session_context)
from utils.session import claim_units, run_main, start
from utils.train import make_train_config

log = logging.getLogger("simplifying_transformers")
REPORTED = ("student_top1", "student_top5", "agreement_top1", "kl_teacher_student", "hidden_cosine", "teacher_top1")


def params_arg(s: str) -> int:
    try:
        v = float(s.lower().rstrip("m")) * (1e6 if s.lower().endswith("m") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target-params must be a parameter count such as 18e6 or 18M, got '{s}'"
                                         ) from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"--target-params must be > 0, got {s}")
    return int(v)


def speedup_arg(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target-speedup must be a number such as 1.5, got '{s}'") from None
    if not 1 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"--target-speedup must be a finite number >= 1 (1: the teacher's own "
                                         f"speed), got {s}")
    return v


def check_reach(args: argparse.Namespace, s, smap: dict | None) -> None:
    """Refuse a target the map (``smap``), or before it is built the options it would map, cannot reach, saying what
    they reach (UsageError: exit code 2); before a map is built, its units are made untrained and timed alone."""
    if smap is None:
        n = len(s.teacher.layers)
        options = default_options(s.teacher.config, args.heads_set, args.options)
        smap = reach_map(s.teacher, options, [i for i in (args.layers or range(n)) if i < n],
                         args.latency_reps if args.target_speedup else 0, args.latency_batch, args.seq_len)
    problem = budget_problem(smap, args.target_speedup, args.target_params)
    if problem:
        raise UsageError(problem)


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints")
    add_training_args(p, epochs=1, lr=1e-3)
    g = p.add_argument_group("plan")
    t = g.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-speedup", type=speedup_arg, default=None,
                   help="encoder speed-up over the teacher (the map's measured latencies, on the map's device)")
    t.add_argument("--target-params", type=params_arg, default=None,
                   help="at most this many parameters in the whole student (e.g. 18e6 or 18M)")
    g.add_argument("--map", default=None,
                   help="sensitivity.json or its folder (sensitivity_map.py); default: build it into <run>/map")
    g.add_argument("--cost", choices=list(COSTS), default="kl", help="what a unit costs, from the map")
    add_finetune_args(p)
    add_map_args(p)
    return p


def main(args: argparse.Namespace) -> Path:
    run = Path(args.out) / (args.run_name or (f"plan_speedup{args.target_speedup:g}" if args.target_speedup
                                              else f"plan_params{args.target_params}"))
    with claim_units([run], "planned student"):
        return plan_and_train(args, run)


def plan_and_train(args: argparse.Namespace, run: Path) -> Path:
    s = start(args)
    teacher = s.teacher
    if args.map:
        smap = read_map(args.map)
        if smap.get("teacher_hash") != s.teacher_hash and not args.force:
            raise CheckpointError(f"--map was made for another teacher ({smap.get('teacher')}); pass --force to use it")
        check_reach(args, s, smap)
    else:
        check_reach(args, s, None)  # before the map is built: minutes of training for a target it cannot reach
        smap = make_map(args, s, run / "map")
    plan = choose_plan(smap, args.target_speedup, args.target_params, args.cost)
    run.mkdir(parents=True, exist_ok=True)
    (run / "plan.log").write_text("\n".join(plan.lines) + "\n")
    for line in plan.lines:
        log.info("plan: %s", line)
    options = {o["name"]: option_from_dict(o) for o in smap["options"]}
    ctx = session_context(s, args, make_train_config(args))
    student, units = make_student(args, s, ctx, {i: options[name] for i, name in plan.choices.items()}, run,
                                  f"plan from {smap.get('teacher')} map: {plan.budget}")
    test_loader, _ = s.loader(limited_sentences(s, "test", args.test_sentences), shuffle=False)
    m = compare_models(teacher, student, test_loader, s.tokenizer, s.device, keep_rows=False).metrics
    ids, att = encoder_inputs(teacher, args.latency_batch, args.seq_len, s.device)
    ms = round_robin_ms({"teacher": lambda: teacher(ids, att, with_logits=False),
                         "student": lambda: student(ids, att, with_logits=False)}, args.latency_reps, s.device)
    predicted_ms = smap["timing"]["encoder_ms"] - (plan.saved if args.target_speedup else sum(
        e["latency_saved_ms"] for e in smap["entries"] if plan.choices.get(e["layer"]) == e["option"]))
    res = {"target": plan.budget, "plan": {str(i): n for i, n in plan.choices.items()}, "plan_cost": plan.cost,
           "metrics": {k: m[k] for k in REPORTED if k in m}, "test_sentences": m["sentences"],
           "student_params": student.num_parameters(), "teacher_params": teacher.num_parameters(),
           "map_encoder_ms": smap["timing"]["encoder_ms"], "predicted_encoder_ms": predicted_ms,
           "predicted_speedup": smap["timing"]["encoder_ms"] / predicted_ms,
           "measured_encoder_ms": {"teacher": ms["teacher"], "student": ms["student"]},
           "measured_speedup": ms["teacher"] / ms["student"], "device": str(s.device),
           "fine_tune_epochs": args.ft_epochs if units else 0}
    if args.target_params is not None:
        res["target_met"] = res["student_params"] <= args.target_params
    else:
        res["target_met_by_map"] = res["predicted_speedup"] >= args.target_speedup - 1e-9
        res["target_met_measured"] = res["measured_speedup"] >= args.target_speedup
    (run / "results.json").write_text(json.dumps(res, indent=2))
    print("\n".join(plan.lines))
    print(f"| model | params | encoder ms | speed-up | top-1 | agreement | KL |\n|---|---:|---:|---:|---:|---:|---:|\n"
          f"| teacher | {res['teacher_params']:,} | {ms['teacher']:.1f} | 1.00x | {m.get('teacher_top1', float('nan')):.4f}"
          f" | 1 | 0 |\n| planned student | {res['student_params']:,} | {ms['student']:.1f} | "
          f"{res['measured_speedup']:.2f}x | {m.get('student_top1', float('nan')):.4f} | "
          f"{m.get('agreement_top1', float('nan')):.4f} | {m.get('kl_teacher_student', float('nan')):.4f} |")
    return run


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
