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

``--by-article`` (for decoders) writes whole ARTICLES instead, in order: train the first ones, then valid, then test
(by ``--split-ratio`` of their characters, no article in two splits, nothing shuffled or dropped), each article after a
`` = Article N = `` title line so that ``utils.data.text.read_documents`` reads it back as one document. The Hub's
split has its real titles; the shared file has none, so its article boundaries are found by ``find_articles`` (a
heuristic; it prints what it found so a reader can judge):

    python bench/prepare_wikitext2.py --by-article --out bench/results/wikitext2_articles
"""
from __future__ import annotations

import argparse
import math
import random
import re
import sys
from collections import Counter
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


# an encyclopedic lead sentence: a subject (a name, a quoted title) then "is / was / are / were a / an / the / one ..."
_LEAD = re.compile(r"^(?P<subject>[A-Z0-9\"].{0,150}?) (?:is|was|are|were) (?:an?|the|one|also) ")
# sentence openers that refer back (or set a scene) and so never start an article
_OPENERS = set("it he she they this these those his her its their there when while among in on at as after during "
               "such so held built moving included you however although though".split())


def _content_words(line: str) -> Counter:
    return Counter(w.lower() for w in re.findall(r"[A-Za-z]{4,}", line))


def _cosine(p: Counter, q: Counter) -> float:
    norm = math.sqrt(sum(v * v for v in p.values()) * sum(v * v for v in q.values()))
    return sum(v * q[k] for k, v in p.items() if k in q) / norm if norm else 0.0


def find_articles(lines: list[str], *, window: int = 30, max_similarity: float = 0.2, novelty: int = 80,
                  min_lines: int = 20) -> list[int]:
    """The first lines of the articles of a one-sentence-per-line WikiText file without titles (0 always).

    A line starts an article when (1) it reads like a Wikipedia lead sentence: a subject, then "is / was / are / were
    a / an / the / one / also" (not a pronoun or scene-setting opener such as "It", "When", "In"); (2) the subject's
    capitalised words (parentheses and a ", known as ..." clause left out) do not occur in the ``novelty`` lines
    before it: a new subject; (3) the text changes topic there: the content words (4+ letters) of the ``window``
    lines before and after have a cosine similarity under ``max_similarity``. Of candidates closer than ``min_lines``,
    the one with the sharper topic change wins. On the shared WikiText-2 validation file (60 articles) it finds 43
    starts, nearly all real leads: it misses more than it invents, and a missed start only joins two articles (no
    text in two splits); an invented one matters only where a split is cut.
    """
    bags = [_content_words(line) for line in lines]

    def bag(a: int, b: int) -> Counter:
        out: Counter = Counter()
        for c in bags[max(0, a):b]:
            out.update(c)
        return out

    scored = []
    for i, line in enumerate(lines):
        m = _LEAD.match(line)
        if i == 0 or not m or line.split()[0].strip('"').lower() in _OPENERS:
            continue
        subject = re.sub(r"\(.*?\)", " ", m.group("subject")).split(" , ")[0]
        names = {w for w in subject.split() if w[:1].isupper() and w not in ("The", "A", "An") and len(w) > 2}
        before = set(" ".join(lines[max(0, i - novelty):i]).split())
        if names & before:
            continue
        sim = _cosine(bag(i - window, i), bag(i, i + window))
        if sim < max_similarity:
            scored.append((sim, i))
    starts = [0]
    for _, i in sorted(scored):
        if all(abs(i - j) >= min_lines for j in starts):
            starts.append(i)
    return sorted(starts)


def article_texts(src: Path | None, dataset: str | None) -> list[str]:
    """The articles of the source in order: the Hub's raw ones as they are (their own title first), or those
    ``find_articles`` finds in a file without titles, each its lines joined."""
    from utils.data.text import wikitext2_documents

    if dataset is not None:
        return [d.text.rstrip("\n") for d in wikitext2_documents("valid")]
    if src is None or not src.is_file():
        raise FileNotFoundError(f"{src} not found; pass --src FILE (one sentence per line) or --dataset wikitext2")
    lines = [line.strip() for line in src.read_text(errors="replace").splitlines() if line.strip()]
    starts = find_articles(lines)
    print(f"{src}: {len(lines)} lines, {len(starts)} article starts found (WikiText-2 validation has 60); the first "
          "lines of the first ten:")
    for i in starts[:10]:
        print(f"  line {i + 1}: {lines[i][:100]}")
    return ["\n".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]


def prepare_articles(articles: list[str], out: Path, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
                     ) -> dict[str, list[str]]:
    """Whole articles into train / valid / test in order (``utils.data.text.cut_documents``: by characters, no
    article in two splits), each split's file with a `` = Article N = `` line before each of its articles that has no
    title of its own."""
    from utils.data.text import SPLITS, Document, cut_documents, is_title

    docs = [Document(str(k), text) for k, text in enumerate(articles)]
    parts = cut_documents(docs, ratios, what="the articles")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, part in zip(SPLITS, parts):
        written[name] = [d.text for d in part]
        body = "".join(("" if is_title(d.text.split("\n")[0]) else f" = Article {int(d.name) + 1} = \n")
                       + f"{d.text}\n" for d in part)
        (out / f"{name}.txt").write_text(body)
        lines = sum(len(d.text.splitlines()) for d in part)
        print(f"{name}: {len(part)} articles ({int(part[0].name) + 1}-{int(part[-1].name) + 1}), {lines} lines, "
              f"{sum(len(d.text.split()) for d in part)} words, in {out / f'{name}.txt'}")
    return written


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
    ap.add_argument("--by-article", action="store_true",
                    help="for decoders: whole articles in order (train, then valid, then test), each after a title "
                         "line; default: the masked-LM teacher's shuffled sentence split")
    ap.add_argument("--split-ratio", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VALID", "TEST"),
                    help="with --by-article: the shares of the text (in characters) of each split")
    add_quick(ap, {"train": 40, "valid": 10}, "train 40, valid 10, the rest test (a small --src)")
    a = ap.parse_args(argv)
    if a.train <= 0 or a.valid <= 0:
        ap.error("--train and --valid must be positive")
    try:
        if a.by_article:
            prepare_articles(article_texts(None if a.dataset else (a.src or DEFAULT_SRC), a.dataset), a.out,
                             tuple(a.split_ratio))
        else:
            prepare(lines_from_args(a), a.out, a.train, a.valid)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
