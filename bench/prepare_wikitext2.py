"""Split the shared WikiText-2 validation sentences into train/valid/test for the real-teacher experiments.

The teacher ../shared/models/minilm-mlm-wikitext2 was fine-tuned on 6,000 of these sentences (lines of >= 4 words,
shuffled with random.seed(0), the first 6,000; its README). We reproduce that shuffle so that:
  train.txt = the teacher's own 6,000 training sentences (distillation only imitates the teacher on them),
  valid.txt = the next 500 (the teacher's held-out set),
  test.txt  = every remaining sentence: text the teacher never saw, for all reported metrics.

    python bench/prepare_wikitext2.py --out bench/results/wikitext2_split
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "wikitext2" / "valid.txt"


def prepare(src: Path, out: Path, train: int = 6000, valid: int = 500, seed: int = 0) -> Path:
    if not src.is_file():
        raise SystemExit(f"error: {src} not found (the shared WikiText-2 sentences)")
    lines = [l.strip() for l in src.read_text(errors="replace").splitlines() if len(l.split()) >= 4]
    random.seed(seed)
    random.shuffle(lines)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"train": lines[:train], "valid": lines[train:train + valid], "test": lines[train + valid:]}
    for name, part in parts.items():
        (out / f"{name}.txt").write_text("\n".join(part) + "\n")
    print(", ".join(f"{k}: {len(v)}" for k, v in parts.items()), f"sentences written to {out}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "wikitext2_split")
    a = ap.parse_args()
    prepare(a.src, a.out)
