"""Evaluate teacher vs compressed model on the test split (one seeded [MASK] per sentence).

    python eval_merged_12.py --percentage_data 0.5                # the model the notebook assembled
    python eval_merged_12.py --model checkpoints/assembled --teacher DIR --data-dir DIR --judge bert-large-uncased
    python eval_merged_12.py --model DIR --teacher DECODER --data-dir DIR --lm-eval piqa,hellaswag   # + lm-eval
    python eval_merged_12.py --model DIR --teacher DIR --data-dir DIR --eval-text code=DIR --eval-text prose=DIR
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
from utils.cli.configs import chat_config, eval_config, lm_eval_config, session_config
from utils.cli.groups import add_chat_args, add_lm_eval_args
from utils.cli.output import print_evaluation
from utils.cli.parser import add_eval_args, add_eval_recipe, common_parser
from utils.cli.run import run_main

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
    add_lm_eval_args(p)
    add_chat_args(p)
    add_eval_recipe(p, "eval_merged_12.py")
    return p


def main(args: argparse.Namespace) -> Path:
    model = find_assembled(args.model)
    ev = api.evaluate(session_config(args), model, evaluation=eval_config(args), out=args.out, force=args.force,
                      extra={"recipe": args.recipe}, lm_eval=lm_eval_config(args),
                      chat=chat_config(args))
    print_evaluation(ev)
    return ev.out


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
