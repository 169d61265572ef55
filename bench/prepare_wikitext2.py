"""Split WikiText-2 validation sentences into train/valid/test for the real-teacher experiments.

The English MLM teacher (``../shared/models/minilm-mlm-wikitext2``, or one rebuilt by ``bench/make_mlm_teacher.py``)
was fine-tuned on 6,000 of these sentences (lines of >= 4 words, shuffled with random.seed(0), the first 6,000). We
reproduce that shuffle so that:
  train.txt = the teacher's own 6,000 training sentences (distillation only imitates the teacher on them),
  valid.txt = the next 500 (the teacher's held-out set),
  test.txt  = every remaining sentence: text the teacher never saw, for all reported metrics.

The sentences come from a text file, one sentence per line (``--src``; default: the shared
``../shared/data/wikitext2/valid.txt`` when it exists), or from the Hugging Face Hub (``--dataset wikitext2``: the raw
WikiText-2 validation split cut into sentences by ``utils.data.text``; the shared file is the tokenised WikiText-2 with
``<unk>``, so the two give slightly different sentences). Use the same source for the teacher and for this split.

    python bench/prepare_wikitext2.py --out bench/results/wikitext2_split                      # shared file
    python bench/prepare_wikitext2.py --dataset wikitext2 --out bench/results/wikitext2_split  # from the Hub
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "wikitext2" / "valid.txt"
TRAIN, VALID = 6000, 500


def source_lines(src: Path | None = None, dataset: str | None = None) -> list[str]:
    """Sentences (>= 4 words) of a one-sentence-per-line file, or of the Hub's WikiText-2 validation split."""
    if dataset is not None:
        if dataset != "wikitext2":
            raise ValueError(f"unknown dataset '{dataset}'; use wikitext2 or a file")
        from utils.data.text import load_wikitext2

        lines = load_wikitext2("valid", min_words=1)
    else:
        if src is None or not src.is_file():
            raise FileNotFoundError(f"{src} not found; pass --src FILE (one sentence per line) or --dataset wikitext2")
        lines = src.read_text(errors="replace").splitlines()
    return [l.strip() for l in lines if len(l.split()) >= 4]


def teacher_split(lines: list[str], train: int = TRAIN, valid: int = VALID, seed: int = 0) -> dict[str, list[str]]:
    """The teacher's shuffle: random.seed(seed), then the first ``train`` lines, the next ``valid``, the rest."""
    lines = list(lines)
    random.seed(seed)
    random.shuffle(lines)
    return {"train": lines[:train], "valid": lines[train:train + valid], "test": lines[train + valid:]}


def prepare(lines: list[str], out: Path, train: int = TRAIN, valid: int = VALID, seed: int = 0) -> Path:
    parts = teacher_split(lines, train, valid, seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        (out / f"{name}.txt").write_text("\n".join(part) + "\n")
    print(", ".join(f"{k}: {len(v)}" for k, v in parts.items()), f"sentences written to {out}")
    return out


def add_source_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--src", type=Path, default=None,
                   help=f"one sentence per line (default: {DEFAULT_SRC} when --dataset is not given)")
    g.add_argument("--dataset", choices=["wikitext2"], default=None,
                   help="the raw WikiText-2 validation split from the Hugging Face Hub (or its cache)")


def lines_from_args(a: argparse.Namespace) -> list[str]:
    return source_lines(None, a.dataset) if a.dataset else source_lines(a.src or DEFAULT_SRC)


def main(argv: list[str] | None = None) -> int:
    from bench.quick import add_quick

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_args(ap)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "wikitext2_split")
    ap.add_argument("--train", type=int, default=TRAIN, help="sentences of train.txt (the teacher's own)")
    ap.add_argument("--valid", type=int, default=VALID, help="sentences of valid.txt (the teacher's held-out set)")
    add_quick(ap, {"train": 40, "valid": 10}, "train 40, valid 10, the rest test (a small --src)")
    a = ap.parse_args(argv)
    if a.train <= 0 or a.valid <= 0:
        ap.error("--train and --valid must be positive")
    try:
        prepare(lines_from_args(a), a.out, a.train, a.valid)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
