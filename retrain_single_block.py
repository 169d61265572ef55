"""Retrain smaller attention blocks (fewer heads, smaller head_dim) to mimic the teacher's, block by block.

    python retrain_single_block.py --block 6 --criterion MSE
    python retrain_single_block.py --block 6 --criterion CrossEntropy --loss_on_logits
    python retrain_single_block.py --block 6 --criterion CrossEntropy --loss_on_scores
    python retrain_single_block.py --block all --block_heads 4 --teacher DIR --data-dir DIR --cache-teacher
    python retrain_single_block.py --block 6 --criterion MSE --recipe seed      # the seed project's setup
    python retrain_single_block.py --block all --cache-only --teacher-device-map auto --teacher DIR   # the cache alone

Decoder units (a Llama-family --teacher): --kv-heads 1 (multi-query), --attention linear (the attention replaced by
one linear map) are blocks; --attention none (the layer keeps only its feed-forward part) and --ffn-dim N (a
narrower SwiGLU) are whole layers, trained on the layer's output (checkpoint kind "layer"). A layer dropped outright
has nothing to train: python -m utils.assemble --drop-layers 3,17, or finetune_merged.py --drop-layers 3,17.
"""
from __future__ import annotations

from utils.stops import install_stop_handlers

if __name__ == "__main__":  # first, before the imports below: a stop while they load is one line, 143 / 130
    install_stop_handlers()

import argparse
import sys
from pathlib import Path

from utils import api
from utils.cli.configs import cache_dir, record, session_config, train_config, unit_shape
from utils.cli.groups import add_shape_args
from utils.cli.output import print_cached, print_units
from utils.cli.parser import add_cache_only_arg, add_training_args, common_parser
from utils.cli.recipes import BLOCK, add_heads_alias, given, reject, use_recipes
from utils.cli.run import flag_names, run_main
from utils.cli.types import criterion_arg, positive_float, positive_int, probability, term_weight
from utils.errors import SettingError
from utils.session import teacher_config
from utils.training.losses import criteria_for
from utils.training.tasks import BALANCE_RATIO, BALANCED, BlockLoss


def block_arg(s: str) -> str:
    if s == "all" or all(x.strip().isdigit() for x in s.split(",")):
        return s
    raise argparse.ArgumentTypeError(f"--block must be a layer index (0, 1, ...), a comma-separated list of them "
                                     f"(e.g. 3,9,15) or 'all', got '{s}'")


def block_layers(s: str) -> list[int] | None:
    """The layers of --block: None for 'all', else the indices given (each once, in order)."""
    return None if s == "all" else list(dict.fromkeys(int(x) for x in s.split(",")))


def _add_term_weights(g: argparse._ArgumentGroup) -> None:
    """The flags that weigh a combined loss's added term (relations, attention scores) against the output term."""
    g.add_argument("--relation-heads", type=positive_int("--relation-heads"), default=None,
                   help="relation heads the q/k/v vectors are split into (must divide teacher and student heads x "
                        "head_dim; default: the largest such divisor up to the teacher's head count)")
    g.add_argument("--relation-weight", type=term_weight("--relation-weight"), default=BALANCED,
                   help="weight of the relation term beside the output term (--loss-on output+relations): "
                        "'balanced' (the default) scales it to --balance-ratio times the output term at the start: "
                        "both are measured once per block, on the first training batch, with the block as it starts, "
                        "and the scale is stored in the block's checkpoint and run.json (a --resume reuses it); a "
                        "number is a fixed "
                        "weight (1: the behaviour before balancing, where the relation term, ~100x the output MSE on "
                        "MiniLM, swamped it)")
    g.add_argument("--score-weight", type=term_weight("--score-weight"), default=BALANCED,
                   help="weight of the attention-score term beside the output term (--loss-on output+scores): "
                        "'balanced' (the default) or a fixed number (1: the behaviour before), as --relation-weight")
    g.add_argument("--balance-ratio", type=positive_float, default=BALANCE_RATIO,
                   help="a 'balanced' term starts at this many times the output term (the default, 0.01, the "
                        "largest that never measurably hurt on MiniLM and SmolLM2: docs/results.md, issue 22)")


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints")
    add_training_args(p, epochs=5, lr=5e-4, ffn_refit=True)
    g = p.add_argument_group("block")
    g.add_argument("--block", type=block_arg, required=True,
                   help="teacher layer index (0-based), a comma-separated list of them (trained together on one "
                        "teacher pass), or 'all'")
    add_shape_args(g, ffn=True)
    g.add_argument("--criterion", type=criterion_arg("--criterion", "hidden", "probs", "logits"), default="MSE",
                   help=f"loss on the block output: {', '.join(criteria_for('hidden'))}; with --loss_on_scores: "
                        f"{', '.join(criteria_for('probs'))} (raw scores: {', '.join(criteria_for('logits'))})")
    g.add_argument("--loss-on", choices=["output", "scores", "output+scores", "mlm", "relations", "output+relations"],
                   help="what is compared: block output, attention scores (see --score-target), both, the "
                        "teacher's language-model output through its frozen rest (KL; mlm: masked-LM distributions "
                        "for BERT, next-token distributions for a decoder), or relations: MiniLMv2 query-query, "
                        "key-key, value-value self-attention relations (KL, any student head count). Whole-layer "
                        "units (--attention none, --ffn-dim) are compared on the layer output only")
    _add_term_weights(g)
    g.add_argument("--loss-on-logits", action="store_true", help="the seed's flag: loss on the block output")
    g.add_argument("--loss-on-scores", action="store_true", help="the seed's flag: loss on attention scores")
    g.add_argument("--score-target", choices=["probs", "logits"],
                   help="scores loss on the attention distributions (softmax over keys), or on the raw scaled "
                        "pre-softmax scores QK^T/sqrt(d_k) as in the seed (MSE / L1; padding excluded)")
    g.add_argument("--mask-inputs", action=argparse.BooleanOptionalAction,
                   help="one [MASK] per training sentence, redrawn every step (the seed's training data)")
    g.add_argument("--block-dropout", type=probability,
                   help="dropout of the new block's attention probabilities (default: the teacher's)")
    g.add_argument("--model-checkpoint", default=None,
                   help="start the new block(s) from this block checkpoint (or a run folder, searched by metadata)")
    g.add_argument("--score-criterion", type=criterion_arg("--score-criterion", "probs", "logits"), default=None,
                   help="criterion for attention distributions when both losses are on (default CrossEntropy)")
    g.add_argument("--init", choices=["teacher", "random"],
                   help="start from the teacher's block (important heads, SVD for smaller head_dim) or random; a block "
                        "of the teacher's own shape starts random unless --init teacher is given explicitly")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="for --loss-on mlm")
    g.add_argument("--cache-teacher", action="store_true",
                   help="compute the teacher's features once, store them (fp16, memory-mapped) and reuse them")
    g.add_argument("--cache-dir", default=None,
                   help="teacher feature cache (default: <--out>/cache); safe to share between runs, also running "
                        "at the same time")
    add_cache_only_arg(g, "in_N and block_N of each block")
    g.add_argument("--max-steps-per-epoch", type=positive_int("--max-steps-per-epoch"), default=None,
                   help=argparse.SUPPRESS)
    add_heads_alias(p)
    reject(p, "the seed's --dropout was the teacher BERT's dropout, which is always off here (the teacher runs in "
              "eval mode); the new block's is --block_dropout", "--dropout")
    use_recipes(p, BLOCK)
    return p


def loss_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BlockLoss:
    """What the blocks are compared on: --loss-on (or the recipe's), or the seed's --loss_on_logits /
    --loss_on_scores; a --criterion that does not apply to it is an argument error."""
    if given(args, "loss_on") or not (args.loss_on_logits or args.loss_on_scores):
        loss_on = args.loss_on.split("+")  # --loss-on, or the recipe's (seed: scores, default: output)
    else:
        loss_on = (["output"] if args.loss_on_logits else []) + (["scores"] if args.loss_on_scores else [])
    if loss_on == ["scores"] and args.criterion not in criteria_for("probs"):
        parser.error(f"--criterion {args.criterion} does not apply to attention distributions; "
                     f"choose one of {', '.join(criteria_for('probs'))}")
    if "output" in loss_on and args.criterion not in criteria_for("hidden"):
        parser.error(f"--criterion {args.criterion} does not apply to block outputs; choose one of "
                     f"{', '.join(criteria_for('hidden'))}")
    if args.mask_inputs and loss_on == ["mlm"]:
        parser.error("--mask-inputs does not combine with --loss-on mlm, which masks its inputs itself")
    return BlockLoss(loss_on=tuple(loss_on), criterion=args.criterion, score_criterion=args.score_criterion,
                     score_target=args.score_target, temperature=args.temperature, relation_heads=args.relation_heads,
                     relation_weight=args.relation_weight, score_weight=args.score_weight,
                     balance_ratio=args.balance_ratio,
                     mask_inputs=bool(args.mask_inputs))


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    n_layers = teacher_config(args.teacher).num_hidden_layers
    layers = block_layers(args.block)
    if layers is not None and max(layers) >= n_layers:
        parser.error(f"--block {args.block} is out of range: the teacher has layers 0..{n_layers - 1} (or 'all')")
    if args.cache_only:
        cached = api.cache_features(session_config(args), units="blocks", layers=layers,
                                    cache_dir=cache_dir(args, used=True))
        print_cached(cached)
        return cached.folder
    loss = loss_plan(args, parser)
    # the recipe's init where it is not the default (seed: random); --init given: as given, so that --init teacher
    # for the teacher's own shape is refused; else teacher, or random for the teacher's own shape
    init = args.init if given(args, "init") or args.init != "teacher" else None
    try:
        done = api.retrain_blocks(session_config(args), layers=layers,
                                  shape=unit_shape(args), loss=loss, train=train_config(args), init=init,
                                  start_from=args.model_checkpoint, dropout=args.block_dropout, out=args.out,
                                  run_name=args.run_name, name_suffix="_seed" if args.recipe == "seed" else "",
                                  cache_dir=cache_dir(args, used=args.cache_teacher),
                                  print_samples=args.print_samples, record=record(args))
    except SettingError as e:  # e.g. --init teacher for the teacher's own shape: refused as argparse refuses --block
        parser.error(flag_names(" ".join(str(e).split())))
    print_units(done)
    return done.run_dir


if __name__ == "__main__":
    parser = build_parser()
    sys.exit(run_main(lambda a: main(a, parser), parser))
