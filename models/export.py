"""Export any of our models as a Hugging Face folder that loads without this repository.

A model whose layers all share the teacher's attention shape (heads x head_dim == hidden, one shape for every layer)
is written as a plain ``BertForMaskedLM`` / ``BertModel`` (``models.hf.export_hf``). Anything else (fewer or smaller
heads, merged layers with their own shapes, pruned feed-forward sizes) is written as a CompactBERT folder:
config.json (``model_type`` ``bert``, the per-layer plan, ``auto_map``), ``modeling_compact_bert.py`` (a
self-contained copy of ``models/remote/modeling_compact_bert.py``), ``model.safetensors`` and the tokenizer, loaded
with ``trust_remote_code=True``. transformers 5 removed head pruning, so a plain BERT config cannot describe these.

Every export is written into a temporary folder beside its target and renamed into place when complete
(``models.staging``): a killed or failed export never leaves a half-written folder under the requested name.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

from .bert import BertForMaskedLM
from .hf import export_hf, hf_export_problem
from .staging import staged_folder

class ExportError(ValueError):
    """A model cannot be exported where or how it was asked; the message says what to change."""


REMOTE_FILE = Path(__file__).resolve().parent / "remote" / "modeling_compact_bert.py"
REMOTE_MODULE = REMOTE_FILE.stem


def remote_module() -> ModuleType:
    """The remote-code module, loaded from its file (as transformers will load the exported copy)."""
    spec = importlib.util.spec_from_file_location(REMOTE_MODULE, REMOTE_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def needs_remote_code(model: BertForMaskedLM) -> bool:
    """True when the model cannot be a plain HF BERT (see ``models.hf.hf_export_problem``)."""
    return hf_export_problem(model.config) is not None


def check_writable_target(path: str | os.PathLike, what: str, is_dir: bool) -> Path:
    """Fail before any work if ``path`` cannot be written: an existing entry of the wrong kind, or no write access."""
    p = Path(path).expanduser()
    if p.exists():
        if is_dir and not p.is_dir():
            raise ExportError(f"{what} '{p}' exists and is not a folder")
        if not is_dir and p.is_dir():
            raise ExportError(f"{what} '{p}' is a folder; expected a file name such as model.onnx")
        if not os.access(p if is_dir else p.parent, os.W_OK):
            raise ExportError(f"{what} '{p}' is not writable")
        if is_dir and any(p.iterdir()) and not (p / "config.json").is_file():
            raise ExportError(f"{what} '{p}' holds files but no model (no config.json): an export replaces its folder "
                              "as a whole, so give a new or empty folder, or a previous export")
        return p
    parent = p.parent
    while not parent.exists():  # the first existing ancestor must let us create the rest
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ExportError(f"{what} '{p}' cannot be created: '{parent}' is not a writable folder")
    return p


def plain_bert_takes_weights(cfg) -> bool:
    """Whether plain ``BertModel`` classes built from the export's config.json would accept every weight's shape:
    every layer plain multi-head attention with heads x head_dim == hidden and the config's feed-forward size. Only
    a model that splits its heads differently from the config (4 x 8 instead of 8 x 4, say) is so: loaded without
    its remote code, it would run with the wrong heads and no error."""
    return all(s.attention == "mha" and s.num_heads * s.head_dim == cfg.hidden_size
               and s.intermediate_size == cfg.intermediate_size for s in cfg.layers)


def compact_config_dict(model: BertForMaskedLM, tokenizer=None) -> dict:
    """config.json content of a CompactBERT export: BERT fields, the per-layer plan, and the auto classes.

    Its ``model_type`` is ``bert``: transformers reads the config (a ``BertConfig`` with a ``layer_plan``) and so the
    tokenizer (``AutoTokenizer``) without remote code, and only the model classes come from the folder's code
    (``trust_remote_code=True``; without it the plain BERT classes refuse the weights' shapes). Where the plain
    classes would take the weights silently (``plain_bert_takes_weights``), the config itself is remote code
    (``model_type`` ``compact_bert``), so that nothing loads the model without its code."""
    cfg = model.config
    # transformers 4.x pipelines load a tokenizer for an unknown model_type only when the config names its class
    extra = {"tokenizer_class": type(tokenizer).__name__.removesuffix("Fast")} if tokenizer is not None else {}
    arch = "CompactBertForMaskedLM" if cfg.has_mlm_head else "CompactBertModel"
    remote_config = plain_bert_takes_weights(cfg)
    auto_map = {"AutoConfig": f"{REMOTE_MODULE}.CompactBertConfig"} if remote_config else {}
    auto_map["AutoModel"] = f"{REMOTE_MODULE}.CompactBertModel"
    if cfg.has_mlm_head:
        auto_map["AutoModelForMaskedLM"] = f"{REMOTE_MODULE}.CompactBertForMaskedLM"
    return {
        "model_type": "compact_bert" if remote_config else "bert", "architectures": [arch], "auto_map": auto_map,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": len(cfg.layers),
        "layer_plan": [s.to_dict() for s in cfg.layers],
        "hidden_act": cfg.hidden_act, "hidden_dropout_prob": cfg.hidden_dropout_prob,
        "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id, "initializer_range": 0.02,
        "tie_word_embeddings": False, "torch_dtype": "float32", **extra,
    }


def export_compact(model: BertForMaskedLM, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a CompactBERT folder (remote code) for any model; the weights keep our (= HF BERT) names."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if not model.config.has_mlm_head:  # a bare encoder is saved as the base model, without the "bert." prefix
        sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    with staged_folder(out) as tmp:  # the folder appears under its name only when complete
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(compact_config_dict(model, tokenizer), indent=2) + "\n")
        shutil.copyfile(REMOTE_FILE, tmp / REMOTE_FILE.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def export_pretrained(model: BertForMaskedLM, out_dir: str | os.PathLike, tokenizer=None) -> tuple[Path, str]:
    """Export any model; returns (folder, what was written: 'BertForMaskedLM', 'CompactBertForMaskedLM', ...)."""
    check_writable_target(out_dir, "export folder", is_dir=True)
    model = model.cpu().eval()
    if not needs_remote_code(model):
        return export_hf(model, out_dir, tokenizer), ("BertForMaskedLM" if model.config.has_mlm_head else "BertModel")
    kind = "CompactBertForMaskedLM" if model.config.has_mlm_head else "CompactBertModel"
    return export_compact(model, out_dir, tokenizer), f"{kind} (load with trust_remote_code=True)"
