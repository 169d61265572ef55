"""Evaluate the teacher with one pair of layers (N, N+1) replaced by its trained merged layer.

    python eval_merge_layer.py --block 6 --block_heads 12 --block_d_k 64
    python eval_merge_layer.py --checkpoint checkpoints/merge_h12_d64_f3072_mse/merge_6/best --teacher DIR --data-dir DIR
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.compress import clone_model, compose
from utils.assemble import load_merged_layer
from utils.checkpoint import CheckpointError, find_checkpoints
from utils.cli import UsageError, common_parser, non_negative_int, positive_int
from utils.session import check_output_dir, run_main, start
from eval_merged_12 import add_eval_args, evaluate_student

log = logging.getLogger("simplifying_transformers")


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints/eval_merge_layer")
    g = p.add_argument_group("merged layer")
    g.add_argument("--block", type=non_negative_int("--block"), default=None,
                   help="first teacher layer N of the merged pair (N, N+1)")
    g.add_argument("--block-heads", "--heads", type=positive_int("--block-heads"), default=None)
    g.add_argument("--block-d-k", "--head-dim", type=positive_int("--block-d-k"), default=None)
    g.add_argument("--checkpoint", default=None, help="a merged-layer checkpoint folder (else searched by metadata)")
    g.add_argument("--search", default="checkpoints", help="where to look for merged-layer checkpoints")
    g.add_argument("--which", choices=["best", "last"], default="best")
    add_eval_args(p)
    return p


def find_merged(args: argparse.Namespace) -> Path:
    """The newest merged-layer checkpoint matching --block / --block_heads / --block_d_k."""
    if args.checkpoint:
        return Path(args.checkpoint)
    if args.block is None:
        raise UsageError("give --block N (with --block_heads / --block_d_k to choose among runs) or --checkpoint DIR")
    hits = [(p, m) for p, m in find_checkpoints([args.search], ["merged_layer"], args.which)
            if m["layers"][0] == args.block
            and (args.block_heads is None or m["num_heads"] == args.block_heads)
            and (args.block_d_k is None or m["head_dim"] == args.block_d_k)]
    if not hits:
        raise CheckpointError(f"no '{args.which}' merged-layer checkpoint for pair ({args.block}, {args.block + 1}) "
                              f"with heads={args.block_heads} head_dim={args.block_d_k} under '{args.search}'")
    path, meta = max(hits, key=lambda pm: pm[1].get("saved_at", ""))
    if len(hits) > 1:
        log.info("%d matching checkpoints; using the newest: %s", len(hits), path)
    return path


def main(args: argparse.Namespace) -> Path:
    check_output_dir(args.out)  # before any work: results that cannot be written are lost
    path = find_merged(args)
    s = start(args)
    first, layer, spec = load_merged_layer(path, s.teacher.config, s.teacher_hash, args.force)
    student = clone_model(compose(s.teacher, merges={first: (layer.to(s.device), spec)}))
    return evaluate_student(s, student, Path(args.out), {"merged_layer": str(path), "pair": [first, first + 1]},
                            args.judge, args.split, args.max_batches)


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
