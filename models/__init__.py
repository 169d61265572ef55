"""Our BERT: model, config, Hugging Face loading/export, and compression initialisers."""
from .bert import BertAttention, BertForMaskedLM, BertLayer, NoMLMHeadError, extended_mask
from .config import LayerSpec, ModelConfig
from .hf import TeacherError, export_hf, hf_export_problem, load_teacher, weights_hash

__all__ = [
    "BertAttention", "BertForMaskedLM", "BertLayer", "LayerSpec", "ModelConfig", "NoMLMHeadError", "TeacherError",
    "export_hf", "extended_mask", "hf_export_problem", "load_teacher", "weights_hash",
]
