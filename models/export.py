"""Export any of our models as a Hugging Face folder that loads without this repository.

A model whose layers all keep the teacher's shape is written as its family's plain transformers class
(``BertForMaskedLM`` / ``BertModel``, ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...; ``models.hf.export_hf``).
Anything else (fewer or smaller heads, fewer key/value heads, merged, narrowed, linear or removed attention, dropped
layers) is written as a remote-code folder: config.json (the per-layer plan ``layer_plan``, our whole config
``student``, and ``auto_map``), ``model.safetensors``, the tokenizer, the family's wrapper
(``modeling_compact_<family>.py``) and the model files it imports, copied from ``models/`` as they are: the exported
code is this repository's code, not a second copy. Load it with ``trust_remote_code=True``. transformers 5 removed
head pruning, so a plain config cannot describe these.

Every export is written into a temporary folder beside its target and renamed into place when complete
(``models.staging``): a killed or failed export never leaves a half-written folder under the requested name.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from pathlib import Path
from types import ModuleType

import torch

from .base import SwappableModel
from .families import family_of
from .hf import export_hf, generation_ids, hf_export_problem, teacher_generation, write_generation
from .staging import staged_folder


class ExportError(ValueError):
    """A model cannot be exported where or how it was asked; the message says what to change."""


MODELS_DIR = Path(__file__).resolve().parent
_RELATIVE = re.compile(r"^\s*from \.(\w+) import", re.MULTILINE)


def remote_files(wrapper: str) -> list[Path]:
    """The wrapper ``models/<wrapper>.py`` and every file of ``models/`` it imports, directly or not."""
    todo, seen = [wrapper], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        todo += _RELATIVE.findall((MODELS_DIR / f"{name}.py").read_text())
    return [MODELS_DIR / f"{n}.py" for n in seen]


def remote_module(model: SwappableModel) -> ModuleType:
    """The family's remote-code wrapper, imported as exported folders import it."""
    return importlib.import_module(f"models.{family_of(model).remote_module}")


def needs_remote_code(model: SwappableModel) -> bool:
    """True when the model cannot be its family's plain transformers class (see ``models.hf.hf_export_problem``)."""
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


def _remote_classes(model: SwappableModel) -> tuple[str, dict[str, str]]:
    """(architecture, auto_map of the model classes) of a remote-code export of ``model``."""
    wrapper = family_of(model).remote_module
    if model.TASK == "causal":
        arch = "CompactLlamaForCausalLM"
        return arch, {"AutoModelForCausalLM": f"{wrapper}.{arch}"}
    arch = "CompactBertForMaskedLM" if model.has_lm_head else "CompactBertModel"
    auto_map = {"AutoModel": f"{wrapper}.CompactBertModel"}
    if model.has_lm_head:
        auto_map["AutoModelForMaskedLM"] = f"{wrapper}.{arch}"
    return arch, auto_map


def compact_config_dict(model: SwappableModel, tokenizer=None, generation: dict | None = None) -> dict:
    """config.json of a remote-code export: the per-layer plan (``layer_plan``), our whole config (``student``) and
    the auto classes of the folder's code.

    Where the family's plain classes would refuse the weights (``plain_config_fields`` gives fields), the config is
    a plain one of the family (BERT's ``model_type`` ``bert``): transformers reads it, and so the tokenizer
    (``AutoTokenizer``), without remote code, and only the model classes come from the folder's code. Where they
    could take the weights silently (a BERT whose heads are split differently; a decoder, whose missing weights
    transformers would only warn about), the config itself is remote code (``model_type`` ``compact_<family>``,
    ``AutoConfig`` in ``auto_map``), so that nothing loads the model without its code. A decoder's bos / eos / pad
    token ids are at the top, as the teacher had them (``generation``: ``models.hf.teacher_generation``)."""
    cfg, family = model.config, family_of(model)
    arch, auto_map = _remote_classes(model)
    plain = family.module.plain_config_fields(cfg)
    if plain is None:
        mod = remote_module(model)
        config_cls = next(c for c in vars(mod).values() if isinstance(c, type) and c.__name__.endswith("Config")
                          and c.__module__ == mod.__name__)
        plain = {"model_type": config_cls.model_type}
        auto_map = {"AutoConfig": f"{family.remote_module}.{config_cls.__name__}", **auto_map}
    # transformers 4.x pipelines load a tokenizer for an unknown model_type only when the config names its class
    extra = {"tokenizer_class": type(tokenizer).__name__.removesuffix("Fast")} if tokenizer is not None else {}
    student = cfg.to_dict()
    ids = generation_ids(cfg, generation) if generation is not None else {}
    return {**plain, "architectures": [arch], "auto_map": auto_map, "layer_plan": student.pop("layers"),
            "student": student, "torch_dtype": "float32", **ids, **extra}


def export_compact(model: SwappableModel, out_dir: str | os.PathLike, tokenizer=None, *,
                   generation: dict | None = None) -> Path:
    """Write a remote-code folder for any model: weights under our names, config, the model files, the tokenizer
    (with its chat template) and, for a decoder, the ``generation`` settings (``models.hf.teacher_generation``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    wrapper = remote_module(model)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if model.TASK == "mlm" and not model.has_lm_head:  # a bare encoder is saved as the base model (no "bert.")
        sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    with staged_folder(out) as tmp:  # the folder appears under its name only when complete
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = compact_config_dict(model, tokenizer, generation)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_generation(tmp, generation)
        for f in remote_files(wrapper.__name__.rsplit(".", 1)[-1]):
            shutil.copyfile(f, tmp / f.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def export_pretrained(model: SwappableModel, out_dir: str | os.PathLike, tokenizer=None) -> tuple[Path, str]:
    """Export any model; returns (folder, what was written: 'BertForMaskedLM', 'CompactLlamaForCausalLM ...', ...).
    A decoder's folder carries the teacher's generation settings and chat template (``teacher_generation``)."""
    check_writable_target(out_dir, "export folder", is_dir=True)
    model = model.cpu().eval()
    generation = teacher_generation(model, tokenizer)
    if not needs_remote_code(model):
        return (export_hf(model, out_dir, tokenizer, generation=generation),
                family_of(model).module.hf_class_name(model.config))
    arch, _ = _remote_classes(model)
    return (export_compact(model, out_dir, tokenizer, generation=generation),
            f"{arch} (load with trust_remote_code=True)")
