"""The teacher's top-k next-token log-probabilities of every training window, on disk: what the end-to-end heal (KD
fine-tune) of a decoder reads in place of running the teacher beside the student (``ModelDistill`` with a
``TopKCache``; the loss is ``training.losses.topk_kl``).

Per token of each window, two features of ``TeacherCache``'s folder (the same key, locks, checks and rebuilds):

- ``top{k}_t{T}_ids``: the ids of the teacher's k most probable next tokens, most probable first, as uint16 when the
  vocabulary has at most 65,536 entries (SmolLM2: 49,152), else int32;
- ``top{k}_t{T}_logp``: float32, their log-probabilities at temperature T (log softmax(logits / T)) and, in a last
  column, the log of the probability mass of all other tokens (the tail); a probability below e^-10000 is stored as
  that floor (float32's exp is 0 below about e^-104, so nothing changes).

So a token costs k x 2 (or 4) + (k + 1) x 4 bytes: 100 at k = 16, 388 at k = 64, 1,540 at k = 256 on SmolLM2 (its
hidden state in ``TeacherCache`` costs 1,152). Both files of a (k, T) are always built together in one teacher pass,
so the ids and the values come from the same pass. The last token of a window has no next token in it; its row is
stored all the same (every token is a row, as in ``TeacherCache``) and never read.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from models.base import SwappableModel
from ..errors import SettingError
from .features import TeacherCache

LOGP_FLOOR = -1e4  # the least log-probability stored (exp of it is 0 in float32)
_NAME = re.compile(r"top(\d+)_t([0-9.e+-]+)_(ids|logp)$")


def check_topk(k: object, vocab_size: int, task: str) -> int:
    """A number of kept tokens for a teacher of ``task`` (causal: a masked LM's inputs are masked afresh at every
    step, so its targets cannot be cached) and vocabulary ``vocab_size``: an integer from 1 to the vocabulary size."""
    if task != "causal":
        raise SettingError("`teacher_topk` caches next-token distributions: it needs a decoder teacher (a masked LM's "
                           "inputs are masked afresh at every step, so its targets cannot be cached)")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= vocab_size:
        raise SettingError(f"`teacher_topk` must be a whole number from 1 to the teacher's vocabulary size "
                           f"{vocab_size}, got {k!r}")
    return int(k)


def topk_names(k: int, temperature: float) -> tuple[str, str]:
    """The two features of the top-k cache at ``temperature``: (ids, log-probabilities)."""
    stem = f"top{k}_t{temperature:g}"
    return f"{stem}_ids", f"{stem}_logp"


@torch.no_grad()
def teacher_topk(teacher: SwappableModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, k: int,
                 temperature: float, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most probable next tokens at every position: ids [B, T, k] and float32 log-probabilities at
    ``temperature`` [B, T, k + 1], the last column the log of the rest's mass (a log-sum-exp over the other tokens,
    exact however small it is). Values are floored at ``LOGP_FLOOR``. The logits over the vocabulary are made
    ``rows`` positions at a time (4096 x a 128k vocabulary is 2 GB in float32), never for the whole batch at once."""
    h = teacher(input_ids, attention_mask, with_logits=False).last_hidden_state
    flat = h.reshape(-1, h.shape[-1])
    ids, logp = [], []
    for start in range(0, flat.shape[0], rows):
        part = (teacher.mlm_logits(flat[start:start + rows]).float() / temperature).log_softmax(-1)
        top, idx = part.topk(k, dim=-1)
        rest = part.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
        ids.append(idx)
        logp.append(torch.cat([top, rest], -1).clamp_min(LOGP_FLOOR))
    shape = (*h.shape[:-1], -1)
    return torch.cat(ids).view(shape), torch.cat(logp).view(shape)


class TopKCache(TeacherCache):
    """The top-k features (``topk_names``) of a causal teacher over the windows of a split, keyed, locked, checked
    and rebuilt exactly as ``TeacherCache``'s hidden states (in the same folder)."""

    def __init__(self, root, teacher: SwappableModel, *, k: int, temperature: float, **key):
        self.vocab = teacher.config.vocab_size
        self.k, self.temperature = check_topk(k, self.vocab, teacher.TASK), float(temperature)
        self.names = list(topk_names(self.k, self.temperature))
        super().__init__(root, teacher, **key)

    def layout(self, name: str) -> tuple[int, np.dtype]:
        m = _NAME.fullmatch(name)
        if m is None:
            raise ValueError(f"unknown top-k feature '{name}' (expected top<k>_t<T>_ids or top<k>_t<T>_logp)")
        k = int(m.group(1))
        if m.group(3) == "ids":
            return k, np.dtype(np.uint16 if self.vocab <= 1 << 16 else np.int32)
        return k + 1, np.dtype(np.float32)

    def bytes_per_token(self) -> int:
        """Disk bytes per token of this cache's two features."""
        return sum(w * d.itemsize for w, d in map(self.layout, self.names))

    def compute(self, input_ids, attention_mask, names):
        ids, logp = teacher_topk(self.teacher, input_ids, attention_mask, k=self.k, temperature=self.temperature)
        return dict(zip(self.names, (ids, logp)))

    def _check(self, names: list[str], report: bool) -> list[str]:
        """Both features of a (k, T) when either is missing or damaged: they are only ever built together."""
        missing = super()._check(names, report)
        return list(self.names) if missing else []

    def read(self, index: torch.Tensor, *, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids [B, length, k] (int64) and log-probabilities [B, length, k + 1] of the windows ``index``."""
        got = self.batch(self.names, index, length=length, device=device)
        return got[self.names[0]], got[self.names[1]]
