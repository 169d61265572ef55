"""Layer-removal baselines a planned student is measured against (decoders, issue 22).

- ShortGPT (Men et al., 2024): drop the layers with the lowest Block Influence, BI_i = 1 - the mean cosine between a
  layer's input and output hidden states over the real tokens of calibration windows.
- SLEB-style (Song et al., 2024): drop one layer at a time, each time the one whose removal raises the perplexity of
  the calibration windows least (the model with the layers dropped so far).

Both give the order in which layers go; a student drops the first ``n`` (``drop_choices``), where ``n`` is the fewest
that meet a measured speed-up or KV-cache target (``fewest_drops``). Calibration windows come from the training split,
never the test split. A dropped layer is the map's ``drop`` option (attention none, no feed-forward part), so the
students heal with the same KD fine-tune as planned ones (``utils.planning.students.make_student``).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

from models.base import SwappableModel
from models.compress import compose
from ..evaluation.metrics import next_tokens
from ..training.students import dropped_layers
from .sensitivity import Option, kv_bytes_saved

log = logging.getLogger(__name__)

DROP = Option("drop", "drop", 0, 0, 0, "none")


@torch.no_grad()
def block_influence(teacher: SwappableModel, loader, *, device: torch.device) -> list[float]:
    """ShortGPT's Block Influence of every layer: 1 - mean cos(input, output) over the real tokens of ``loader``."""
    sums, count = [0.0] * len(teacher.layers), 0.0
    for batch in loader:
        ids, att = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = teacher(ids, att, output_hidden_states=True, with_logits=False).hidden_states
        valid = att.bool()
        for i in range(len(teacher.layers)):
            sums[i] += F.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)[valid].double().sum().item()
        count += float(valid.sum())
    return [1.0 - s / count for s in sums]


def shortgpt_order(teacher: SwappableModel, loader, *, device: torch.device) -> tuple[list[int], list[float]]:
    """Layers by increasing Block Influence (the first goes first), and the influences."""
    bi = block_influence(teacher, loader, device=device)
    return sorted(range(len(bi)), key=lambda i: bi[i]), bi


def dropped(teacher: SwappableModel, layers: list[int]) -> SwappableModel:
    """A view of the teacher with ``layers`` dropped (empty layers in their place; no weights copied)."""
    return compose(teacher, layers=dropped_layers(teacher.config, layers))


@torch.no_grad()
def calibration_nll(model: SwappableModel, loader, *, device: torch.device) -> float:
    """Mean next-token negative log-likelihood of a causal LM over ``loader``."""
    total, count = 0.0, 0
    for batch in loader:
        ids, att, sel, target = next_tokens(batch, device)
        out = model(ids, att, with_logits=False)
        logits = model.lm_logits(out.last_hidden_state[sel]).float()
        total += F.cross_entropy(logits, target, reduction="sum").item()
        count += len(target)
    return total / max(count, 1)


def sleb_order(teacher: SwappableModel, loader, *, device: torch.device, steps: int, start: list[int] | None = None
               ) -> tuple[list[int], list[float]]:
    """SLEB-style greedy removal of ``steps`` more layers after ``start`` (the order so far): each step drops the
    remaining layer whose removal (on top of the ones dropped so far) gives the lowest calibration perplexity.
    Returns (the new layers in order, the perplexity after each of their steps)."""
    done = list(start or [])
    order: list[int] = []
    trace: list[float] = []
    remaining = [i for i in range(len(teacher.layers)) if i not in done]
    for _ in range(min(steps, len(remaining) - 1)):
        scores = {i: calibration_nll(dropped(teacher, done + order + [i]), loader, device=device) for i in remaining}
        best = min(scores, key=scores.get)
        order.append(best)
        remaining.remove(best)
        trace.append(math.exp(scores[best]))
        log.info("SLEB step %d: drop layer %d (calibration perplexity %.3f)", len(done) + len(order), best, trace[-1])
    return order, trace


def drop_choices(order: list[int], n: int) -> dict[int, Option]:
    """The map-option choices of a student that drops the first ``n`` layers of ``order``."""
    return {i: DROP for i in sorted(order[:n])}


def fewest_drops(order: list[int], meets: Callable[[dict[int, Option]], bool], *, start: int = 1,
                 limit: int | None = None, extend: Callable[[], bool] | None = None) -> int | None:
    """The fewest layers of ``order`` to drop (from ``start`` on, at most ``limit``: default all but one) for
    ``meets`` (a measured target) to hold; None if no number does. ``extend`` lengthens ``order`` by one layer when it
    is too short (False: it cannot)."""
    limit = len(order) - 1 if limit is None else limit
    n = max(1, start)
    while n <= limit:
        while len(order) < n:
            if extend is None or not extend():
                return None
        if meets(drop_choices(order, n)):
            return n
        n += 1
    return None


def kv_fraction(teacher: SwappableModel, choices: dict[int, Option]) -> float:
    """The KV-cache bytes per token a student of ``choices`` keeps, as a fraction of the teacher's."""
    cfg = teacher.config
    saved = sum(kv_bytes_saved(cfg, opt.covers(i), opt.spec(i, cfg)) for i, opt in choices.items())
    return 1.0 - saved / cfg.kv_cache_bytes_per_token()
