"""lm-eval's ``HFLM`` over one of our decoders in memory (imported only where lm-eval is installed: ``harness``).

The model is handed to HFLM inside the transformers class its remote-code export loads (the family's wrapper,
``models/modeling_compact_<family>.py``), sharing every module with our model (nothing copied): HFLM then does what it
does with any transformers model (tokenise, batch, roll windows, generate), and the numbers are those of
``HFLM(pretrained=<the exported folder>)``.

One difference: our models take no padding together with a KV cache, and HFLM generates a batch of prompts of
different lengths left-padded. Such a batch is generated one prompt at a time, unpadded, and padded back as HFLM
expects (greedy tokens do not depend on the batch; an exported remote-code folder refuses such a batch).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
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

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        mask = generation_kwargs.pop("attention_mask", None)
        if mask is None or bool(mask.all()):
            return super()._model_generate(context, max_length, stop, attention_mask=mask, **generation_kwargs)
        new_tokens = max_length - context.shape[1]
        rows = []
        for ids, keep in zip(context, mask.bool()):
            prompt = ids[keep][None]
            out = super()._model_generate(prompt, prompt.shape[1] + new_tokens, stop,
                                          attention_mask=torch.ones_like(prompt), **dict(generation_kwargs))
            rows.append(torch.cat([ids[~keep], out[0]]))  # HFLM cuts the generated tokens at the padded width
        width = max(len(r) for r in rows)
        return torch.stack([F.pad(r, (0, width - len(r)), value=self.tokenizer.pad_token_id) for r in rows])
