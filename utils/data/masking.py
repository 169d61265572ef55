"""Training-time targets: BERT's 15% masking (80/10/10) for masked-LM objectives, every next token for a causal
LM, and the seed's one [MASK] per sentence."""
from __future__ import annotations

from typing import Sequence

import torch


def bert_mlm_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, special_ids: Sequence[int],
                  mask_token_id: int, vocab_size: int, generator: torch.Generator, prob: float = 0.15
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


def mask_one_token(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, special_ids: Sequence[int],
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


class MLMMasker:
    """BERT 15% masking with the tokenizer's special ids; draws from a generator (seeded per epoch by the loop)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.special = list(tokenizer.all_special_ids)
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = vocab_size

    def __call__(self, ids: torch.Tensor, att: torch.Tensor, generator: torch.Generator | None = None):
        g = generator if generator is not None else torch.default_generator
        return bert_mlm_mask(ids, att, special_ids=self.special, mask_token_id=self.mask_id,
                             vocab_size=self.vocab_size, generator=g)


class OneMasker:
    """One [MASK] per training sentence, redrawn every step (the seed's dataset drew it per item)."""

    def __init__(self, tokenizer):
        self.special = list(tokenizer.all_special_ids)
        self.mask_id = tokenizer.mask_token_id

    def __call__(self, ids: torch.Tensor, att: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        g = generator if generator is not None else torch.default_generator
        return mask_one_token(ids, att, special_ids=self.special, mask_token_id=self.mask_id, generator=g)


class NextTokenLabels:
    """A causal LM's targets, in a masker's place: the ids unchanged and, at every real token that has a real next
    token, that next token as its label (-100 elsewhere). Draws nothing."""

    def __call__(self, ids: torch.Tensor, att: torch.Tensor, generator: torch.Generator | None = None):
        labels = torch.full_like(ids, -100)
        has_next = att[:, 1:].bool() & att[:, :-1].bool()
        labels[:, :-1] = torch.where(has_next, ids[:, 1:], labels[:, :-1])
        return ids, labels


def lm_targets(tokenizer, model) -> "MLMMasker | NextTokenLabels":
    """What the LM losses and metrics compare at: BERT-masked positions (masked LM) or every next token (causal)."""
    if model.TASK == "causal":
        return NextTokenLabels()
    return MLMMasker(tokenizer, model.config.vocab_size)
