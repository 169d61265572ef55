"""The module commands: ``python -m utils.assemble`` (a model from trained units) and ``python -m utils.checkpoint
rehash DIR`` (record the hash of weights you vouch for)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import api
from ..data.text import DataConfig
from ..storage.checkpoint import CheckpointError, rehash
from .configs import export_config
from .groups import add_export_args
from .parser import Parser
from .run import run_main, setup_logging
from .types import layer_list


def assemble_parser() -> Parser:
    p = Parser(description="Assemble a model from the teacher plus retrained blocks / whole layers / merged layers, "
                           "with layers dropped.")
    p.add_argument("--teacher", default="bert-base-uncased")
    p.add_argument("--blocks", nargs="+", default=[], help="checkpoint folders (searched recursively)")
    p.add_argument("--drop-layers", type=layer_list, default=[], metavar="I,J,...",
                   help="teacher layers to drop (0-based, e.g. 3,17): each becomes a layer with no attention and no "
                        "feed-forward part, the identity (decoders)")
    p.add_argument("--out", default="checkpoints/assembled")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--force", action="store_true", help="accept checkpoints made against a different teacher")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    add_export_args(p)
    return p


def assemble(args: argparse.Namespace) -> Path:
    setup_logging()
    session = api.SessionConfig(teacher=args.teacher, data=DataConfig(), device=args.device)
    done = api.assemble(session, args.blocks, out=args.out, which=args.which, force=args.force,
                        drop_layers=args.drop_layers, export=export_config(args))
    print(done.plan)
    print(f"parameters: teacher {done.teacher_params:,} -> assembled {done.student_params:,} "
          f"({done.student_params / done.teacher_params:.1%})")
    for line in done.exports:
        print(line)
    return done.out


def assemble_main(argv: list[str] | None = None) -> int:
    """``python -m utils.assemble``: errors are one line (exit 1), or a traceback asking for a bug report."""
    return run_main(assemble, assemble_parser(), argv)


def checkpoint_main(argv: list[str] | None = None) -> int:
    """``python -m utils.checkpoint rehash DIR``: see ``utils.storage.checkpoint.rehash``."""
    p = argparse.ArgumentParser(prog="python -m utils.checkpoint", description="Checkpoint maintenance.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rehash", help="record the sha256 of weights you vouch for (hand-made or edited checkpoints)")
    r.add_argument("directory", help="a checkpoint folder, or a folder searched recursively for checkpoints")
    args = p.parse_args(argv)
    try:
        lines = rehash(args.directory)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0
