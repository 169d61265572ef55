"""Plan, train, fine-tune and evaluate a student under a speed, size or memory budget, from a sensitivity map.

    python plan_student.py --target-speedup 1.5 --map checkpoints/sensitivity --teacher DIR --data-dir DIR
    python plan_student.py --target-params 18e6 --teacher DIR --data-dir DIR   # builds the map first (map flags)
    python plan_student.py --target-speedup 2 --speed decode --map DIR ...       # a decoder: one token after a cache
    python plan_student.py --target-kv-cache 0.33 --map DIR ... --export-hf DIR  # a third of the teacher's KV cache
    python plan_student.py --target-speedup 1.5 --runtime llama.cpp --gguf-type q8_0 --map DIR ... --export-gguf F

The plan takes one option per layer (a merge takes two) from the map so that the latency (prefill: a whole sequence,
the encoder of a masked LM; decode: one new token after a KV cache; the map's timings on its device), the parameter
count or the KV-cache bytes per token meet the target, at the least summed cost (--cost: the units' KL, top-1 drop,
disagreement or perplexity increase measured alone in the teacher). A speed plan is re-timed before anything is
trained: its units composed into the teacher and timed against it, planned again while the measured speed-up falls
short. Everything is explained in <run>/plan.log. Then the plan's units are retrained from the teacher cache, put
together, the whole student is fine-tuned end to end by KD (KL at masked positions or at every next token,
optionally + relation distillation), evaluated on the test split (and on each --eval-text NAME=PATH alike; with
--chat-prompts, a decoder's greedy chat replies against the teacher's: chat.md), timed against the teacher on this
device and, with --export-hf / --export-onnx / --export-gguf, exported. --runtime llama.cpp|vllm plans only the units
that engine runs (an existing --map is re-planned from those); with llama.cpp the re-timing and the student's timing
run in llama.cpp itself, on --gguf-type GGUF files.
"""
from __future__ import annotations

from utils.stops import install_stop_handlers

if __name__ == "__main__":  # first, before the imports below: a stop while they load is one line, 143 / 130
    install_stop_handlers()

import argparse
import sys
from pathlib import Path

from utils import api
from utils.cli.configs import (chat_config, export_config, map_config, plan_finetune, record, session_config,
                               train_config)
from utils.cli.groups import (add_chat_args, add_export_args, add_finetune_args, add_map_args, add_retime_args,
                              add_sharding_args)
from utils.cli.output import plan_table
from utils.cli.parser import add_training_args, common_parser
from utils.cli.run import run_main
from utils.evaluation.chat import chat_table
from utils.cli.types import number
from utils.planning.planner import COSTS, Target


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


def kv_fraction_arg(s: str) -> float:
    try:
        v = number(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target-kv-cache must be a fraction such as 0.33 or 1/3, got '{s}'"
                                         ) from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"--target-kv-cache is a fraction of the teacher's KV cache in [0, 1), "
                                         f"got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints")
    add_training_args(p, epochs=1, lr=1e-3, keep_start=True, ffn_refit=True)
    add_sharding_args(p)  # the heal's; the map's units train unsharded
    g = p.add_argument_group("plan")
    t = g.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-speedup", type=speedup_arg, default=None,
                   help="speed-up over the teacher in --speed (the map's measured latencies, on the map's device, then "
                        "re-timed)")
    t.add_argument("--target-params", type=params_arg, default=None,
                   help="at most this many parameters in the whole student (e.g. 18e6 or 18M)")
    t.add_argument("--target-kv-cache", type=kv_fraction_arg, default=None,
                   help="at most this fraction of the teacher's KV-cache bytes per token (a decoder), e.g. 1/3 or 0.33")
    g.add_argument("--speed", choices=["prefill", "decode"], default="prefill",
                   help="what --target-speedup times: prefill (a whole sequence; a masked LM's encoder pass) or decode "
                        "(one new token after --seq-len cached ones; decoders)")
    g.add_argument("--map", default=None,
                   help="sensitivity.json or its folder (sensitivity_map.py); default: build it into <run>/map")
    g.add_argument("--cost", choices=list(COSTS), default="kl", help="what a unit costs, from the map")
    g.add_argument("--plan-only", action="store_true",
                   help="stop after the plan and its re-timing (plan.log, plan.json), before any training")
    add_retime_args(g)
    add_finetune_args(p)
    add_map_args(p)
    add_export_args(p.add_argument_group("export"))
    add_chat_args(p)
    return p


def main(args: argparse.Namespace) -> Path:
    target = Target(args.target_speedup, args.target_params, args.target_kv_cache, args.speed)
    run = Path(args.out) / (args.run_name or f"plan_{target.name}")
    done = api.plan_student(session_config(args), target_speedup=args.target_speedup,
                            target_params=args.target_params, target_kv_cache=args.target_kv_cache, speed=args.speed,
                            map=args.map, cost=args.cost, config=map_config(args), finetune=plan_finetune(args),
                            train=train_config(args), out=run, record=record(args), export=export_config(args),
                            reuse_map_units=not args.retrain_units, plan_only=args.plan_only,
                            retime_rounds=args.retime_rounds, speed_margin=args.speed_margin,
                            texts=args.eval_text, chat=chat_config(args))
    if done.map_built is not None:
        print((done.map_built / "sensitivity.md").read_text())
    print("\n".join(done.plan.lines))
    if args.plan_only:
        return run
    print(plan_table(done.results))
    if "chat" in done.results:
        print(chat_table(done.results["chat"]))
    for line in done.results.get("exports", []):
        print(line)
    return run


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
