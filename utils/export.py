"""The --export-hf / --export-onnx flags of the scripts: targets checked at start, exports written at the end."""
from __future__ import annotations

import argparse
import logging

from models import BertForMaskedLM
from models.export import check_writable_target, export_pretrained
from models.onnx_export import check_onnx_available, export_onnx

log = logging.getLogger("simplifying_transformers")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export-hf", default=None, metavar="DIR",
                   help="also write the model as a Hugging Face folder: plain BertForMaskedLM when every layer keeps "
                        "the teacher's attention shape, else CompactBERT (load with trust_remote_code=True)")
    p.add_argument("--export-onnx", default=None, metavar="FILE",
                   help="also write ONNX graphs: masked-LM to FILE, encoder to <FILE stem>_encoder.onnx, each "
                        "checked against the PyTorch model with ONNX Runtime")


def check_export_targets(args: argparse.Namespace) -> None:
    """Fail before any work when an export could not be written (ExportError, a ValueError)."""
    if getattr(args, "export_hf", None):
        check_writable_target(args.export_hf, "--export-hf folder", is_dir=True)
    if getattr(args, "export_onnx", None):
        check_writable_target(args.export_onnx, "--export-onnx file", is_dir=False)
        check_onnx_available()


def run_exports(model: BertForMaskedLM, tokenizer, args: argparse.Namespace) -> list[str]:
    """Write the requested exports; returns one line per file written."""
    lines = []
    if getattr(args, "export_hf", None):
        out, kind = export_pretrained(model, args.export_hf, tokenizer)
        lines.append(f"Hugging Face {kind} written to {out}")
    if getattr(args, "export_onnx", None):
        for what, (file, diff) in export_onnx(model, args.export_onnx).items():
            lines.append(f"ONNX {what} graph written to {file} (ONNX Runtime vs PyTorch: max abs diff {diff:.1e})")
    for line in lines:
        log.info("%s", line)
    return lines
