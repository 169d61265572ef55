"""One checkpoint format: a folder with ``model.safetensors`` + ``meta.json`` (+ ``train_state.pt`` for resuming).

Writes are atomic: everything goes into a fresh temporary folder of a unique name that replaces ``<dir>`` by rename,
so a crash mid-save leaves the previous checkpoint loadable and concurrent readers never see a mix. ``meta.json`` carries the sha256 of the weights file: a truncated or
corrupted file is refused, never silently replaced by random weights. Training state (optimizer, scheduler) is read
with ``torch.load(weights_only=True)``, which executes no pickled code.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "meta.json"
STATE = "train_state.pt"
KINDS = ("block", "merged_layer", "model", "resume", "layer")  # layer: one whole layer of a new shape (ffn)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


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


def _unique_suffix() -> str:
    """A name no other writer (process, thread or machine) picks: host, pid and a random part."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def save_checkpoint(
    directory: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
    train_state: dict[str, Any] | None = None, keep_previous: bool = False,
) -> Path:
    """Atomically write weights (+ metadata, + optional training state) to ``directory``.

    Everything is written to a temporary folder of a unique name, then swapped in by two renames (the old folder
    moves aside under a unique ``.prev.*`` name, the new one takes its place). A reader sees the old checkpoint or the
    new one, never a mix; a crash between the renames leaves the ``.prev.*`` folder, which loading falls back to.
    ``keep_previous`` keeps the replaced checkpoint as ``<dir>.old`` (resume points of several units use it to find a
    position they all reached).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save

    if meta.get("kind") not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {meta.get('kind')!r}")
    final = Path(directory)
    tag = _unique_suffix()
    tmp = final.with_name(f"{final.name}.tmp.{tag}")
    prev = final.with_name(f"{final.name}.prev.{tag}")
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.mkdir()
        weights = save({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()})
        _write_file(tmp / WEIGHTS, weights)
        extra = {}
        if train_state is not None:
            buf = io.BytesIO()
            torch.save(train_state, buf)
            _write_file(tmp / STATE, buf.getvalue())
            extra["train_state_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        full_meta = {"format_version": FORMAT_VERSION, **meta, "weights_sha256": hashlib.sha256(weights).hexdigest(),
                     **extra, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_file(tmp / META, json.dumps(full_meta, indent=2, sort_keys=True, default=str).encode())
        _fsync_dir(tmp)
        if final.exists():
            os.replace(final, prev)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if prev.exists():
            if keep_previous:
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(prev, old)
            else:
                shutil.rmtree(prev, ignore_errors=True)
        for stale in final.parent.glob(f"{final.name}.prev.*"):  # left by an earlier crash mid-swap
            shutil.rmtree(stale, ignore_errors=True)
        for left in final.parent.glob(f"{final.name}.tmp.*"):  # left by a writer that died mid-write
            if _writer_gone(left.name.split(".tmp.", 1)[1], left):
                shutil.rmtree(left, ignore_errors=True)
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


def _writer_gone(tag: str, path: Path, max_age: float = 86400.0) -> bool:
    """Whether the writer named by a ``host.pid.random`` tag is gone: a dead pid on this host, or a day-old file."""
    host, _, rest = tag.rpartition(".")[0].rpartition(".")
    try:
        if host == socket.gethostname():
            os.kill(int(rest), 0)
            return False
        return time.time() - path.stat().st_mtime > max_age
    except ProcessLookupError:
        return True
    except (ValueError, OSError):
        return False


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def resolve_dir(directory: str | os.PathLike) -> Path:
    """The folder that holds the checkpoint ``directory`` names: itself, or, where a save was cut short between its
    two renames, the newest ``<dir>.prev.*`` beside it. Direct loading and discovery both go through here."""
    directory = Path(directory)
    if (directory / META).is_file():
        return directory
    prevs = sorted(directory.parent.glob(f"{directory.name}.prev*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for prev in prevs:
        if (prev / META).is_file():
            log.warning("checkpoint '%s' was being replaced when a save was interrupted; using '%s'", directory, prev)
            return prev
    if directory.is_file():
        raise CheckpointError(f"'{directory}' is a file; a checkpoint is a folder with {WEIGHTS} and {META}")
    raise CheckpointError(f"no checkpoint at '{directory}': {META} not found")


def _parse_meta(raw: bytes, where: Path) -> dict[str, Any]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{where}' is not valid JSON ({e}); the checkpoint is corrupted") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise CheckpointError(f"'{where}' has no 'kind': not a checkpoint of this toolkit")
    return meta


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    d = resolve_dir(directory)
    try:
        raw = (d / META).read_bytes()
    except FileNotFoundError:  # replaced between resolving and reading: resolve again
        d = resolve_dir(directory)
        raw = (d / META).read_bytes()
    return _parse_meta(raw, d / META)


# a reader racing a writer may see the old metadata with the new weights (or a folder that just moved): it retries
# this often before calling the checkpoint damaged
READ_RETRIES = 5


def load_checkpoint(directory: str | os.PathLike, with_train_state: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Returns (state dict, metadata, training state or None).

    The bytes that are checked against the metadata's sha256 are the very bytes deserialised, so a concurrent save
    can never hand out weights that differ from their metadata.
    """
    for attempt in range(READ_RETRIES):
        try:
            return _load_once(Path(directory), with_train_state)
        except CheckpointError:
            if attempt == READ_RETRIES - 1:
                raise
            time.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")


def _load_once(directory: Path, with_train_state: bool
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    d = resolve_dir(directory)
    try:
        meta_raw = (d / META).read_bytes()
        wf = d / WEIGHTS
        weights = wf.read_bytes()
        state_raw = (d / STATE).read_bytes() if with_train_state and (d / STATE).is_file() else None
    except FileNotFoundError as e:
        raise CheckpointError(f"'{e.filename}' is missing") from None
    meta = _parse_meta(meta_raw, d / META)
    expected = meta.get("weights_sha256")
    if expected and hashlib.sha256(weights).hexdigest() != expected:
        raise CheckpointError(f"'{wf}' is corrupted or truncated: its sha256 does not match the one in {META}")
    try:
        sd = load(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"'{wf}' cannot be read as safetensors: {e}") from None
    state = None
    if with_train_state:
        sf = d / STATE
        if state_raw is None:
            raise CheckpointError(f"'{sf}' is missing: this checkpoint cannot be resumed from")
        want = meta.get("train_state_sha256")
        if want and hashlib.sha256(state_raw).hexdigest() != want:
            raise CheckpointError(f"'{sf}' does not belong to this checkpoint (or is damaged): its sha256 does not "
                                  f"match the one in {META}")
        try:
            state = torch.load(io.BytesIO(state_raw), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors come in many classes
            raise CheckpointError(f"'{sf}' cannot be read ({type(e).__name__})") from None
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

    A root that is itself a checkpoint is taken as is. Below a root, only folders named ``which`` (best|last) count;
    a ``which`` folder caught mid-swap (only its ``.prev.*`` left) is found and read exactly as direct loading would.
    """
    kinds = set(kinds)
    found: list[tuple[Path, dict[str, Any]]] = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise CheckpointError(f"checkpoint folder '{root}' does not exist")
        if (root / META).is_file():
            logical = [root]
        else:
            names = {m.parent.parent / which for m in root.rglob(META)
                     if m.parent.name == which or m.parent.name.startswith(which + ".prev")}
            logical = sorted(names)
        for d in logical:
            meta = read_meta(d)
            if meta["kind"] in kinds:
                found.append((d, meta))
    return found


def probe_writable(directory: str | os.PathLike) -> Path:
    """Fail before any training if ``directory`` cannot be created or written."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write_probe.{_unique_suffix()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"output folder '{d}' is not writable: {e.strerror or e}") from None
    return d
