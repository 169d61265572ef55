"""Text folders for the decoder benches from what is installed on this machine, train and eval parts disjoint by file.

Two sets (issue 32), each written as <out>/<name>/{train,eval}/ (what `--train-text NAME=<out>/<name>/train` and
`--eval-text NAME=<out>/<name>/eval` read):

  code    Python source of the standard library (``sysconfig.get_paths()["stdlib"]``), site-packages, test files
          (test/, tests/, idle_test/, test_*.py), the codecs' generated tables (encodings/) and files over
          --max-file-chars left out;
  prose   English prose outside Wikipedia: the long descriptions of the installed distributions (the body, or the
          Description field, of each site-packages ``*.dist-info/METADATA``) and the READMEs under /usr/share/doc
          (gzipped ones too); a document is kept when a simple check calls it English (ASCII letters, and common
          English words making up at least --min-english of its words) and it has --min-chars characters or more.

Each document (a file) goes wholly to train or wholly to eval, by a hash of its name (its path relative to its
source): the same file always lands in the same part, whatever else is installed, so training and evaluation text
never share a document. Identical documents (one README shipped twice) are kept once. The documents are taken in the
order of that hash until --max-chars characters per set, so a cap keeps a sample of every corner of the source. Each
set is written to a temporary folder and renamed when complete. A table of documents and characters per part is
printed and written to <out>/texts.md, the files of each part to <out>/texts.json.

    python bench/make_texts.py --out bench/results/texts              # about 4M characters per set
    python bench/make_texts.py --out /tmp/texts --quick                 # a small sample, for a test
"""
from __future__ import annotations

import argparse
import email
import gzip
import hashlib
import json
import re
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.cli.run import run_main  # noqa: E402
from utils.cli.types import fraction, positive_int  # noqa: E402
from utils.data.text import TEXT_SUFFIXES  # noqa: E402
from models.staging import staged_folder, write_staged  # noqa: E402

PARTS = ("train", "eval")
# left out of the code set: tests, installed packages, and generated tables (codecs' charmaps)
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
ENGLISH = set("the of and to a in is for that with this it on be as are by or you can from if an not your".split())
DOCS = Path("/usr/share/doc")


@dataclass(frozen=True)
class Doc:
    """One document of a set: its name (a relative path: what decides its part) and its text."""

    name: str
    text: str


# a document found: its name, and how to read it (None: not wanted after all, e.g. not English)
Found = tuple[str, Callable[[], "str | None"]]


def part_of(name: str, eval_share: float) -> str:
    """train or eval, from a hash of the document's name alone (the same file: the same part, on every machine)."""
    return "eval" if _hash(name) % 10_000 < eval_share * 10_000 else "train"


def _hash(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)


def code_docs(max_file_chars: int, stdlib: Path | None = None) -> Iterator[Found]:
    """The standard library's Python files, without tests, site-packages, generated tables and files over
    ``max_file_chars``."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if set(rel.parts[:-1]) & SKIP_DIRS or rel.name.startswith("test_") or f.stat().st_size > max_file_chars:
            continue
        yield rel.as_posix(), lambda f=f: _source(f)


def _source(f: Path) -> str | None:
    text = f.read_bytes().decode("utf-8", errors="replace")
    return text if text.strip() and "\ufffd" not in text else None


def metadata_description(text: str) -> str:
    """The long description of a METADATA file: its body, else its Description field (continuation lines
    unindented)."""
    msg = email.message_from_string(text)
    body = msg.get_payload()
    if isinstance(body, str) and body.strip():
        return body
    desc = msg.get("Description") or ""
    return re.sub(r"\n {8}\|?|\n\|", "\n", str(desc))


def is_english(text: str, min_share: float) -> bool:
    """A simple check: mostly ASCII letters, and common English words at least ``min_share`` of the words."""
    letters = [c for c in text if c.isalpha()]
    words = re.findall(r"[a-z']+", text.lower())
    if not letters or len(words) < 50 or sum(c.isascii() for c in letters) < 0.97 * len(letters):
        return False
    return sum(w in ENGLISH for w in words) >= min_share * len(words)


def prose_docs(min_chars: int, min_english: float, docs_dir: Path = DOCS) -> Iterator[Found]:
    """Distribution descriptions of every site-packages folder, then the READMEs under ``docs_dir``: the English
    ones of ``min_chars`` characters or more."""
    def keep(text: str) -> str | None:
        return text if len(text) >= min_chars and is_english(text, min_english) else None

    folders = dict.fromkeys(Path(p) for p in [sysconfig.get_paths()["purelib"], *site.getsitepackages()])
    for folder in folders:
        for meta in sorted(folder.glob("*.dist-info/METADATA")):
            yield (f"metadata/{meta.parent.name.split('-')[0]}",
                   lambda m=meta: keep(metadata_description(m.read_text(errors="replace"))))
    if docs_dir.is_dir():
        for f in sorted(docs_dir.rglob("README*")):
            if f.is_file():
                yield f"doc/{f.relative_to(docs_dir).as_posix().removesuffix('.gz')}", lambda f=f: keep(_gunzip(f))


def _gunzip(f: Path) -> str:
    raw = f.read_bytes()
    if f.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            return ""
    return raw.decode("utf-8", errors="replace")


def take(found: Iterator[Found], *, max_chars: int, eval_share: float) -> dict[str, list[Doc]]:
    """Documents in the order of their names' hash, read until ``max_chars`` (those not wanted and duplicates of an
    earlier text left out); each in the part its name's hash gives."""
    seen: set[str] = set()
    parts: dict[str, list[Doc]] = {p: [] for p in PARTS}
    total = 0
    for name, read in sorted(dict(found).items(), key=lambda nr: (_hash(nr[0]), nr[0])):
        if total >= max_chars:
            break
        text = read()
        digest = hashlib.sha256((text or "").encode()).hexdigest()
        if text is None or digest in seen:
            continue
        seen.add(digest)
        parts[part_of(name, eval_share)].append(Doc(name, text))
        total += len(text)
    return parts


def write_set(out: Path, name: str, parts: dict[str, list[Doc]]) -> Path:
    """<out>/<name>/{train,eval}/<document name>: written to a temporary folder, then renamed over the old one."""
    with staged_folder(out / name) as tmp:
        for part, docs in parts.items():
            if not docs:
                raise ValueError(f"the {name} set has no {part} document: raise --max-chars or lower the filters")
            for d in docs:  # a name the text reader would skip (README, README.Debian) gets .txt
                path = tmp / part / (d.name if Path(d.name).suffix in TEXT_SUFFIXES else d.name + ".txt")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(d.text, encoding="utf-8")
    return out / name


def table(sets: dict[str, dict[str, list[Doc]]]) -> str:
    lines = ["| set | part | documents | characters |", "|---|---|---:|---:|"]
    for name, parts in sets.items():
        for part, docs in parts.items():
            lines.append(f"| {name} | {part} | {len(docs):,} | {sum(len(d.text) for d in docs):,} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "texts")
    p.add_argument("--max-chars", type=positive_int("--max-chars"), default=4_000_000,
                   help="characters per set, train and eval together")
    p.add_argument("--eval-share", type=fraction, default=0.2, help="the share of documents that go to eval")
    p.add_argument("--max-file-chars", type=positive_int("--max-file-chars"), default=100_000,
                   help="source files larger than this are left out (generated tables, huge modules)")
    p.add_argument("--min-chars", type=positive_int("--min-chars"), default=500, help="shortest prose document")
    p.add_argument("--min-english", type=fraction, default=0.15,
                   help="share of common English words a prose document needs")
    p.add_argument("--quick", action="store_true", help="a small sample (--max-chars 300000), for a test")
    return p


def main(args: argparse.Namespace) -> Path:
    cap = min(args.max_chars, 300_000) if args.quick else args.max_chars
    sets = {"code": take(code_docs(args.max_file_chars), max_chars=cap, eval_share=args.eval_share),
            "prose": take(prose_docs(args.min_chars, args.min_english), max_chars=cap, eval_share=args.eval_share)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, parts in sets.items():
        write_set(args.out, name, parts)
    write_staged({args.out / "texts.md": table(sets) + "\n", args.out / "texts.json": json.dumps(
        {name: {part: [d.name for d in docs] for part, docs in parts.items()} for name, parts in sets.items()},
        indent=1)})
    print(table(sets))
    return args.out


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
