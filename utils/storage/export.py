"""Exports of a finished model for use outside this repository: targets checked before any work, files written at
the end."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from models import SwappableModel
from models.export import ExportError, check_writable_target, export_pretrained
from models.gguf_export import check_gguf, check_gguf_available, check_gguf_teacher, export_gguf
from models.nemotron_nas import HF_LAYOUTS, block_configs, check_nemotron_nas_model, export_nemotron_nas
from models.onnx_export import check_onnx_available, check_onnx_targets, export_onnx

log = logging.getLogger("simplifying_transformers")


@dataclass
class ExportConfig:
    """Where a finished model is also written; None: not written."""

    hf_dir: str | None = None  # a Hugging Face folder: plain BertForMaskedLM, or CompactBERT (trust_remote_code=True)
    hf_layout: str = "auto"  # the folder's layout: auto (plain class or ours), or nemotron-nas (DeciLM, decoders)
    onnx_file: str | None = None  # ONNX LM graph; the encoder (hidden states) goes to <stem>_encoder<suffix>
    gguf_file: str | None = None  # a GGUF file for llama.cpp (decoders): plain llama / qwen2, or deci per layer
    gguf_type: str = "f16"  # how the GGUF stores its matrices: f32, f16 or q8_0

    @property
    def wanted(self) -> bool:
        """Whether any export is asked for."""
        return bool(self.hf_dir or self.onnx_file or self.gguf_file)


def check_export_targets(cfg: ExportConfig) -> None:
    """Fail before any work when an export could not be written (ExportError, a ValueError)."""
    if cfg.hf_dir:
        check_writable_target(cfg.hf_dir, "`hf_dir` folder", is_dir=True)
    if cfg.hf_layout not in HF_LAYOUTS:
        raise ExportError(f"`hf_layout` must be one of {', '.join(HF_LAYOUTS)}, got '{cfg.hf_layout}'")
    if cfg.onnx_file:
        check_onnx_available()
        check_onnx_targets(cfg.onnx_file)  # both files it writes: new, or ONNX models a previous export wrote
    if cfg.gguf_file:
        check_writable_target(cfg.gguf_file, "`gguf_file` file", is_dir=False)
        check_gguf_available(cfg.gguf_type)


def check_export_teacher(cfg: ExportConfig, teacher, tokenizer) -> None:
    """What the loaded teacher alone decides about the exports (a GGUF needs a Llama-family decoder and a tokenizer
    llama.cpp takes), checked before any training; the student's own units are checked by ``run_exports``."""
    if cfg.gguf_file:
        check_gguf_teacher(teacher, tokenizer)
    if cfg.hf_dir and cfg.hf_layout == "nemotron-nas":
        check_nemotron_nas_model(teacher.config)


def run_exports(model: SwappableModel, tokenizer, cfg: ExportConfig) -> list[str]:
    """Write the requested exports; returns one line per file written. What keeps the model from a target (a unit
    llama.cpp cannot run, ...) is refused before any of them is written."""
    if cfg.gguf_file:
        check_gguf(model, tokenizer)
    nemotron_nas = cfg.hf_dir and cfg.hf_layout == "nemotron-nas"
    if nemotron_nas:
        block_configs(model.config)
    lines = []
    if cfg.hf_dir:
        write = export_nemotron_nas if nemotron_nas else export_pretrained
        out, kind = write(model, cfg.hf_dir, tokenizer)
        lines.append(f"Hugging Face {kind} written to {out}")
    if cfg.onnx_file:
        for what, (file, diff) in export_onnx(model, cfg.onnx_file).items():
            lines.append(f"ONNX {what} graph written to {file} (ONNX Runtime vs PyTorch: max abs diff {diff:.1e})")
    if cfg.gguf_file:
        out, what = export_gguf(model, cfg.gguf_file, tokenizer, gguf_type=cfg.gguf_type)
        lines.append(f"GGUF ({what}) written to {out}")
    for line in lines:
        log.info("%s", line)
    return lines
