"""lm-eval's ``HFLM`` over one of our decoders in memory (imported only where lm-eval is installed: ``harness``).

The model is handed to HFLM inside the transformers class its remote-code export loads (the family's wrapper,
``models/modeling_compact_<family>.py``), sharing every module with our model (nothing copied): HFLM then does what it
does with any transformers model (tokenise, batch, roll windows, generate), and the numbers are those of
``HFLM(pretrained=<the exported folder>)``.
"""
from __future__ import annotations

import logging

import torch
from lm_eval.models.huggingface import HFLM

from models.base import SwappableModel
from models.export import compact_config_dict, remote_module


def as_transformers(model: SwappableModel, tokenizer) -> torch.nn.Module:
    """``model`` inside its export's transformers class (a ``PreTrainedModel`` with ``generate``), built empty on
    the meta device and given the model's own modules."""
    config_dict = compact_config_dict(model, tokenizer)
    cls = getattr(remote_module(model), config_dict["architectures"][0])
    with torch.device("meta"):  # the wrapper's own (random) weights are never allocated: ours replace them
        wrapper = cls(cls.config_class(**config_dict))
    object.__setattr__(wrapper, "_ours", model)  # as the wrapper keeps its own model: not a registered submodule
    wrapper.model, wrapper.lm_head = model.model, model.lm_head
    return wrapper.eval()


class InMemoryLM(HFLM):
    """HFLM over one of our decoders (on its own device), its tokenizer and lm-eval's ``batch_size``."""

    def __init__(self, model: SwappableModel, tokenizer, *, batch_size: int = 1):
        hflm_log = logging.getLogger(HFLM.__module__)
        level = hflm_log.level
        hflm_log.setLevel(logging.ERROR)  # its warnings on a model passed in: about runs over several processes
        try:
            super().__init__(pretrained=as_transformers(model, tokenizer), tokenizer=tokenizer, backend="causal",
                             batch_size=batch_size)
        finally:
            hflm_log.setLevel(level)
