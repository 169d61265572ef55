"""Evaluate teacher vs compressed model on the test split (one seeded [MASK] per sentence).

    python eval_merged_12.py --percentage_data 0.5                # the model the notebook assembled
    python eval_merged_12.py --model checkpoints/assembled --teacher DIR --data-dir DIR --judge bert-large-uncased
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

from utils.assemble import load_model
from utils.cli import UsageError, add_eval_args, add_eval_recipe, common_parser
from utils.evaluate import evaluate_student
from utils.session import Session, check_output_dir, run_main, start

log = logging.getLogger("simplifying_transformers")
ROOT = Path(__file__).resolve().parent
# where notebooks/build_bert_from_retrained_12.ipynb saves the assembled model (its OUT, overridable by ST_OUT)
NOTEBOOK_OUT = ROOT / "checkpoints" / "assembled"


def find_assembled(model: str | None) -> Path:
    """--model, else the notebook's output: $ST_OUT, ./checkpoints/assembled, <repo>/checkpoints/assembled."""
    if model:
        return Path(model)
    candidates = ([Path(os.environ["ST_OUT"])] if os.environ.get("ST_OUT") else []) + [
        Path("checkpoints") / "assembled", NOTEBOOK_OUT]
    for c in candidates:
        if (c / "meta.json").is_file():
            log.info("evaluating the assembled model in %s", c)
            return c
    raise FileNotFoundError(
        "no assembled model found (looked in " + ", ".join(f"'{c}'" for c in dict.fromkeys(candidates)) + "); run "
        "notebooks/build_bert_from_retrained_12.ipynb or python -m utils.assemble first, or pass --model DIR")


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints/eval_merged_12")
    p.add_argument("--model", "--model-checkpoint", default=None,
                   help="assembled model checkpoint (default: where the notebook / python -m utils.assemble saved it: "
                        "$ST_OUT, ./checkpoints/assembled or <repo>/checkpoints/assembled)")
    add_eval_args(p)
    add_eval_recipe(p, "eval_merged_12.py")
    return p


def check_student(student, s: Session, where: str) -> None:
    """A student evaluated against this teacher must read the same token ids at --seq-len positions."""
    if student.config.max_position_embeddings < s.args.seq_len:
        raise UsageError(f"--seq-len {s.args.seq_len} is longer than the model '{where}' allows: its "
                         f"max_position_embeddings is {student.config.max_position_embeddings}")


def main(args: argparse.Namespace) -> Path:
    model = find_assembled(args.model)
    check_output_dir(args.out)  # before any work: results that cannot be written are lost
    s = start(args)
    student, meta = load_model(model, s.teacher_hash, args.force, s.teacher.config)
    check_student(student, s, str(model))
    return evaluate_student(s, student, Path(args.out), {"model": str(model), "sources": meta.get("sources"),
                                                         "recipe": args.recipe},
                            args.judge, args.split, args.max_batches)


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
