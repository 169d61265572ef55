"""Build a runnable BERT from the teacher plus retrained blocks and/or merged layers, found by their metadata.

    python -m utils.assemble --teacher bert-base-uncased --blocks checkpoints/blocks_h4_d64_mse --out checkpoints/assembled

Any folder given is searched recursively for ``best`` (or ``--which last``) checkpoints; a folder that is itself a
checkpoint is used as is. A ``model`` checkpoint among them becomes the base the others are applied to.
"""
from __future__ import annotations

if __name__ == "__main__":  # python -m utils.assemble: stop handlers before the imports below, as in the scripts
    from utils.stops import install_stop_handlers

    install_stop_handlers()

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from models import BertAttention, BertForMaskedLM, BertLayer, LayerSpec, ModelConfig, load_teacher, weights_hash
from models import build_model
from models.compress import clone_model, compose, make_block, make_layer
from .checkpoint import CheckpointError, check_meta, find_checkpoints, load_checkpoint, load_into, save_checkpoint
from .units import spec_from_meta

log = logging.getLogger(__name__)


def _check(meta: dict[str, Any], path: Path, cfg: ModelConfig, teacher_hash: str, force: bool) -> None:
    check_meta(meta, path, force_teacher=force, teacher_hash=teacher_hash, hidden_size=cfg.hidden_size)


def load_block(path: Path, cfg: ModelConfig, teacher_hash: str, force: bool = False) -> tuple[int, BertAttention]:
    sd, meta, _ = load_checkpoint(path)
    check_meta(meta, path, kind="block")
    _check(meta, path, cfg, teacher_hash, force)
    if not 0 <= meta["layer"] < len(cfg.layers):
        raise CheckpointError(f"checkpoint '{path}' is for layer {meta['layer']}, the teacher has {len(cfg.layers)}")
    attn = make_block(cfg, spec_from_meta(meta, cfg))
    load_into(attn, sd, path)
    return meta["layer"], attn


def load_merged_layer(path: Path, cfg: ModelConfig, teacher_hash: str, force: bool = False
                      ) -> tuple[int, BertLayer, LayerSpec]:
    sd, meta, _ = load_checkpoint(path)
    check_meta(meta, path, kind="merged_layer")
    _check(meta, path, cfg, teacher_hash, force)
    first, second = meta["layers"]
    if second != first + 1 or second >= len(cfg.layers):
        raise CheckpointError(f"checkpoint '{path}' merges layers {meta['layers']}, not a pair of this teacher")
    spec = spec_from_meta(meta, cfg)
    if spec.origin != [first, second]:
        raise CheckpointError(f"checkpoint '{path}': its spec stands for teacher layers {spec.origin}, its metadata "
                              f"says {meta['layers']}")
    layer = make_layer(cfg, spec)
    load_into(layer, sd, path)
    return first, layer, spec


def save_model(model: BertForMaskedLM, directory: str | Path, meta: dict[str, Any]) -> Path:
    return save_checkpoint(directory, model.state_dict(),
                           {"kind": "model", "config": model.config.to_dict(), **meta})


def check_fits(cfg: ModelConfig, teacher_cfg: ModelConfig, where: str | Path) -> None:
    """A model used with (compared to, or built on) a teacher shares its vocabulary and hidden size; --force accepts
    another teacher's weights, never another shape."""
    problems = [f"{key}: the model has {getattr(cfg, key)}, the teacher {getattr(teacher_cfg, key)}"
                for key in ("vocab_size", "hidden_size") if getattr(cfg, key) != getattr(teacher_cfg, key)]
    if problems:
        raise CheckpointError(f"model '{where}' does not fit this teacher: " + "; ".join(problems)
                              + " (it was built from a teacher of another shape or vocabulary)")


def load_model(directory: str | Path, teacher_hash: str | None = None, force: bool = False,
               teacher_config: ModelConfig | None = None) -> tuple[BertForMaskedLM, dict[str, Any]]:
    """A saved compressed model, rebuilt from its checkpoint alone (the per-layer plan is in the metadata).

    With ``teacher_config``, the model must also fit that teacher (vocabulary and hidden size, see check_fits).
    """
    sd, meta, _ = load_checkpoint(directory)
    check_meta(meta, directory, kind="model")
    if teacher_hash is not None:
        check_meta(meta, directory, force_teacher=force, teacher_hash=teacher_hash)
    if teacher_config is not None:
        check_fits(ModelConfig.from_dict(meta["config"]), teacher_config, directory)
    model = build_model(ModelConfig.from_dict(meta["config"]))
    load_into(model, sd, directory)
    return model.eval(), meta


def build_student(teacher: BertForMaskedLM, roots: Iterable[str | Path], teacher_hash: str, force: bool = False,
                  which: str = "best", keep: Callable[[dict[str, Any]], bool] | None = None
                  ) -> tuple[BertForMaskedLM, list[str]]:
    """Teacher + every block / merged layer / model checkpoint under ``roots`` (those ``keep`` accepts).

    Returns (an independent model, a description of each source).
    """
    found = find_checkpoints(list(roots), ("block", "merged_layer", "model"), which)
    if keep is not None:
        found = [(p, m) for p, m in found if keep(m)]
    if not found:
        raise CheckpointError(f"no '{which}' block, merged-layer or model checkpoint under {list(map(str, roots))}")
    cfg = teacher.config
    base, sources = teacher, []
    models = [(p, m) for p, m in found if m["kind"] == "model"]
    if len(models) > 1:
        raise CheckpointError(f"more than one model checkpoint to start from: {[str(p) for p, _ in models]}")
    if models:
        base, _ = load_model(models[0][0], teacher_hash, force, cfg)
        base = base.to(next(teacher.parameters()).device)
        sources.append(f"base model {models[0][0]}")
    blocks: dict[int, BertAttention] = {}
    merges: dict[int, tuple[BertLayer, LayerSpec]] = {}
    where: dict[int, Path] = {}
    for path, meta in found:
        if meta["kind"] == "model":
            continue
        if meta["kind"] == "block":
            i, attn = load_block(path, cfg, teacher_hash, force)
            covered, item = [i], ("block", attn)
        else:
            i, layer, spec = load_merged_layer(path, cfg, teacher_hash, force)
            covered, item = [i, i + 1], ("merge", (layer, spec))
        for c in covered:
            if c in where:
                raise CheckpointError(f"teacher layer {c} is replaced twice: by '{where[c]}' and '{path}'; "
                                      "pass only one of them")
            where[c] = path
        (blocks if item[0] == "block" else merges)[i] = item[1]
        sources.append(f"{meta['kind']} {covered} h={meta['num_heads']} d={meta['head_dim']}"
                       f"{spec_from_meta(meta, cfg).attention_note()} from {path}")
    device = next(teacher.parameters()).device
    for m in list(blocks.values()) + [l for l, _ in merges.values()]:
        m.to(device)
    model = clone_model(compose(base, blocks, merges)).eval()
    return model, sources


def main(argv: list[str] | None = None) -> int:
    from .cli import Parser
    from .export import add_export_args, check_export_targets, run_exports
    from .runtime import select_device, setup_logging
    from .session import check_output_dir, run_main

    p = Parser(description="Assemble a BERT from the teacher plus retrained blocks / merged layers.")
    p.add_argument("--teacher", default="bert-base-uncased")
    p.add_argument("--blocks", nargs="+", required=True, help="checkpoint folders (searched recursively)")
    p.add_argument("--out", default="checkpoints/assembled")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--force", action="store_true", help="accept checkpoints made against a different teacher")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    add_export_args(p)

    def run(args) -> Path:
        setup_logging()
        check_output_dir(args.out)
        check_export_targets(args)
        report = assemble(args.teacher, args.blocks, args.out, args.which, args.force, select_device(args.device))
        exported = run_exports(report["model"].cpu(), report["tokenizer"], args)
        print(report["plan"])
        print(f"parameters: teacher {report['teacher_params']:,} -> assembled {report['student_params']:,} "
              f"({report['student_params'] / report['teacher_params']:.1%})")
        for line in exported:
            print(line)
        return Path(report["out"])

    return run_main(run, p, argv)  # errors: one line (exit 1), or a traceback asking for a bug report


def assemble(teacher_name: str, roots: list[str], out: str | Path, which: str = "best", force: bool = False,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Library entry point used by the command and the notebook; returns a summary and saves the model."""
    teacher, tok = load_teacher(teacher_name, device)
    th = weights_hash(teacher)
    model, sources = build_student(teacher, roots, th, force, which)
    save_model(model, out, {"teacher": str(teacher_name), "teacher_hash": th, "sources": sources})
    tok.save_pretrained(str(Path(out) / "tokenizer"))
    return {"model": model, "teacher": teacher, "tokenizer": tok, "sources": sources, "plan": model.config.describe(),
            "teacher_params": teacher.num_parameters(), "student_params": model.num_parameters(), "out": str(out)}


if __name__ == "__main__":
    sys.exit(main())
