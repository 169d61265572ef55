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
import sys
from pathlib import Path

from utils import api
from utils.cli.configs import map_config, plan_finetune, record, session_config, train_config
from utils.cli.groups import add_finetune_args, add_map_args
from utils.cli.parser import add_training_args, common_parser
from utils.cli.run import run_main
from utils.planning.planner import COSTS


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
    done = api.plan_student(session_config(args), target_speedup=args.target_speedup,
                            target_params=args.target_params, map=args.map, cost=args.cost, config=map_config(args),
                            finetune=plan_finetune(args), train=train_config(args), out=run, record=record(args))
    if done.map_built is not None:
        print((done.map_built / "sensitivity.md").read_text())
    res, m = done.results, done.results["metrics"]
    ms = res["measured_encoder_ms"]
    print("\n".join(done.plan.lines))
    print(f"| model | params | encoder ms | speed-up | top-1 | agreement | KL |\n|---|---:|---:|---:|---:|---:|---:|\n"
          f"| teacher | {res['teacher_params']:,} | {ms['teacher']:.1f} | 1.00x | {m.get('teacher_top1', float('nan')):.4f}"
          f" | 1 | 0 |\n| planned student | {res['student_params']:,} | {ms['student']:.1f} | "
          f"{res['measured_speedup']:.2f}x | {m.get('student_top1', float('nan')):.4f} | "
          f"{m.get('agreement_top1', float('nan')):.4f} | {m.get('kl_teacher_student', float('nan')):.4f} |")
    return run


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
