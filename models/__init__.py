"""Our models: one module per family (``bert``, ``llama``), the per-layer plan (``config``), the attention kinds
(``kinds``), what every family shares (``base``), the family registry (``families``), Hugging Face loading/export
(``hf``, ``export``, ``onnx_export``) and the initialisers of smaller units from the teacher (``compress``)."""
from .base import ModelOutputs, NoLMHeadError, SwappableAttention, SwappableLayer, SwappableModel
from .bert import BertAttention, BertConfig, BertForMaskedLM, BertLayer, NoMLMHeadError, extended_mask
from .config import LayerSpec, ModelConfig
from .families import FAMILIES, build_model, family_of
from .hf import TeacherError, export_hf, hf_export_problem, load_teacher, weights_hash
from .llama import LlamaConfig, LlamaForCausalLM

__all__ = [
    "BertAttention", "BertConfig", "BertForMaskedLM", "BertLayer", "FAMILIES", "LayerSpec", "LlamaConfig",
    "LlamaForCausalLM", "ModelConfig", "ModelOutputs", "NoLMHeadError", "NoMLMHeadError", "SwappableAttention",
    "SwappableLayer", "SwappableModel", "TeacherError", "build_model", "export_hf", "extended_mask", "family_of",
    "hf_export_problem", "load_teacher", "weights_hash",
]
