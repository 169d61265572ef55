"""Exports of a finished model for use outside this repository: targets checked before any work, files written at
the end."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from models import BertForMaskedLM
from models.export import check_writable_target, export_pretrained
from models.onnx_export import check_onnx_available, check_onnx_targets, export_onnx

log = logging.getLogger("simplifying_transformers")


@dataclass
class ExportConfig:
    """Where a finished model is also written; None: not written."""

    hf_dir: str | None = None  # a Hugging Face folder: plain BertForMaskedLM, or CompactBERT (trust_remote_code=True)
    onnx_file: str | None = None  # ONNX LM graph; the encoder (hidden states) goes to <stem>_encoder<suffix>


def check_export_targets(cfg: ExportConfig) -> None:
    """Fail before any work when an export could not be written (ExportError, a ValueError)."""
    if cfg.hf_dir:
        check_writable_target(cfg.hf_dir, "`hf_dir` folder", is_dir=True)
    if cfg.onnx_file:
        check_onnx_available()
        check_onnx_targets(cfg.onnx_file)  # both files it writes: new, or ONNX models a previous export wrote


def run_exports(model: BertForMaskedLM, tokenizer, cfg: ExportConfig) -> list[str]:
    """Write the requested exports; returns one line per file written."""
    lines = []
    if cfg.hf_dir:
        out, kind = export_pretrained(model, cfg.hf_dir, tokenizer)
        lines.append(f"Hugging Face {kind} written to {out}")
    if cfg.onnx_file:
        for what, (file, diff) in export_onnx(model, cfg.onnx_file).items():
            lines.append(f"ONNX {what} graph written to {file} (ONNX Runtime vs PyTorch: max abs diff {diff:.1e})")
    for line in lines:
        log.info("%s", line)
    return lines
