"""The model families: which of our models a Hugging Face checkpoint loads into, chosen by its ``model_type``.

A family is one module of ``models/`` (its config, its model built from ``LayerSpec``s, its Hugging Face conversion
both ways, its task) plus one entry in ``FAMILIES`` below. Nothing else in the toolkit tests a model type: code that
needs to know asks the family (``family_of``) or the model (``model.TASK``, ``model.has_lm_head``, ...).

Adding a family: write ``models/<name>.py`` with a ``ModelConfig`` subclass (``family = "<name>"``, ``from_hf``), a
``SwappableModel`` subclass (``make_block``, ``make_layer``, ``embed``, ``context``, ``lm_logits``), the
attention kinds it implements (``kinds.implements``), ``from_hf_state_dict`` / ``to_hf_state_dict``,
``plain_export_problem`` / ``to_hf_config`` / ``hf_class_name``, and a remote-code wrapper
``modeling_compact_<name>.py``, optionally ``config_json_problem`` (its own config.json fields, checked before
transformers reads the file: ``models.hf.read_hf_config``); then
add its ``Family`` here.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from . import bert, llama
from .base import SwappableModel
from .config import ModelConfig


@dataclass(frozen=True)
class Family:
    name: str
    module: ModuleType  # the family's model file (also what exports copy)
    model_types: tuple[str, ...]  # Hugging Face ``model_type`` values it reads
    config_class: type[ModelConfig]
    model_class: type[SwappableModel]
    remote_module: str  # the remote-code wrapper written next to exported students: models/<remote_module>.py

    @property
    def task(self) -> str:
        """``mlm`` (masked LM) or ``causal`` (next-token LM)."""
        return self.model_class.TASK

    def config_from_hf(self, hf_config: Any, has_lm_head: bool = True) -> ModelConfig:
        return self.config_class.from_hf(hf_config, has_lm_head)

    def from_hf_state_dict(self, sd: dict, cfg: ModelConfig) -> tuple[dict, bool]:
        """(our state dict, whether it has an LM head) from a Hugging Face one."""
        return self.module.from_hf_state_dict(sd, cfg)

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """The attention kinds this family implements."""
        table = getattr(self.module, "SELF_ATTENTION", None) or getattr(self.module, "ATTENTION")
        return tuple(table)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("bert", bert, ("bert",), bert.BertConfig, bert.BertForMaskedLM, "modeling_compact_bert"),
    Family("llama", llama, llama.MODEL_TYPES + tuple(llama.REMOTE_CONFIGS), llama.LlamaConfig, llama.LlamaForCausalLM,
           "modeling_compact_llama"),
)}


def family_for_model_type(model_type: str | None) -> Family:
    """The family that reads checkpoints of this Hugging Face ``model_type``."""
    for f in FAMILIES.values():
        if model_type in f.model_types:
            return f
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"model_type '{model_type}' is not supported; supported: {', '.join(known)}")


def family_of(obj: ModelConfig | SwappableModel) -> Family:
    """The family of one of our configs or models."""
    cfg = obj.config if isinstance(obj, SwappableModel) else obj
    return FAMILIES[cfg.family]


def build_model(cfg: ModelConfig) -> SwappableModel:
    """An (untrained) model of ``cfg``'s family and per-layer plan."""
    return family_of(cfg).model_class(cfg)
