"""CompactBERT: transformers classes around our BERT (``bert.py``), for students whose layers each have their own
attention kind, heads, head size and feed-forward size.

Written next to an exported student with the files it imports (``bert.py``, ``base.py``, ``config.py``,
``kinds.py``), so that ``AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)`` loads it without
this repository: it imports only torch, transformers (>= 4.40, 5.x) and those files. Weight names are Hugging Face
``BertForMaskedLM``'s (``bert.embeddings.*``, ``bert.encoder.layer.N.*``, ``cls.predictions.*``; an encoder without
a head: ``embeddings.*``, ``encoder.*``); the masked-LM decoder reuses the word-embedding matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

# transformers 4.x copies only the files this one imports itself: every file the model needs is imported here
from .base import SwappableModel  # noqa: F401
from .bert import BertForMaskedLM
from .config import ModelConfig
from .kinds import KINDS  # noqa: F401

try:  # transformers 5 renamed the base class; the old name is an alias there
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig


class CompactBertConfig(_BaseConfig):
    """``student`` and ``layer_plan``: our whole config (``models.bert.BertConfig.to_dict()``, its per-layer plan
    apart); the usual BERT fields are mirrored at the top for tools that read them."""

    model_type = "compact_bert"

    def __init__(self, student: dict | None = None, layer_plan: list | None = None, **kwargs):
        self.student = dict(student or {})
        self.layer_plan = [dict(p) for p in layer_plan or []]
        for key in ("vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings", "type_vocab_size"):
            if key in self.student:
                kwargs.setdefault(key, self.student[key])
        kwargs.setdefault("num_hidden_layers", len(self.layer_plan))
        kwargs.setdefault("tie_word_embeddings", False)  # the decoder reads the embedding matrix directly
        kwargs.setdefault("pad_token_id", self.student.get("pad_token_id", 0))
        super().__init__(**kwargs)


class _CompactBertBase(PreTrainedModel):
    config_class = CompactBertConfig
    base_model_prefix = "bert"

    def _student(self, config: CompactBertConfig) -> BertForMaskedLM:
        ours = BertForMaskedLM(ModelConfig.from_dict({**config.student, "layers": config.layer_plan}))
        object.__setattr__(self, "_ours", ours)  # shares its modules with this wrapper; not a second copy
        return ours

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # every weight comes from the checkpoint; ours are initialised when built

    def get_input_embeddings(self):
        return self._ours.bert.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self._ours.bert.embeddings.word_embeddings = value


class CompactBertModel(_CompactBertBase):
    """The encoder alone (embeddings and layers, no pooler), returning the last hidden state."""

    def __init__(self, config: CompactBertConfig):
        super().__init__(config)
        ours = self._student(config)
        self.embeddings, self.encoder = ours.bert.embeddings, ours.bert.encoder
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, *, output_hidden_states=None,
                return_dict=None, **kwargs):
        if input_ids is None:
            raise ValueError("CompactBertModel needs input_ids")
        out = self._ours(input_ids, attention_mask, token_type_ids, output_hidden_states=bool(output_hidden_states),
                         with_logits=False)
        res = BaseModelOutput(last_hidden_state=out.last_hidden_state,
                              hidden_states=tuple(out.hidden_states) if out.hidden_states is not None else None)
        return res if return_dict is not False else res.to_tuple()


class CompactBertForMaskedLM(_CompactBertBase):
    """Encoder + masked-LM head whose decoder is the word-embedding matrix."""

    def __init__(self, config: CompactBertConfig):
        super().__init__(config)
        ours = self._student(config)
        self.bert, self.cls = ours.bert, ours.cls
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, *, labels=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        out = self._ours(input_ids, attention_mask, token_type_ids, output_hidden_states=bool(output_hidden_states))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits.view(-1, out.logits.shape[-1]), labels.view(-1), ignore_index=-100)
        res = MaskedLMOutput(loss=loss, logits=out.logits,
                             hidden_states=tuple(out.hidden_states) if out.hidden_states is not None else None)
        return res if return_dict is not False else res.to_tuple()
