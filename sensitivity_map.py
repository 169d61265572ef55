"""Per-layer sensitivity map: which layers can be simplified, and by how much.

    python sensitivity_map.py --teacher DIR --data-dir DIR --epochs 1 --max-train-sentences 2000 --eval-sentences 300

For every teacher layer and every option (heads: 2/3, 1/2, 1/3, 1/6 of the teacher's, i.e. 8/6/4/2 of 12; head_dim
halved; merged with the next layer; FFN width halved; combined in one unit: heads 4 + FFN 768 and heads 2 + FFN 384
in one layer, a merged pair with 6 heads + FFN 768, for budgets beyond one option per layer) one unit is initialised
from the teacher, retrained alone on the teacher's cached features (all layers of an option together, one teacher
pass for everything), put alone into the teacher and compared with it on the validation split (top-1 drop,
agreement, KL at one mask per sentence); its encoder latency saving is timed round-robin on this device. Writes
sensitivity.json, sensitivity.md (layers x options table) and sensitivity.png (heatmaps) to --out/--run-name;
plan_student.py plans from the JSON. --runtime llama.cpp|vllm maps only the options that engine runs (vllm: FFN
widths snapped to its 256 grid); with llama.cpp the options' savings are timed in llama.cpp (--gguf-type GGUFs).
"""
from __future__ import annotations

from utils.stops import install_stop_handlers

if __name__ == "__main__":  # first, before the imports below: a stop while they load is one line, 143 / 130
    install_stop_handlers()

import argparse
import sys
from pathlib import Path

from models.gguf_export import GGUF_TYPES
from utils import api
from utils.cli.configs import map_config, record, session_config, train_config
from utils.cli.groups import add_map_args
from utils.cli.parser import add_training_args, common_parser
from utils.cli.run import run_main

BUDGET = ("Budget: each epoch retrains every unit over the training sentences, and every unit costs one comparison "
          "with the teacher over the --eval-sentences. Measured: the 6-layer MiniLM MLM teacher (hidden 384, 12 "
          "heads) on a shared 2-core CPU, OMP_NUM_THREADS=1, '--epochs 1 --max-train-sentences 2000 "
          "--eval-sentences 300 --latency-reps 10' mapped 6 layers x 10 options (58 units) in about 10 minutes "
          "(docs/results.md). Time grows with layers x options x (sentences x epochs + eval sentences); a bert-base "
          "teacher wants a GPU (--device cuda).")


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints")
    p.epilog = BUDGET
    add_training_args(p, epochs=1, lr=1e-3, keep_start=True, ffn_refit=True)
    add_map_args(p)
    p.add_argument("--gguf-type", choices=list(GGUF_TYPES), default="f16",
                   help="with --runtime llama.cpp: how the GGUF files the options are timed in store their matrices")
    return p


def main(args: argparse.Namespace) -> Path:
    out = Path(args.out) / (args.run_name or "sensitivity")
    api.sensitivity_map(session_config(args), config=map_config(args), train=train_config(args), out=out,
                        record=record(args))
    print((out / "sensitivity.md").read_text())
    return out


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
