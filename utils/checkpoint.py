"""One checkpoint format: a folder with ``model.safetensors`` + ``meta.json`` (+ ``train_state.pt`` for resuming).

Writes are atomic: everything goes into a fresh ``<dir>.tmp`` folder that replaces ``<dir>`` by rename, so a crash
mid-save leaves the previous checkpoint loadable. ``meta.json`` carries the sha256 of the weights file: a truncated or
corrupted file is refused, never silently replaced by random weights. Training state (optimizer, scheduler) is read
with ``torch.load(weights_only=True)``, which executes no pickled code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "meta.json"
STATE = "train_state.pt"
KINDS = ("block", "merged_layer", "model", "resume")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Atomically write weights (+ metadata, + optional training state) to ``directory``."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if meta.get("kind") not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {meta.get('kind')!r}")
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    prev = final.with_name(final.name + ".prev")
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS))
        if train_state is not None:
            torch.save(train_state, tmp / STATE)
        full_meta = {"format_version": FORMAT_VERSION, **meta, "weights_sha256": _sha256(tmp / WEIGHTS),
                     "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / META).write_text(json.dumps(full_meta, indent=2, sort_keys=True, default=str))
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        # swap: final -> prev, tmp -> final, drop prev. A crash in between leaves prev, which load() falls back to.
        if final.exists():
            shutil.rmtree(prev, ignore_errors=True)
            os.replace(final, prev)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(prev, ignore_errors=True)
    except (OSError, SafetensorError, RuntimeError) as e:
        # safetensors reports its I/O errors (disk full...) as SafetensorError, torch.save as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists() and prev.exists():
            os.replace(prev, final)
        raise CheckpointError(
            f"could not write checkpoint '{final}': {getattr(e, 'strerror', None) or e}. The previous checkpoint "
            "there (if any) is intact."
        ) from e
    return final


def _existing(directory: Path) -> Path:
    if (directory / META).is_file():
        return directory
    prev = directory.with_name(directory.name + ".prev")
    if (prev / META).is_file():
        log.warning("checkpoint '%s' was being replaced when a save was interrupted; using '%s'", directory, prev)
        return prev
    if directory.is_file():
        raise CheckpointError(f"'{directory}' is a file; a checkpoint is a folder with {WEIGHTS} and {META}")
    raise CheckpointError(f"no checkpoint at '{directory}': {META} not found")


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    d = _existing(Path(directory))
    try:
        meta = json.loads((d / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{d / META}' is not valid JSON ({e}); the checkpoint is corrupted") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise CheckpointError(f"'{d / META}' has no 'kind': not a checkpoint of this toolkit")
    return meta


def load_checkpoint(directory: str | os.PathLike, with_train_state: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Returns (state dict, metadata, training state or None); verifies the weights' checksum."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = _existing(Path(directory))
    meta = read_meta(d)
    wf = d / WEIGHTS
    if not wf.is_file():
        raise CheckpointError(f"'{wf}' is missing")
    expected = meta.get("weights_sha256")
    if expected and _sha256(wf) != expected:
        raise CheckpointError(f"'{wf}' is corrupted or truncated: its sha256 does not match the one in {META}")
    try:
        sd = load_file(str(wf))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"'{wf}' cannot be read as safetensors: {e}") from None
    state = None
    if with_train_state:
        sf = d / STATE
        if not sf.is_file():
            raise CheckpointError(f"'{sf}' is missing: this checkpoint cannot be resumed from")
        try:
            state = torch.load(sf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors come in many classes
            raise CheckpointError(f"'{sf}' cannot be read ({type(e).__name__}: {e})") from None
    return sd, meta, state


def check_meta(meta: dict[str, Any], where: str | os.PathLike, force_teacher: bool = False, **expected: Any) -> None:
    """Raise CheckpointError naming every field of ``meta`` that differs from ``expected``.

    ``teacher_hash`` mismatches may be overridden with ``force_teacher`` (logged); shapes and kinds may not.
    """
    problems = []
    for key, want in expected.items():
        if want is None:
            continue
        got = meta.get(key)
        if got != want:
            if key == "teacher_hash" and force_teacher:
                log.warning("%s: trained against teacher %s, loading into teacher %s (--force)", where, got, want)
                continue
            problems.append(f"{key}: checkpoint has {got!r}, expected {want!r}")
    if problems:
        hint = " (pass --force to accept a different teacher)" if any(p.startswith("teacher_hash") for p in problems) else ""
        raise CheckpointError(f"checkpoint '{where}' does not fit: " + "; ".join(problems) + hint)


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Strict load that reports shape and key mismatches by name."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint '{where}' does not match the model: "
            + "; ".join(filter(None, [f"missing {missing[:5]}" if missing else "",
                                      f"unexpected {unexpected[:5]}" if unexpected else "",
                                      "shape mismatch " + ", ".join(shapes[:5]) if shapes else ""]))
        )
    module.load_state_dict(sd)


def find_checkpoints(roots: Iterable[str | os.PathLike], kinds: Iterable[str], which: str = "best"
                     ) -> list[tuple[Path, dict[str, Any]]]:
    """Checkpoints of the given kinds under ``roots`` (searched recursively), found by metadata, not names.

    A root that is itself a checkpoint is taken as is. Below a root, only folders named ``which`` (best|last) count.
    """
    kinds = set(kinds)
    found: list[tuple[Path, dict[str, Any]]] = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise CheckpointError(f"checkpoint folder '{root}' does not exist")
        if (root / META).is_file():
            candidates = [root / META]
        else:
            candidates = sorted(p for p in root.rglob(META) if p.parent.name == which)
        for m in candidates:
            meta = read_meta(m.parent)
            if meta["kind"] in kinds:
                found.append((m.parent, meta))
    return found


def probe_writable(directory: str | os.PathLike) -> Path:
    """Fail before any training if ``directory`` cannot be created or written."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write_probe_{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"output folder '{d}' is not writable: {e.strerror or e}") from None
    return d
