"""Have a decoder teacher write its own distillation text: its replies to a prompt set, through its chat template.

    python write_teacher_text.py --teacher DIR --out text/teacher_chat                  # the shipped 300 prompts
    python write_teacher_text.py --teacher DIR --prompts my.jsonl --samples-per-prompt 4 --out text/mine

Sampled at --temperature (1) with --seed, --batch-size prompts at a time with the KV cache; written in chunks of
--chunk-size prompts (JSONL, {"text": prompt and reply} per line), each renamed into place when complete. Rerun the
same command after a stop to continue: finished chunks are kept, and the result is the same bytes as one run.
"""
from __future__ import annotations

from utils.stops import install_stop_handlers

if __name__ == "__main__":  # first, before the imports below: a stop while they load is one line, 143 / 130
    install_stop_handlers()

import argparse
import sys
from pathlib import Path

from utils import api
from utils.cli.parser import common_parser
from utils.cli.run import run_main
from utils.cli.types import non_negative_float, positive_int


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="checkpoints/teacher_text")
    g = p.add_argument_group("teacher text")
    g.add_argument("--prompts", default="default", metavar="FILE",
                   help='JSONL of user messages, {"prompt": ...} per line, or a shipped set by name; "default": the '
                        "shipped training set chat_train (about 300 instructions, disjoint from the chat "
                        "evaluation's); code_train: about 200 coding requests for a code teacher (disjoint from "
                        "code_eval and from HumanEval)")
    g.add_argument("--samples-per-prompt", type=positive_int("--samples-per-prompt"), default=1,
                   help="replies written per prompt (each sampled anew)")
    g.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=256, help="longest reply")
    g.add_argument("--temperature", type=non_negative_float("--temperature"), default=1.0,
                   help="sampling temperature (0: greedy)")
    g.add_argument("--chunk-size", type=positive_int("--chunk-size"), default=64,
                   help="replies per file (the unit of resumption)")
    g.add_argument("--force", action="store_true", help="start --out over when it holds text of other settings")
    return p


def main(args: argparse.Namespace) -> Path:
    config = api.TeacherTextConfig(prompts=args.prompts, samples_per_prompt=args.samples_per_prompt,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                   chunk_size=args.chunk_size, batch_size=args.batch_size)
    session = api.SessionConfig(teacher=args.teacher, device=args.device, teacher_device_map=args.teacher_device_map)
    done = api.write_teacher_text(session, config=config, out=args.out, force=args.force)
    print(f"{done.records} replies in {done.folder} ({done.written} files written now, {done.skipped} already there)")
    return done.folder


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
