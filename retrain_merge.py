"""Replace two consecutive teacher layers (N, N+1) by one trained layer.

    python retrain_merge.py --block 6 --block_heads 12 --block_d_k 64
    python retrain_merge.py --block all-pairs --conditioned --teacher DIR --data-dir DIR
    python retrain_merge.py --block all-pairs --cache-only --teacher-device-map auto --teacher DIR   # the cache alone
"""
from __future__ import annotations

from utils.stops import install_stop_handlers

if __name__ == "__main__":  # first, before the imports below: a stop while they load is one line, 143 / 130
    install_stop_handlers()

import argparse
import sys
from pathlib import Path

from utils import api
from utils.cli.configs import cache_dir, merge_loss, record, session_config, train_config, unit_shape
from utils.cli.groups import add_shape_args
from utils.cli.output import print_cached, print_units
from utils.cli.parser import add_cache_only_arg, add_training_args, common_parser
from utils.cli.recipes import MERGE, add_heads_alias, reject, use_recipes
from utils.cli.run import run_main
from utils.cli.types import criterion_arg, positive_float, positive_int, probability
from utils.session import teacher_config

# a merged layer's output is a hidden state: a softmax over its features (CrossEntropy) means nothing there
MERGE_CRITERION = criterion_arg("--criterion", "hidden", exclude=("CrossEntropy",), what="a merged layer")


def pair_arg(s: str) -> str:
    if s in ("all-pairs", "all") or s.isdigit():
        return "all-pairs" if s == "all" else s
    raise argparse.ArgumentTypeError(f"--block must be a layer index N (merging N and N+1) or 'all-pairs', got '{s}'")


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints")
    add_training_args(p, epochs=5, lr=5e-4)
    g = p.add_argument_group("merge")
    g.add_argument("--block", type=pair_arg, required=True,
                   help="first teacher layer N of the pair (N, N+1), or 'all-pairs' for (0,1), (2,3), ...")
    add_shape_args(g, ffn=True)
    g.add_argument("--criterion", type=MERGE_CRITERION, default="MSE",
                   help=f"loss on the hidden state: {', '.join(MERGE_CRITERION.allowed)}")
    g.add_argument("--loss-on", choices=["hidden", "mlm"], default="hidden",
                   help="hidden state leaving N+1, or KL on the teacher's language-model output through its frozen "
                        "rest (mlm: masked-LM distributions for BERT, next-token distributions for a decoder)")
    g.add_argument("--init", choices=["first", "second", "average", "random"])
    g.add_argument("--mask-inputs", action=argparse.BooleanOptionalAction,
                   help="one [MASK] per training sentence, redrawn every step (the seed's training data)")
    g.add_argument("--dropout", type=probability,
                   help="dropout of the merged layer (attention probabilities and hidden states; default: the "
                        "teacher's)")
    g.add_argument("--model-checkpoint", default=None,
                   help="start the merged layer(s) from this merged-layer checkpoint (or a run folder, searched by "
                        "metadata)")
    g.add_argument("--conditioned", action="store_true",
                   help="inputs come from the teacher whose earlier pairs are already merged (found by metadata)")
    g.add_argument("--conditioned-on", default=None,
                   help="folder with the earlier merged layers (default: this run's folder)")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="for --loss-on mlm")
    g.add_argument("--cache-teacher", action="store_true", help="compute teacher features once and reuse them")
    g.add_argument("--cache-dir", default=None, help="teacher feature cache (default: <--out>/cache)")
    add_cache_only_arg(g, "in_N and out_N+1 of each pair")
    g.add_argument("--max-steps-per-epoch", type=positive_int("--max-steps-per-epoch"), default=None,
                   help=argparse.SUPPRESS)
    add_heads_alias(p)
    reject(p, "the seed stored it for merged layers but never used it; the merged layer's dropout is --dropout",
           "--block-dropout")
    use_recipes(p, MERGE)
    return p


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    n_layers = teacher_config(args.teacher).num_hidden_layers
    if args.block != "all-pairs" and int(args.block) + 1 >= n_layers:
        parser.error(f"--block {args.block}: layer {int(args.block) + 1} does not exist, so there is no pair to merge "
                     f"(the teacher has layers 0..{n_layers - 1}; N may be 0..{n_layers - 2})")
    if n_layers < 2:
        parser.error("the teacher has a single layer: nothing to merge")
    if args.mask_inputs and args.loss_on == "mlm":
        parser.error("--mask-inputs does not combine with --loss-on mlm, which masks its inputs itself")
    if args.cache_only:
        cached = api.cache_features(session_config(args), units="pairs",
                                    layers=None if args.block == "all-pairs" else [int(args.block)],
                                    conditioned=args.conditioned, cache_dir=cache_dir(args, used=True))
        print_cached(cached)
        return cached.folder
    done = api.retrain_merges(session_config(args), pairs=None if args.block == "all-pairs" else [int(args.block)],
                              shape=unit_shape(args), loss=merge_loss(args), train=train_config(args),
                              init=args.init, start_from=args.model_checkpoint, dropout=args.dropout,
                              conditioned=args.conditioned, conditioned_on=args.conditioned_on, out=args.out,
                              run_name=args.run_name, name_suffix="_seed" if args.recipe == "seed" else "",
                              cache_dir=cache_dir(args, used=args.cache_teacher), print_samples=args.print_samples,
                              record=record(args))
    print_units(done)
    return done.run_dir


if __name__ == "__main__":
    parser = build_parser()
    sys.exit(run_main(lambda a: main(a, parser), parser))
