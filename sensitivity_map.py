"""Per-layer sensitivity map: which layers can be simplified, and by how much.

    python sensitivity_map.py --teacher DIR --data-dir DIR --epochs 1 --max-train-sentences 2000 --eval-sentences 300

For every teacher layer and every option (heads: 2/3, 1/2, 1/3, 1/6 of the teacher's, i.e. 8/6/4/2 of 12; head_dim
halved; merged with the next layer; FFN width halved; combined in one unit: heads 4 + FFN 768 and heads 2 + FFN 384
in one layer, a merged pair with 6 heads + FFN 768, for budgets beyond one option per layer) one unit is initialised
from the teacher, retrained alone on the teacher's cached features (all layers of an option together, one teacher
pass for everything), put alone into the teacher and compared with it on the validation split (top-1 drop,
agreement, KL at one mask per sentence); its encoder latency saving is timed round-robin on this device. Writes
sensitivity.json, sensitivity.md (layers x options table) and sensitivity.png (heatmaps) to --out/--run-name;
plan_student.py plans from the JSON.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.cli import add_training_args, common_parser, positive_float, positive_int
from utils.sensitivity import OPTION_KINDS, build_map, default_options, session_context, write_map
from utils.session import claim_units, run_main, start
from utils.train import make_train_config

log = logging.getLogger("simplifying_transformers")

BUDGET = ("Budget: each epoch retrains every unit over the training sentences, and every unit costs one comparison "
          "with the teacher over the --eval-sentences. Measured: the 6-layer MiniLM MLM teacher (hidden 384, 12 "
          "heads) on a shared 2-core CPU, OMP_NUM_THREADS=1, '--epochs 1 --max-train-sentences 2000 "
          "--eval-sentences 300 --latency-reps 10' mapped 6 layers x 10 options (58 units) in about 10 minutes "
          "(docs/results.md). Time grows with layers x options x (sentences x epochs + eval sentences); a bert-base "
          "teacher wants a GPU (--device cuda).")


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


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints")
    p.epilog = BUDGET
    add_training_args(p, epochs=1, lr=1e-3)
    add_map_args(p)
    return p


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


def main(args: argparse.Namespace) -> Path:
    out = Path(args.out) / (args.run_name or "sensitivity")
    with claim_units([out], "sensitivity map"):
        make_map(args, start(args), out)
    return out


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
