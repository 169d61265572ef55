"""Fine-tune a compressed model (merged layers and/or retrained blocks) end to end by distillation.

    python finetune_merged.py                                   # merged layers found under checkpoints/
    python finetune_merged.py --merged checkpoints/merge_h12_d64_f3072_mse --export-hf checkpoints/finetuned_hf
    python finetune_merged.py --drop-every-second               # baseline: keep layers 0, 2, 4, ... only
    python finetune_merged.py --teacher DIR --drop-layers 3,17  # a decoder without layers 3 and 17
    torchrun --nproc-per-node 8 finetune_merged.py --fsdp --dtype bf16 --activation-checkpointing ...  # 8B on 8 GPUs
"""
from __future__ import annotations

from utils.stops import install_stop_handlers

if __name__ == "__main__":  # first, before the imports below: a stop while they load is one line, 143 / 130
    install_stop_handlers()

import argparse
import sys
from pathlib import Path

from utils import api
from utils.cli.configs import cache_dir, export_config, finetune_loss, record, session_config, train_config
from utils.cli.groups import add_export_args, add_sharding_args, add_topk_arg
from utils.cli.output import print_evaluation
from utils.cli.parser import add_training_args, common_parser
from utils.cli.recipes import FINETUNE, alias, given, reject, use_recipes
from utils.cli.run import run_main
from utils.cli.types import (criterion_arg, layer_list, non_negative_float, positive_float, positive_int, probability,
                             term_weight)
from utils.training.tasks import BALANCE_RATIO


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints")
    add_training_args(p, epochs=3, lr=1e-4)
    add_sharding_args(p)
    g = p.add_argument_group("student")
    g.add_argument("--merged", nargs="+", default=["checkpoints"],
                   help="folders of merged-layer / block / model checkpoints, found by metadata (searched recursively)")
    g.add_argument("--which", choices=["best", "last"], default="best")
    g.add_argument("--dropout", type=probability,
                   help="dropout of the student (attention probabilities and hidden states; default: the teacher's)")
    g.add_argument("--drop-every-second", action="store_true",
                   help="baseline student: the teacher with layers 1, 3, 5, ... removed (no checkpoints needed)")
    g.add_argument("--drop-layers", type=layer_list, default=[], metavar="I,J,...",
                   help="teacher layers to drop (0-based, e.g. 3,17; decoders): each becomes a layer with no attention "
                        "and no feed-forward part; with the checkpoints of --merged when it is given, else alone")
    g = p.add_argument_group("objective")
    g.add_argument("--kl-weight", type=non_negative_float("--kl-weight"), default=1.0,
                   help="KL(teacher || student) at masked positions")
    g.add_argument("--mlm-weight", type=term_weight("--mlm-weight", zero=True), default=0.0,
                   help="hard-label masked-LM cross-entropy (0: off; 'balanced': see --relation-weight)")
    g.add_argument("--hidden-weight", type=term_weight("--hidden-weight", zero=True), default=0.0,
                   help="hidden-state loss at matched layers (0: off; 'balanced': see --relation-weight)")
    hidden = criterion_arg("--hidden-criterion", "hidden", exclude=("CrossEntropy",))
    g.add_argument("--hidden-criterion", type=hidden, default="cosine",
                   help=f"hidden-state loss: {', '.join(hidden.allowed)}")
    g.add_argument("--temperature", type=positive_float, default=None,
                   help="KD temperature (default: 2 for a masked LM, 1 for a decoder, whose perplexity is at 1)")
    g.add_argument("--relation-weight", type=term_weight("--relation-weight", zero=True), default=0.0,
                   help="MiniLMv2 query/key/value self-attention relation KL at matched layers (any head counts); "
                        "0: off (the default); a number: that fixed weight; 'balanced': scaled to --balance-ratio "
                        "times the KL term (without a masked-LM head: the hidden-state term) at the start, both "
                        "measured once on the first training batch with the student as it starts; the scale is "
                        "stored in the checkpoint and run.json, and a --resume reuses it")
    g.add_argument("--balance-ratio", type=positive_float, default=BALANCE_RATIO,
                   help="a 'balanced' term starts at this many times the KL term (the hidden-state term without a "
                        "masked-LM head)")
    g.add_argument("--relation-heads", type=positive_int("--relation-heads"), default=None,
                   help="relation heads (must divide teacher and student heads x head_dim; default: automatic)")
    add_topk_arg(g)
    g.add_argument("--cache-dir", default=None, help="the --teacher-topk cache (default: <--out>/cache; shared, safe)")
    g = p.add_argument_group("output")
    add_export_args(g)
    g.add_argument("--eval-batches", type=positive_int("--eval-batches"), default=None,
                   help="limit the per-epoch validation comparison to N batches")
    g.add_argument("--max-steps-per-epoch", type=positive_int("--max-steps-per-epoch"), default=None,
                   help=argparse.SUPPRESS)
    alias(p, "--merged", "--model-checkpoint")
    reject(p, "no single block is trained here; the student's dropout is --dropout", "--block-dropout")
    use_recipes(p, FINETUNE)
    return p


def main(args: argparse.Namespace) -> Path:
    checkpoints = [] if args.drop_layers and not given(args, "merged") else args.merged
    done = api.finetune(session_config(args), checkpoints=checkpoints, drop_every_second=args.drop_every_second,
                        drop_layers=args.drop_layers,
                        which=args.which, objective=finetune_loss(args), train=train_config(args),
                        dropout=args.dropout, out=args.out, run_name=args.run_name, eval_batches=args.eval_batches,
                        export=export_config(args), print_samples=args.print_samples, record=record(args),
                        cache_dir=cache_dir(args, used=args.teacher_topk is not None))
    print_evaluation(done.evaluation)
    return done.run_dir


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
