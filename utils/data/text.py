"""Text in: WikiText-2 from the Hugging Face Hub or local files, cut into sentences and splits; text sources read as
whole documents in order (``read_documents``); what a run reads (``DataConfig``)."""
from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_HEADING = re.compile(r"^\s*=+ .* =+\s*$")
# WikiText is tokenised with spaces around punctuation: a sentence ends at " . ", " ! " or " ? "
_SENT_END = re.compile(r"(?<= [.!?]) (?=\S)")


class DataError(ValueError):
    """Unusable text input: the message names the file and what is wrong with it."""


def split_sentences(lines: Sequence[str], min_words: int = 3) -> list[str]:
    """WikiText lines -> sentences: headings and empty lines dropped, paragraphs split at sentence ends."""
    out = []
    for line in lines:
        line = line.strip()
        if not line or _HEADING.match(line):
            continue
        for s in _SENT_END.split(line):
            s = s.strip()
            if len(s.split()) >= min_words:
                out.append(s)
    return out


def read_text_file(path: Path, min_words: int = 3) -> list[str]:
    """Sentences of a local text file. Non-UTF-8 bytes are replaced and reported once; no sentence -> DataError."""
    if not path.is_file():
        raise DataError(f"text file '{path}' does not exist")
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    bad = len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))  # invalid bytes, however grouped
    if bad:
        log.warning("%s: %d bytes were not valid UTF-8 and were replaced by U+FFFD", path, bad)
    if not text.strip():
        raise DataError(f"text file '{path}' is empty")
    sentences = split_sentences(text.splitlines(), min_words)
    if not sentences:
        raise DataError(
            f"text file '{path}' has no usable sentence (headings, empty lines and sentences under {min_words} words "
            "are dropped)"
        )
    return sentences


@dataclass(frozen=True)
class Document:
    """One document of a text source, kept whole and in order: an article, a source file, a page of prose."""

    name: str  # where it came from: the file (relative to the source folder), with "#k" for the k-th of a file
    text: str


# what a folder's files are read as text; anything else in a folder (binaries, images) is skipped
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".text")
_TITLE = re.compile(r"^ = [^=].* = $")  # a WikiText article title (sections are " = = ... = = ")


def _file_text(path: Path) -> str:
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if text.count("\ufffd") > raw.decode("utf-8", errors="ignore").count("\ufffd"):
        log.warning("%s: bytes that were not valid UTF-8 were replaced by U+FFFD", path)
    return text


def is_title(line: str) -> bool:
    """Whether ``line`` is a WikiText article title (" = Title = "; a section is " = = ... = = "): it starts one."""
    return bool(_TITLE.match(line.rstrip("\n")))


def text_documents(text: str, name: str) -> list[Document]:
    """A text's documents: one per WikiText article (a new one at each " = Title = " line, which it keeps), or the whole
    text as one."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if is_title(line)]
    if not starts:
        return [Document(name, text)]
    bounds = ([0] if starts[0] else []) + starts + [len(lines)]
    return [Document(f"{name}#{k}", "".join(lines[a:b])) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def jsonl_strings(path: Path, key: str, text: str | None = None) -> list[str]:
    """The string field ``key`` of every line of a JSONL file (``text``: its contents, if already read); blank lines
    are skipped; DataError naming the file and line of anything else."""
    out = []
    for k, line in enumerate((_file_text(path) if text is None else text).splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"'{path}' line {k + 1} is not JSON: {e.msg}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
            raise DataError(f"'{path}' line {k + 1}: expected an object with a string field \"{key}\"")
        out.append(rec[key])
    return out


def _file_documents(path: Path, name: str) -> list[Document]:
    """A file's documents: a .jsonl file one per line (its "text" field); a WikiText file one per article (a new one at
    each " = Title = " line); any other file one."""
    text = _file_text(path)
    if path.suffix == ".jsonl":
        return [Document(f"{name}#{k}", t) for k, t in enumerate(jsonl_strings(path, "text", text))]
    return text_documents(text, name)


def read_documents(path: str | Path, *, suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[Document]:
    """A text source as documents in order, nothing shuffled or dropped but empty documents.

    A folder: its files with one of ``suffixes`` (recursively, sorted by path), each read as a file. A file: one
    document, or one per line of a .jsonl file ({"text": ...}), or one per article of a WikiText file (" = Title = "
    lines start articles). Non-UTF-8 bytes are replaced and reported; no text at all -> DataError naming the path.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in suffixes)
        docs = [d for f in files for d in _file_documents(f, str(f.relative_to(path)))]
    elif path.is_file():
        docs = _file_documents(path, path.name)
    else:
        raise DataError(f"text source '{path}' is neither a file nor a folder")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"text source '{path}' holds no text (a folder is read for {', '.join(suffixes)} files)")
    return docs


def split_by_ratio(sentences: list[str], ratios: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Deterministic shuffle then cut into train/valid/test by ``ratios``."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise DataError(f"split ratios must be three non-negative numbers summing to 1, got {list(ratios)}")
    idx = list(range(len(sentences)))
    random.Random(seed).shuffle(idx)
    n_train = int(round(ratios[0] * len(idx)))
    n_valid = int(round(ratios[1] * len(idx)))
    cuts = {"train": idx[:n_train], "valid": idx[n_train:n_train + n_valid], "test": idx[n_train + n_valid:]}
    return {k: [sentences[i] for i in sorted(v)] for k, v in cuts.items()}


def _split_file(data_dir: Path, split: str) -> Path | None:
    """DIR/<split>.txt; None when DIR holds none of train/valid/test.txt (DataError when it holds others only)."""
    f = data_dir / f"{split}.txt"
    if f.is_file():
        return f
    named = [data_dir / f"{s}.txt" for s in SPLITS if (data_dir / f"{s}.txt").is_file()]
    if named:
        raise DataError(f"split '{split}' is missing: expected '{f}' (found {', '.join(p.name for p in named)})")
    return None


def load_local_split(data_dir: Path, split: str, *, seed: int, ratios: Sequence[float], min_words: int = 3
                     ) -> list[str]:
    """``split`` from DIR/{train,valid,test}.txt, or from the single .txt file in DIR cut by ``ratios``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"`data_dir` '{data_dir}' is not a folder")
    f = _split_file(data_dir, split)
    if f is not None:
        return read_text_file(f, min_words)
    txts = sorted(data_dir.glob("*.txt"))
    if len(txts) != 1:
        raise DataError(
            f"`data_dir` '{data_dir}' must hold train.txt/valid.txt/test.txt or exactly one .txt file to split by "
            f"ratio; found {len(txts)} .txt files"
        )
    parts = split_by_ratio(read_text_file(txts[0], min_words), ratios, seed)
    if not parts[split]:
        raise DataError(f"split '{split}' of '{txts[0]}' is empty with ratios {list(ratios)}")
    return parts[split]


def cut_documents(docs: Sequence[Document], shares: Sequence[float], *, what: str) -> list[list[Document]]:
    """Whole documents, in order, into consecutive parts sized by ``shares`` (of their characters): no document in two
    parts, every part with a share > 0 non-empty. A text of fewer documents than parts is cut at line boundaries
    instead (each line a document; logged): one file of prose cut into consecutive runs of lines."""
    need = sum(1 for x in shares if x > 0)
    if len(docs) < need:
        log.warning("%s: %d document(s) for %d parts: cut at line boundaries instead", what, len(docs), need)
        docs = [Document(f"{d.name}:{i + 1}", line) for d in docs
                for i, line in enumerate(d.text.splitlines(keepends=True)) if line.strip()]
        if len(docs) < need:
            raise DataError(f"{what} has {len(docs)} line(s) of text: too few to cut into {need} parts")
    mids, total = [], 0
    for d in docs:
        mids.append(total + len(d.text) / 2)
        total += len(d.text)
    bounds, acc = [0], 0.0
    for j, share in enumerate(shares[:-1]):
        acc += share / sum(shares)
        left = sum(1 for x in shares[j + 1:] if x > 0)  # documents the later parts still need
        b = sum(1 for m in mids if m < acc * total)
        b = bounds[-1] if share == 0 else min(max(b, bounds[-1] + 1), len(docs) - left)
        bounds.append(b)
    bounds.append(len(docs))
    return [list(docs[a:b]) for a, b in zip(bounds, bounds[1:])]


def document_lines(docs: Sequence[Document]) -> list[str]:
    """The lines of documents in order, nothing dropped (blank lines, indentation and short lines kept): joined with
    newlines they are the documents' text."""
    return [line for d in docs for line in d.text.splitlines()]


def load_local_documents(data_dir: Path, split: str, ratios: Sequence[float]) -> list[Document]:
    """``split`` as whole documents: DIR/<split>.txt read by ``read_documents``; or the documents of the single .txt
    file in DIR, of every text file of DIR, or of the file ``data_dir`` itself, assigned whole to train / valid / test
    in order by ``ratios``."""
    data_dir = Path(data_dir)
    if data_dir.is_dir():
        f = _split_file(data_dir, split)
        if f is not None:
            return read_documents(f)
        txts = sorted(data_dir.glob("*.txt"))
        source = txts[0] if len(txts) == 1 else data_dir
    elif data_dir.is_file():
        source = data_dir
    else:
        raise DataError(f"`data_dir` '{data_dir}' is neither a folder nor a file")
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise DataError(f"split ratios must be three non-negative numbers summing to 1, got {list(ratios)}")
    part = cut_documents(read_documents(source), ratios, what=f"'{source}'")[SPLITS.index(split)]
    if not part:
        raise DataError(f"split '{split}' of '{source}' is empty with ratios {list(ratios)}")
    return part


WIKITEXT2_REPOS = ("Salesforce/wikitext", "wikitext")  # the canonical id moved; the short one redirects
WIKITEXT2_CONFIG = "wikitext-2-raw-v1"


def wikitext2_parquet_files(split: str) -> list[Path]:
    """The Hub dataset's parquet files of one split (``wikitext-2-raw-v1/<split>-*.parquet``), via the HF cache.

    ``snapshot_download`` fetches them when online and, under HF_HUB_OFFLINE=1, finds them in HF_HUB_CACHE, which
    ``datasets.load_dataset`` offline does not look at (it only reuses its own processed cache).
    """
    from huggingface_hub import snapshot_download

    hf_split = {"train": "train", "valid": "validation", "test": "test"}[split]
    pattern = f"{WIKITEXT2_CONFIG}/{hf_split}-*.parquet"
    errors = []
    for repo in WIKITEXT2_REPOS:
        try:
            local = Path(snapshot_download(repo, repo_type="dataset", allow_patterns=[pattern]))
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many classes
            errors.append(f"{repo}: {type(e).__name__}: {e}")
            continue
        files = sorted(local.glob(pattern))
        if files:
            return files
        errors.append(f"{repo}: no {pattern} in {local}")
    raise DataError("; ".join(errors))


def wikitext2_lines(split: str) -> list[str]:
    """The raw lines of a WikiText-2 split (Hugging Face Hub or its local cache), titles and blank lines included.

    The parquet files are read through the hub cache; a ``datasets`` cache from an earlier ``load_dataset`` is the
    fallback.
    """
    try:
        import pyarrow.parquet as pq

        files = wikitext2_parquet_files(split)
        return [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    except (DataError, ImportError) as e:
        errors = [f"parquet files: {e}"]
    try:
        from datasets import load_dataset
    except ImportError:  # pragma: no cover - depends on the install
        raise DataError(f"could not load WikiText-2 ({errors[0]}); pass `data_dir` DIR") from None
    hf_split = {"train": "train", "valid": "validation", "test": "test"}[split]
    for repo in WIKITEXT2_REPOS:
        try:
            ds = load_dataset(repo, WIKITEXT2_CONFIG, split=hf_split)
            break
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many classes
            errors.append(f"datasets {repo}: {type(e).__name__}: {e}")
    else:
        raise DataError("could not load WikiText-2 from the Hugging Face Hub or its cache (" + "; ".join(errors)
                        + "); offline? pass `data_dir` DIR")
    return list(ds["text"])


def load_wikitext2(split: str, min_words: int = 3) -> list[str]:
    """WikiText-2 (raw) from the Hugging Face Hub (or its local cache), split into sentences."""
    return split_sentences(wikitext2_lines(split), min_words)


def wikitext2_documents(split: str) -> list[Document]:
    """A raw WikiText-2 split as its articles in order (each from its " = Title = " line, which it keeps)."""
    text = "\n".join(t.rstrip("\n") for t in wikitext2_lines(split))
    return [d for d in text_documents(text, f"wikitext2-{split}") if d.text.strip()]


SPLIT_BY = ("sentences", "documents")


@dataclass(frozen=True)
class TrainText:
    """A named text source of a decoder's training mixture: a file or folder ``read_documents`` reads, and its weight
    (its share of the training tokens, relative to the other sources')."""

    name: str
    path: str
    weight: float = 1.0

    def __str__(self) -> str:  # as --train-text takes it (run records write it so)
        return f"{self.name}={self.path}:{self.weight:g}"


@dataclass
class DataConfig:
    """What a run reads and how: the text (a Hub corpus or a local folder), its splits, tokenisation and batches."""

    dataset: str = "wikitext2"  # the corpus from the Hugging Face Hub, when there is no data_dir
    data_dir: str | None = None  # local text: train.txt/valid.txt/test.txt, or one .txt file cut by split_ratio
    split_ratio: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, valid, test of a single file
    seed: int = 0  # the cut of a single file, the evaluation mask positions and the batch order (and the run's RNG)
    min_words: int = 3  # shorter sentences are dropped (split_by sentences)
    seq_len: int = 40  # tokens per sentence, [CLS] and [SEP] included
    batch_size: int = 32  # sentences per batch and process
    num_workers: int = 0  # DataLoader worker processes
    fraction: float = 1.0  # the leading share of each split that is used (the seed's --percentage_data)
    # how the text is read and cut into splits: "sentences" (cut at sentence ends, short ones dropped; a single file's
    # sentences shuffled into splits) or "documents" (whole documents in order, every line kept; a single file's or
    # folder's documents assigned whole to splits in order). None: documents for a causal LM, sentences for a masked
    # LM (its teacher was trained on its sentence split); resolved when the session starts (``utils.session``)
    split_by: str | None = None
    # a decoder's training mixture: its train and valid windows drawn from these sources (and the data split's own
    # text, with ``data_weight``) in proportion to their weights, counted in tokens (``utils.session``)
    train_texts: tuple[TrainText, ...] = ()
    data_weight: float = 1.0  # the data split's own weight in the mixture (0: the named texts only)


def load_sentences(spec: DataConfig, split: str, fraction: float = 1.0) -> list[str]:
    """Sentences of one split, or (``split_by`` documents) the lines of its documents in order; ``fraction`` keeps a
    deterministic leading share (``spec.fraction`` is not applied here: a caller that limits the split in another way
    reads the whole split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction of data must be in (0, 1], got {fraction}")
    by_documents = spec.split_by == "documents"
    if spec.data_dir and by_documents:
        sents = document_lines(load_local_documents(Path(spec.data_dir), split, spec.split_ratio))
    elif spec.data_dir:
        sents = load_local_split(Path(spec.data_dir), split, seed=spec.seed, ratios=spec.split_ratio,
                                 min_words=spec.min_words)
    elif spec.dataset == "wikitext2":
        sents = document_lines(wikitext2_documents(split)) if by_documents else load_wikitext2(split, spec.min_words)
    else:
        raise DataError(f"unknown dataset '{spec.dataset}'; use wikitext2 or `data_dir` DIR")
    n = max(1, int(len(sents) * fraction))
    return sents[:n]


def train_text_lines(text: TrainText, split: str, ratios: Sequence[float]) -> list[str]:
    """The ``split`` (train or valid) of a mixture source: its documents cut in order by the train : valid ``ratios``
    (no document in both), as lines."""
    if split not in ("train", "valid"):
        raise ValueError(f"a training text has a train and a valid part, not '{split}'")
    parts = cut_documents(read_documents(text.path), ratios[:2], what=f"`train_texts` '{text.name}'")
    part = parts[0 if split == "train" else 1]
    if not part:
        raise DataError(f"`train_texts` '{text.name}' ({text.path}) has no {split} part with split ratios "
                        f"{list(ratios)}")
    return document_lines(part)
