"""Sentences to padded batches: tokenised sentences with a seeded evaluation mask each (a masked LM's), token
windows (a causal LM's), length-bucketed batches (data-parallel aware), and a hash that identifies a tokenised
split.

Evaluation masks exactly one token per sentence at a seeded position (never a special token), computed once in the
data pipeline so that every model evaluated sees the same masks.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .text import DataError


def token_ids_hash(token_ids: Sequence[Sequence[int]], *context: object) -> str:
    """A short hash of tokenised sentences (and any settings in ``context``): identifies a data split."""
    import hashlib

    import numpy as np

    h = hashlib.sha256("|".join(map(str, context)).encode() + b"|")
    for ids in token_ids:
        h.update(np.asarray(ids, dtype=np.int32).tobytes())
        h.update(b"|")
    return h.hexdigest()[:20]


def _leading(ds: TokenizedSentences | TokenWindows, n: int | None, skip: int, *,
             what: str) -> tuple[TokenizedSentences | TokenWindows, slice]:
    """A shallow copy of ``ds`` holding its items ``skip .. skip + n`` (to the end with None), and that slice; ``ds``
    itself when the slice is everything."""
    if skip < 0 or (skip and skip >= len(ds.ids)):
        raise DataError(f"the text has {len(ds.ids)} {what}; cannot skip the first {skip}")
    rows = slice(skip, None if n is None else skip + n)
    if not skip and (n is None or n >= len(ds.ids)):
        return ds, rows
    part = copy.copy(ds)
    part.ids = ds.ids[rows]
    return part, rows


class TokenizedSentences(Dataset):
    """Token ids per sentence ([CLS] ... [SEP], truncated to seq_len keeping both), plus an eval mask position."""

    def __init__(self, sentences: list[str], tokenizer, seq_len: int = 40, *, mask_seed: int | None = 0):
        if seq_len < 3:
            raise DataError(f"`seq_len` must be at least 3 ([CLS] token [SEP]), got {seq_len}")
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

    def first(self, n: int | None, skip: int = 0) -> "TokenizedSentences":
        """The first ``n`` sentences (all with None) after the first ``skip``, their masks kept: a budget on an
        evaluation text."""
        part, rows = _leading(self, n, skip, what="sentences")
        if part is not self and self.mask_positions is not None:
            part.mask_positions = self.mask_positions[rows]
        return part


class TokenWindows(Dataset):
    """The text of a split as one token stream cut into windows: what a causal LM trains and is evaluated on.

    The sentences are joined with newlines and tokenised without special tokens (no BOS); the stream is cut into
    windows of ``seq_len`` tokens, one after the other (stride ``seq_len``, no overlap); a last window shorter than
    two tokens is dropped (nothing to predict). Each window predicts its tokens 2..n from the ones before them.
    """

    def __init__(self, sentences: list[str], tokenizer, seq_len: int = 256):
        if seq_len < 2:
            raise DataError(f"`seq_len` must be at least 2 for a causal LM (a token and its next), got {seq_len}")
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

    def first(self, n: int | None, skip: int = 0) -> "TokenWindows":
        """The first ``n`` windows in text order (all with None) after the first ``skip``: a budget on an evaluation
        text, or a confirmation on windows a bench has not scored."""
        part, _ = _leading(self, n, skip, what="windows")
        if part is not self:
            part.tokens = sum(len(x) for x in part.ids)
        return part

    def describe(self) -> str:
        return (f"{len(self.ids)} windows of {self.seq_len} tokens (stride {self.seq_len}, no BOS) from "
                f"{self.tokens} tokens")


class MixedWindows(TokenWindows):
    """Windows drawn from several sources in proportion to their weights, counted in tokens: a decoder's training
    mixture (``DataConfig.train_texts``).

    ``tokens`` are shared out by weight. Each source gives whole windows in a seeded order of its own (so a larger
    budget extends a smaller one's windows), cycled when the source has fewer tokens than its share (the passes are
    reported); a share is met to within half a window. The sources' windows are interleaved so that every leading run
    of the mixture keeps the proportions: the first batches of an unshuffled validation are the mixture too.
    """

    def __init__(self, sources: dict[str, tuple[TokenWindows, float]], tokens: int, *, seed: int):
        weight = sum(w for _, w in sources.values())
        if tokens < 1 or not sources or not weight > 0:
            raise DataError(f"a mixture needs sources of positive weight and tokens to share, got {tokens} tokens "
                            f"and weights {[w for _, w in sources.values()]}")
        picked: list[tuple[float, int, list[int]]] = []
        self.shares: dict[str, dict[str, float]] = {}
        for k, (name, (ds, w)) in enumerate(sources.items()):
            target = tokens * w / weight
            order = list(range(len(ds.ids)))
            random.Random(f"{seed}|{name}").shuffle(order)
            taken = i = 0
            while taken + len(ds.ids[order[i % len(order)]]) / 2 <= target:
                ids = ds.ids[order[i % len(order)]]
                picked.append(((taken + len(ids) / 2) / target, k, ids))
                taken, i = taken + len(ids), i + 1
            self.shares[name] = {"weight": w, "tokens": taken, "of": ds.tokens, "passes": i / len(order)}
        picked.sort(key=lambda p: (p[0], p[1]))
        self.ids = [p[2] for p in picked]
        if not self.ids:
            raise DataError(f"a mixture of {tokens} tokens gives no window: each source's share is under half a window")
        self.tokens = sum(len(x) for x in self.ids)
        self.seq_len = max(ds.seq_len for ds, _ in sources.values())
        self.truncated = self.skipped = 0
        self.mask_positions = None

    def describe(self) -> str:
        parts = [f"{name} {v['tokens']} ({v['tokens'] / self.tokens:.1%}, weight {v['weight']:g}, "
                 + (f"{v['passes']:.2f} passes over its {v['of']})" if v["passes"] > 1 else f"of its {v['of']})")
                 for name, v in self.shares.items()]
        return f"{len(self.ids)} windows of {self.seq_len} tokens from a mixture of {self.tokens} tokens: " + \
            ", ".join(parts)


def tokenize_split(sentences: list[str], tokenizer, seq_len: int, *, task: str, mask_seed: int | None = 0
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


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches to cut padding: sort within shuffled chunks, then shuffle batch order.

    Deterministic per (seed, epoch). Under data parallelism the sampler builds global batches of
    ``batch_size * num_replicas`` sentences, the same on every rank, and rank r takes every k-th sentence of each,
    so a K-process run sees exactly the batches of a 1-process run with K times the batch size.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
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
            if not self.shuffle and len(batches) > 1 and len(batches[-1]) < k:
                # evaluation: a last batch too small for every rank joins the one before, so that each rank runs as
                # many batches as the others (a forward of a model sharded with FSDP is a collective)
                batches[-2:] = [batches[-2] + batches[-1]]
            batches = [b[self.rank::k] for b in batches if len(b) >= k or not self.shuffle]
            batches = [b for b in batches if b]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches()[self.skip:])

    def __len__(self) -> int:
        return len(self._batches())


def make_loader(ds: TokenizedSentences | TokenWindows, tokenizer, batch_size: int, *, shuffle: bool, seed: int = 0,
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
