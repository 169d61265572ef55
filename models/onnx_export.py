"""ONNX export of our models (the LM graph and the hidden-state graph, dynamic batch and sequence axes), checked
with ONNX Runtime.

The graphs take what the family's tokenizer returns (BERT: ``input_ids``, ``token_type_ids``, ``attention_mask``;
decoders: ``input_ids``, ``attention_mask``; int64 [batch, sequence]; decoders without a KV cache, right padding) and
are traced with the classic TorchScript exporter (``dynamo=False``): no onnxscript needed.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .base import SwappableModel
from .export import ExportError, check_writable_target
from .staging import full_disk_named, staged_files

DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4


def input_names(model: SwappableModel) -> list[str]:
    """The graph's inputs: BERT's three tokenizer outputs, or a decoder's ids and mask."""
    return ["input_ids", "token_type_ids", "attention_mask"] if model.TASK == "mlm" else ["input_ids", "attention_mask"]


class OnnxGraph(nn.Module):
    """What is traced: the mask is always applied (ours skips an all-ones mask, a data-dependent branch)."""

    def __init__(self, model: SwappableModel, with_logits: bool):
        super().__init__()
        self.model, self.with_logits = model, with_logits

    def forward(self, input_ids: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        attention_mask = rest[-1]
        token_type_ids = rest[0] if len(rest) == 2 else None
        h = self.model.embed(input_ids, token_type_ids)
        h = self.model.run_layers(h, self.model.context(attention_mask, always_mask=True))
        return self.model.lm_logits(h) if self.with_logits else h


def encoder_path(path: str | os.PathLike) -> Path:
    """Where the encoder graph goes when ``path`` holds the masked-LM graph: ``<stem>_encoder.onnx``."""
    p = Path(path)
    return p.with_name(f"{p.stem}_encoder{p.suffix or '.onnx'}")


def example_inputs(model: SwappableModel, *, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids, padding at the end of all but the first row, in the graph's input order."""
    vocab_size = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        mask[b, seq - min(b, seq - 1):] = 0
    ids = ids.masked_fill(mask == 0, 0)
    every = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}
    return {k: every[k] for k in input_names(model)}


def export_graph(model: SwappableModel, path: str | os.PathLike, *, with_logits: bool,
                 opset: int = DEFAULT_OPSET) -> Path:
    """Trace one graph (output ``logits`` or ``last_hidden_state``) to ``path``."""
    if with_logits:
        model.require_lm_head("an ONNX language-model graph")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = OnnxGraph(model.cpu().eval(), with_logits).eval()
    x = example_inputs(model, batch=2, seq=8)
    name = "logits" if with_logits else "last_hidden_state"
    axes = {k: {0: "batch", 1: "sequence"} for k in [*x, name]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        torch.onnx.export(graph, tuple(x.values()), str(out),
                          input_names=list(x), output_names=[name], dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    return out


def onnx_max_abs_diff(model: SwappableModel, path: str | os.PathLike, *, with_logits: bool,
                      shapes: tuple[tuple[int, int], ...] = ((1, 5), (3, 11))) -> float:
    """Largest |ONNX Runtime - ours| over inputs of several (batch, sequence) shapes, at real (unpadded) tokens."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.cpu().eval()
    worst = 0.0
    for i, (b, t) in enumerate(shapes):
        x = example_inputs(model, batch=b, seq=t, seed=i + 1)
        (got,) = sess.run(None, {k: v.numpy() for k, v in x.items()})
        with torch.no_grad():
            ref = model(x["input_ids"], x["attention_mask"], x.get("token_type_ids"), with_logits=with_logits)
        ref = ref.logits if with_logits else ref.last_hidden_state
        real = x["attention_mask"].bool()
        worst = max(worst, float((torch.from_numpy(got) - ref)[real].abs().max()))
    return worst


def onnx_targets(path: str | os.PathLike) -> list[Path]:
    """The files an ONNX export to ``path`` may write: ``path`` and ``<stem>_encoder<suffix>`` beside it."""
    return [Path(path).expanduser(), encoder_path(Path(path).expanduser())]


def check_onnx_targets(path: str | os.PathLike, what: str = "`onnx_file` file") -> list[Path]:
    """Fail (ExportError) before any work when an ONNX export to ``path`` could not be written, or would replace
    what it did not write: each of its files (``onnx_targets``) must be new, or an ONNX model (a previous export).
    A file that is not one is the user's, and is never overwritten."""
    targets = onnx_targets(path)
    for file, role in zip(targets, (what, f"{what}'s encoder graph")):
        check_writable_target(file, role, is_dir=False)
        if file.exists() and not is_onnx_model(file):
            raise ExportError(f"{role} '{file}' exists and is not an ONNX model: an ONNX export to '{targets[0]}' "
                              f"writes '{targets[0].name}' and '{targets[1].name}', replacing them; give a new file "
                              "name, or that of a previous export")
    return targets


def is_onnx_model(file: Path) -> bool:
    """Whether ``file`` holds an ONNX model (a ModelProto with an IR version and a graph with outputs)."""
    import onnx

    try:
        model = onnx.load_model(str(file), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf and onnx raise several classes for bytes that are not a model
        return False
    return model.ir_version > 0 and len(model.graph.output) > 0


def export_onnx(model: SwappableModel, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                tolerance: float = PARITY_TOLERANCE) -> dict[str, tuple[Path, float]]:
    """LM graph (masked-LM or causal-LM logits) to ``path`` and hidden-state graph to ``<stem>_encoder<suffix>``
    (the hidden states only to ``path`` when the model has no LM head); each checked with ONNX Runtime. Returns
    {graph: (file, max abs diff)}. A file of those names that is not an ONNX model is refused (``check_onnx_targets``)
    before anything is traced."""
    check_onnx_targets(path, "ONNX file")
    graphs = {"encoder": (encoder_path(path) if model.has_lm_head else Path(path), False)}
    if model.has_lm_head:
        graphs["masked-LM" if model.TASK == "mlm" else "causal-LM"] = (Path(path), True)
    done = {}
    with staged_files([file for file, _ in graphs.values()]) as tmp:  # renamed into place once both are checked
        for what, (file, with_logits) in graphs.items():
            with full_disk_named(file):  # the graph that did not fit, by its name
                export_graph(model, tmp[file], with_logits=with_logits, opset=opset)
            diff = onnx_max_abs_diff(model, tmp[file], with_logits=with_logits)
            if not diff <= tolerance:
                raise ExportError(f"ONNX {what} graph '{file}' differs from the PyTorch model by {diff:.2e} "
                                  f"(tolerance {tolerance:.0e})")
            done[what] = (file, diff)
    return done


def check_onnx_available() -> None:
    """Fail early (before training) when the packages the export and its check need are missing."""
    try:
        import onnx  # noqa: F401 - reads an existing target (``is_onnx_model``)
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportError("an ONNX export (`onnx_file`) needs onnxruntime (and onnx): pip install onnx onnxruntime"
                          ) from None
