"""CompactLlama: transformers classes around our Llama-family decoder (``llama.py``), for students whose layers each
have their own attention kind (grouped-query with their own heads and KV heads, a linear map, none), feed-forward
width (0: none) and origin.

Written next to an exported student with the files it imports (``llama.py``, ``base.py``, ``config.py``,
``kinds.py``), so that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it without
this repository (torch, transformers >= 4.40 or 5.x). ``generate()`` works with the KV cache transformers passes
(its ``update(k, v, layer)``): layers without attention cache nothing, so the cache's layers are the attention
layers in order. Weight names are ours (``models.llama``: the layer norms inside their sublayers). Generation takes
unpadded prompts (a batch of equal lengths).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 4.x copies only the files this one imports itself: every file the model needs is imported here
from .base import SwappableAttention
from .config import ModelConfig
from .kinds import KINDS  # noqa: F401
from .llama import LlamaForCausalLM

try:  # transformers 5 renamed the base class; the old name is an alias there
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

# what transformers calls the KV cache it passes around: ``cache`` (5.x), ``past_key_values`` (4.x)
_CACHE = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class CompactLlamaConfig(_BaseConfig):
    """``student`` and ``layer_plan``: our whole config (``models.llama.LlamaConfig.to_dict()``, its per-layer plan
    apart); the usual fields are mirrored at the top for tools that read them."""

    model_type = "compact_llama"

    def __init__(self, student: dict | None = None, layer_plan: list | None = None, **kwargs):
        self.student = dict(student or {})
        self.layer_plan = [dict(p) for p in layer_plan or []]
        for key in ("vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings", "bos_token_id",
                    "eos_token_id"):
            if key in self.student:
                kwargs.setdefault(key, self.student[key])
        kwargs.setdefault("num_hidden_layers", len(self.layer_plan))
        kwargs.setdefault("tie_word_embeddings", False)  # ours ties (or not) by itself
        super().__init__(**kwargs)


class _Cache:
    """transformers' cache seen as ours: attention block -> its index among the attention layers."""

    def __init__(self, cache, blocks: list[SwappableAttention]):
        self.cache, self.index = cache, {id(b): i for i, b in enumerate(blocks)}
        self.length = int(cache.get_seq_length()) if self.index else 0

    def update(self, block: SwappableAttention, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update(k, v, self.index[id(block)])


class CompactLlamaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CompactLlamaConfig
    base_model_prefix = "model"
    _supports_cache_class = True

    def __init__(self, config: CompactLlamaConfig):
        super().__init__(config)
        ours = LlamaForCausalLM(ModelConfig.from_dict({**config.student, "layers": config.layer_plan}))
        object.__setattr__(self, "_ours", ours)  # shares its modules with this wrapper; not a second copy
        self.model, self.lm_head = ours.model, ours.lm_head
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # every weight comes from the checkpoint; ours are initialised when built

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def _attention_blocks(self) -> list[SwappableAttention]:
        return [layer.block for layer in self.model.layers if hasattr(layer.block, "k_proj")]

    def _new_cache(self):
        from transformers.cache_utils import DynamicCache

        return DynamicCache()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        past = kwargs.get(_CACHE)
        if past is not None and past.get_seq_length() > 0:
            input_ids = input_ids[:, past.get_seq_length():]  # only the tokens the cache has not seen
        return {"input_ids": input_ids, _CACHE: past, "attention_mask": attention_mask, "use_cache": use_cache}

    def forward(self, input_ids=None, attention_mask=None, *, use_cache=None, labels=None, output_hidden_states=None,
                return_dict=None, logits_to_keep=0, num_logits_to_keep=0, **kwargs):
        if input_ids is None:
            raise ValueError("CompactLlamaForCausalLM needs input_ids")
        past, cache = kwargs.get(_CACHE), None
        if use_cache or past is not None:
            past = past if past is not None else self._new_cache()
            cache = _Cache(past, self._attention_blocks())
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding (a generation step passes ones for the cached tokens too)
        ctx = self._ours.context(attention_mask, input_ids.shape[1], cache)
        h = self._ours.embed(input_ids)
        hidden = [h] if output_hidden_states else None
        h = self._ours.run_layers(h, ctx, collect=hidden)
        keep = logits_to_keep or num_logits_to_keep
        logits = self._ours.lm_logits(h[:, -keep:] if keep else h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        res = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE: past if use_cache else None},
                                     hidden_states=tuple(hidden) if hidden is not None else None)
        return res if return_dict is not False else res.to_tuple()
