"""Evaluate the teacher with one pair of layers (N, N+1) replaced by its trained merged layer.

    python eval_merge_layer.py --block 6 --block_heads 12 --block_d_k 64
    python eval_merge_layer.py --checkpoint checkpoints/merge_h12_d64_f3072_mse/merge_6/best --teacher DIR \\
        --data-dir DIR
"""
from __future__ import annotations

from utils.stops import install_stop_handlers

if __name__ == "__main__":  # first, before the imports below: a stop while they load is one line, 143 / 130
    install_stop_handlers()

import argparse
import logging
import os
import sys
from pathlib import Path

from utils import api
from utils.cli.configs import eval_config, session_config, unit_shape
from utils.cli.groups import add_shape_args
from utils.cli.output import print_evaluation
from utils.cli.parser import add_eval_args, add_eval_recipe, common_parser
from utils.cli.recipes import add_heads_alias
from utils.cli.run import run_main
from utils.cli.types import non_negative_int
from utils.errors import SettingError
from utils.storage.checkpoint import CheckpointError, check_output_dir, find_checkpoints
from utils.training.units import spec_from_meta

log = logging.getLogger("simplifying_transformers")
ROOT = Path(__file__).resolve().parent  # the repository: where retrain_merge.py writes by default


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints/eval_merge_layer")
    g = p.add_argument_group("merged layer")
    g.add_argument("--block", type=non_negative_int("--block"), default=None,
                   help="first teacher layer N of the merged pair (N, N+1)")
    add_shape_args(g)
    g.add_argument("--checkpoint", "--model-checkpoint", default=None,
                   help="a merged-layer checkpoint folder (else searched by metadata)")
    g.add_argument("--search", default=None,
                   help="where to look for merged-layer checkpoints (default: --out, ./checkpoints and "
                        "<repo>/checkpoints, so the same --out as retrain_merge.py finds its layers)")
    g.add_argument("--which", choices=["best", "last"], default="best")
    add_eval_args(p)
    add_heads_alias(p)
    add_eval_recipe(p, "eval_merge_layer.py")
    return p


def find_merged(args: argparse.Namespace) -> Path:
    """The newest merged-layer checkpoint matching --block / --block_heads / --block_d_k."""
    if args.checkpoint:
        return Path(args.checkpoint)
    if args.block is None:
        raise SettingError("give --block N (with --block_heads / --block_d_k to choose among runs) or --checkpoint DIR")
    if args.search:
        roots = [Path(args.search)]
    else:  # the folders retrain_merge.py writes to with the same --out, or its default
        roots = [r for r in dict.fromkeys(Path(os.path.abspath(r)) for r in (args.out, "checkpoints",
                                                                                ROOT / "checkpoints")) if r.is_dir()]
    shape = unit_shape(args).attention_fields()
    want = {k: v for k, v in shape.items() if v is not None}
    hits = [(p, m) for p, m in find_checkpoints(roots, ["merged_layer"], args.which)
            if m["layers"][0] == args.block
            and all(spec_from_meta(m).attention_shape()[k] == v for k, v in want.items())]
    hits = list({p.resolve(): (p, m) for p, m in hits}.values())  # a folder found under two roots counts once
    if not hits:
        raise CheckpointError(f"no '{args.which}' merged-layer checkpoint for pair ({args.block}, {args.block + 1}) "
                              f"with {' '.join(f'{k}={v}' for k, v in shape.items())} under "
                              f"{', '.join(repr(str(r)) for r in roots) or 'no existing folder'}; pass --search DIR "
                              "(or the --out given to retrain_merge.py)")
    path, meta = max(hits, key=lambda pm: pm[1].get("saved_at", ""))
    if len(hits) > 1:
        log.info("%d matching checkpoints; using the newest: %s", len(hits), path)
    return path


def main(args: argparse.Namespace) -> Path:
    check_output_dir(args.out)  # before any work (searching included): results that cannot be written are lost
    ev = api.evaluate(session_config(args), find_merged(args), evaluation=eval_config(args), out=args.out,
                      force=args.force)
    print_evaluation(ev)
    return ev.out


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
