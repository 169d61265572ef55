"""Text in, padded batches out: WikiText-2 or local files, one sentence per example, deterministic masking.

Evaluation masks exactly one token per sentence at a seeded position (never a special token), computed once in the
data pipeline so that every model evaluated sees the same masks. Training masking is standard BERT 15% (80/10/10).
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

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


def load_local_split(data_dir: Path, split: str, seed: int, ratios: Sequence[float], min_words: int = 3) -> list[str]:
    """``split`` from DIR/{train,valid,test}.txt, or from the single .txt file in DIR cut by ``ratios``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data-dir '{data_dir}' is not a folder")
    f = data_dir / f"{split}.txt"
    if f.is_file():
        return read_text_file(f, min_words)
    named = [data_dir / f"{s}.txt" for s in SPLITS if (data_dir / f"{s}.txt").is_file()]
    if named:
        raise DataError(f"split '{split}' is missing: expected '{f}' (found {', '.join(p.name for p in named)})")
    txts = sorted(data_dir.glob("*.txt"))
    if len(txts) != 1:
        raise DataError(
            f"--data-dir '{data_dir}' must hold train.txt/valid.txt/test.txt or exactly one .txt file to split by "
            f"ratio; found {len(txts)} .txt files"
        )
    parts = split_by_ratio(read_text_file(txts[0], min_words), ratios, seed)
    if not parts[split]:
        raise DataError(f"split '{split}' of '{txts[0]}' is empty with ratios {list(ratios)}")
    return parts[split]


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


def load_wikitext2(split: str, min_words: int = 3) -> list[str]:
    """WikiText-2 (raw) from the Hugging Face Hub (or its local cache), split into sentences.

    The parquet files are read through the hub cache; a ``datasets`` cache from an earlier ``load_dataset`` is the
    fallback.
    """
    try:
        import pyarrow.parquet as pq

        files = wikitext2_parquet_files(split)
        lines = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
        return split_sentences(lines, min_words)
    except (DataError, ImportError) as e:
        errors = [f"parquet files: {e}"]
    try:
        from datasets import load_dataset
    except ImportError:  # pragma: no cover - depends on the install
        raise DataError(f"could not load WikiText-2 ({errors[0]}); pass --data-dir DIR") from None
    hf_split = {"train": "train", "valid": "validation", "test": "test"}[split]
    for repo in WIKITEXT2_REPOS:
        try:
            ds = load_dataset(repo, WIKITEXT2_CONFIG, split=hf_split)
            break
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many classes
            errors.append(f"datasets {repo}: {type(e).__name__}: {e}")
    else:
        raise DataError("could not load WikiText-2 from the Hugging Face Hub or its cache (" + "; ".join(errors)
                        + "); offline? pass --data-dir DIR")
    return split_sentences(ds["text"], min_words)


@dataclass
class DataSpec:
    dataset: str = "wikitext2"
    data_dir: str | None = None
    split_ratio: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    min_words: int = 3


def load_sentences(spec: DataSpec, split: str, fraction: float = 1.0) -> list[str]:
    """Sentences of one split; ``fraction`` keeps a deterministic leading share (the seed's --percentage_data)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction of data must be in (0, 1], got {fraction}")
    if spec.data_dir:
        sents = load_local_split(Path(spec.data_dir), split, spec.seed, spec.split_ratio, spec.min_words)
    elif spec.dataset == "wikitext2":
        sents = load_wikitext2(split, spec.min_words)
    else:
        raise DataError(f"unknown dataset '{spec.dataset}'; use wikitext2 or --data-dir DIR")
    n = max(1, int(len(sents) * fraction))
    return sents[:n]


def token_ids_hash(token_ids: Sequence[Sequence[int]], *context: object) -> str:
    """A short hash of tokenised sentences (and any settings in ``context``): identifies a data split."""
    import hashlib

    import numpy as np

    h = hashlib.sha256("|".join(map(str, context)).encode() + b"|")
    for ids in token_ids:
        h.update(np.asarray(ids, dtype=np.int32).tobytes())
        h.update(b"|")
    return h.hexdigest()[:20]


# ---- tokenisation and batching ----
class TokenizedSentences(Dataset):
    """Token ids per sentence ([CLS] ... [SEP], truncated to seq_len keeping both), plus an eval mask position."""

    def __init__(self, sentences: list[str], tokenizer, seq_len: int = 40, mask_seed: int | None = 0):
        if seq_len < 3:
            raise DataError(f"--seq-len must be at least 3 ([CLS] token [SEP]), got {seq_len}")
        # one token more than kept tells a sentence that was cut from one that fits exactly
        enc = tokenizer(sentences, truncation=True, max_length=seq_len + 1, add_special_tokens=True)
        special = set(tokenizer.all_special_ids)
        self.ids: list[list[int]] = []
        self.truncated = 0
        for ids in enc["input_ids"]:
            cut = len(ids) > seq_len
            if cut:
                ids = ids[:seq_len - 1] + ids[-1:]  # keep [CLS] ... [SEP], as truncation to seq_len would
            if not any(t not in special for t in ids):
                continue  # nothing maskable
            self.truncated += int(cut)
            self.ids.append(list(ids))
        self.skipped = len(sentences) - len(self.ids)
        if not self.ids:
            raise DataError("no sentence has a token that is not special after tokenisation")
        self.mask_positions: list[int] | None = None
        if mask_seed is not None:
            g = random.Random(mask_seed)
            self.mask_positions = []
            for ids in self.ids:
                cand = [i for i, t in enumerate(ids) if t not in special]
                self.mask_positions.append(cand[g.randrange(len(cand))])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        item = {"index": i, "input_ids": self.ids[i]}
        if self.mask_positions is not None:
            item["mask_pos"] = self.mask_positions[i]
        return item

    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


class TokenWindows(Dataset):
    """The text of a split as one token stream cut into windows: what a causal LM trains and is evaluated on.

    The sentences are joined with newlines and tokenised without special tokens (no BOS); the stream is cut into
    windows of ``seq_len`` tokens, one after the other (stride ``seq_len``, no overlap); a last window shorter than
    two tokens is dropped (nothing to predict). Each window predicts its tokens 2..n from the ones before them.
    """

    def __init__(self, sentences: list[str], tokenizer, seq_len: int = 256):
        if seq_len < 2:
            raise DataError(f"--seq-len must be at least 2 for a causal LM (a token and its next), got {seq_len}")
        ids = tokenizer("\n".join(sentences), add_special_tokens=False, verbose=False)["input_ids"]
        self.ids: list[list[int]] = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
        if self.ids and len(self.ids[-1]) < 2:
            self.ids.pop()
        if not self.ids:
            raise DataError(f"the text gives {len(ids)} token(s): not one window of two tokens to predict from")
        self.tokens, self.seq_len = len(ids), seq_len
        self.truncated = self.skipped = 0  # as TokenizedSentences reports them: windows cut nothing away
        self.mask_positions = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "input_ids": self.ids[i]}

    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    def describe(self) -> str:
        return (f"{len(self.ids)} windows of {self.seq_len} tokens (stride {self.seq_len}, no BOS) from "
                f"{self.tokens} tokens")


def tokenize_split(sentences: list[str], tokenizer, seq_len: int, task: str, mask_seed: int | None = 0
                   ) -> TokenizedSentences | TokenWindows:
    """A split as the model's task reads it: sentences with a seeded [MASK] position (``mlm``) or token windows
    (``causal``)."""
    if task == "causal":
        return TokenWindows(sentences, tokenizer, seq_len)
    if task != "mlm":
        raise ValueError(f"task must be 'mlm' or 'causal', got '{task}'")
    return TokenizedSentences(sentences, tokenizer, seq_len, mask_seed=mask_seed)


def pad_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its end-of-text token, else 0 (padding is masked)."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


@dataclass
class Collator:
    """Pads per batch (not to a fixed length). With ``mask_token_id`` set, applies the eval mask position."""

    pad_token_id: int
    mask_token_id: int | None = None

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(it["input_ids"]) for it in items)
        B = len(items)
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((B, T), dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            ids[b, :n] = torch.tensor(it["input_ids"])
            att[b, :n] = 1
        batch = {"input_ids": ids, "attention_mask": att, "index": torch.tensor([it["index"] for it in items])}
        if "mask_pos" in items[0]:
            pos = torch.tensor([it["mask_pos"] for it in items])
            rows = torch.arange(B)
            batch["mask_pos"] = pos
            batch["target"] = ids[rows, pos].clone()
            if self.mask_token_id is not None:
                batch["masked_input_ids"] = ids.clone()
                batch["masked_input_ids"][rows, pos] = self.mask_token_id
        return batch


def bert_mlm_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Sequence[int], mask_token_id: int,
    vocab_size: int, generator: torch.Generator, prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard BERT masking: of 15% chosen tokens, 80% -> [MASK], 10% -> random, 10% unchanged.

    Returns (masked input ids, labels with -100 where no prediction is asked). At least one token per sentence.
    """
    dev = input_ids.device
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(list(special_ids), device=dev))
    u = torch.rand(input_ids.shape, generator=generator, device="cpu").to(dev)
    chosen = maskable & (u < prob)
    # guarantee one prediction per sentence: the maskable token with the smallest draw
    first = torch.where(maskable, u, torch.full_like(u, 2.0)).argmin(dim=1)
    chosen[torch.arange(len(first), device=dev), first] |= maskable[torch.arange(len(first), device=dev), first]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    r = torch.rand(input_ids.shape, generator=generator, device="cpu").to(dev)
    rand_tok = torch.randint(vocab_size, input_ids.shape, generator=generator, device="cpu").to(dev)
    out = input_ids.clone()
    out[chosen & (r < 0.8)] = mask_token_id
    swap = chosen & (r >= 0.8) & (r < 0.9)
    out[swap] = rand_tok[swap]
    return out, labels


def mask_one_token(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Sequence[int],
                   mask_token_id: int, generator: torch.Generator) -> torch.Tensor:
    """One [MASK] per sentence at a uniformly drawn non-special real token (the seed's training sentences)."""
    dev = input_ids.device
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(list(special_ids), device=dev))
    u = torch.rand(input_ids.shape, generator=generator, device="cpu").to(dev)
    pos = torch.where(maskable, u, torch.full_like(u, 2.0)).argmin(dim=1)
    rows = torch.arange(len(pos), device=dev)
    out = input_ids.clone()
    out[rows, pos] = torch.where(maskable[rows, pos], torch.full_like(pos, mask_token_id), out[rows, pos])
    return out


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches to cut padding: sort within shuffled chunks, then shuffle batch order.

    Deterministic per (seed, epoch). Under data parallelism the sampler builds global batches of
    ``batch_size * num_replicas`` sentences, the same on every rank, and rank r takes every k-th sentence of each,
    so a K-process run sees exactly the batches of a 1-process run with K times the batch size.
    """

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 bucket_batches: int = 50, num_replicas: int = 1, rank: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.lengths, self.batch_size, self.shuffle, self.seed = lengths, batch_size, shuffle, seed
        self.bucket, self.num_replicas, self.rank = bucket_batches, num_replicas, rank
        self.epoch = 0
        self.skip = 0  # batches of the epoch already done (a mid-epoch resume): not yielded again

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        n, bs = len(self.lengths), self.batch_size * self.num_replicas
        if not self.shuffle:
            batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
            chunk = bs * self.bucket
            batches = []
            for c in range(0, n, chunk):
                part = sorted(order[c:c + chunk], key=lambda i: self.lengths[i])
                batches += [part[i:i + bs] for i in range(0, len(part), bs)]
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        if self.num_replicas > 1:
            # training: every rank needs a share of every batch, or the gradient all-reduce would hang;
            # evaluation (no shuffle) keeps every sentence: nothing is reduced per batch
            k = self.num_replicas
            batches = [b[self.rank::k] for b in batches if len(b) >= k or not self.shuffle]
            batches = [b for b in batches if b]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches()[self.skip:])

    def __len__(self) -> int:
        return len(self._batches())


def make_loader(ds: TokenizedSentences | TokenWindows, tokenizer, batch_size: int, shuffle: bool, seed: int = 0,
                num_workers: int = 0, pin_memory: bool = False, num_replicas: int = 1,
                rank: int = 0) -> tuple[torch.utils.data.DataLoader, BucketBatchSampler]:
    """DataLoader over length-bucketed batches, padded per batch; the sampler is returned for ``set_epoch``."""
    from torch.utils.data import DataLoader

    sampler = BucketBatchSampler(ds.lengths(), batch_size, shuffle=shuffle, seed=seed, num_replicas=num_replicas,
                                 rank=rank)
    collate = Collator(pad_id(tokenizer), getattr(tokenizer, "mask_token_id", None))
    # a generator of its own: creating an iterator must not draw from the global RNG (that would shift dropout and
    # masking, so that runs with and without workers, or resumed ones, would differ)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                        pin_memory=pin_memory, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler
