"""Writing a result all at once: into a temporary place of a unique name, renamed into place only when complete.

Every exporter writes through here (Hugging Face folders, CompactBERT folders, ONNX graphs), so what a kill -9, a
full disk or an error leaves behind is a ``<name>.tmp.<host>.<pid>.<random>`` entry that nothing mistakes for a
result, never a half-written result under the requested name. The next writer of the same name removes what writers
that are gone left (a dead pid on this host, or a day old from another host); a live writer's entries are kept.

A full disk is recognised here once for every writer (``disk_full``): whatever a library raised while writing a
staged result comes out as ``OSError(ENOSPC)`` naming the result, which the scripts print as one line.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator


log = logging.getLogger(__name__)
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how the libraries that write for us say it in their own exception classes: safetensors and tokenizers (Rust's
# "No space left on device (os error 28)", "StorageFull"), torch, onnx and protobuf (the C library's words)
FULL_DISK_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122", "storagefull")


def causes(e: BaseException | None) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from or while handling, newest first."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def disk_full(e: BaseException | None) -> bool:
    """Whether ``e``, or an exception it was raised from or while handling, says that the disk (or the quota) is
    full: errno ENOSPC / EDQUOT, or those words in a library's own exception."""
    return any(getattr(c, "errno", None) in FULL_DISK_ERRNOS or any(w in str(c).lower() for w in FULL_DISK_WORDS)
               for c in causes(e))


@contextlib.contextmanager
def full_disk_named(final: str | os.PathLike) -> Iterator[None]:
    """A full disk while the block writes ``final`` leaves it as ``OSError(ENOSPC)`` naming ``final`` (chained to
    what the library raised), unless it already names a result (not a temporary); any other error leaves unchanged."""
    try:
        yield
    except Exception as e:
        named = isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS and ".tmp." not in str(e.filename or ".tmp.")
        if disk_full(e) and not named:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final)) from e
        raise


def unique_tag() -> str:
    """A name part no other writer (process, thread or machine) picks: host, pid and a random part."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def writer_gone(tag: str, path: Path, max_age: float = 86400.0) -> bool:
    """Whether the writer named by a ``host.pid.random`` tag is gone: a dead pid on this host, or a day-old entry."""
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_dead_stages(final: Path) -> None:
    """Remove the temporaries of writers of ``final`` that are gone. A replaced result that such a writer had moved
    aside (``<name>.old.<tag>``) goes back into place when nothing took its place, else it is removed."""
    for left in final.parent.glob(f"{final.name}.tmp.*"):
        if writer_gone(left.name.split(".tmp.", 1)[1], left):
            _remove(left)
    for old in final.parent.glob(f"{final.name}.old.*"):
        if writer_gone(old.name.split(".old.", 1)[1], old):
            if not final.exists():
                os.replace(old, final)
            else:
                _remove(old)


def _install(tmp: Path, final: Path, tag: str) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed once the new one is in."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f"{final.name}.old.{tag}")
    os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside ``final`` to write into; when the ``with`` block completes it becomes
    ``final`` (an existing ``final`` is replaced as a whole), on any error or kill it never does."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_stages(final)
    tag = unique_tag()
    tmp = final.with_name(f"{final.name}.tmp.{tag}")
    try:
        with full_disk_named(final):
            tmp.mkdir()
            yield tmp
            _install(tmp, final, tag)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def staged_files(finals: list[Path]) -> Iterator[dict[Path, Path]]:
    """Temporary paths for ``finals`` (files of one folder), in one temporary folder beside them; when the ``with``
    block completes, every file written there (with any side files a writer adds, such as ONNX external data) is
    renamed into the final folder, the ``finals`` last and in their order; on any error or kill none is."""
    finals = [Path(f) for f in finals]
    parent = finals[0].parent
    if any(f.parent != parent for f in finals):
        raise ValueError(f"staged files must share one folder, got {[str(f) for f in finals]}")
    parent.mkdir(parents=True, exist_ok=True)
    for f in finals:
        remove_dead_stages(f)
    tag = unique_tag()
    tmp = finals[0].with_name(f"{finals[0].name}.tmp.{tag}")
    try:
        with full_disk_named(finals[0]):
            tmp.mkdir()
            yield {f: tmp / f.name for f in finals}
            names = [f.name for f in finals]
            for p in sorted(tmp.iterdir(), key=lambda p: names.index(p.name) if p.name in names else -1):
                _install(p, parent / p.name, tag)
    finally:
        _remove(tmp)


def write_staged(texts: dict[Path, str]) -> None:
    """Text files of one folder (``{path: text}``), written staged (``staged_files``, synced to disk) and renamed into
    place together when all are written, in their order: a reader of a results file (a map, results.json, a chunk)
    finds the old one or the new one whole, never half of one, whatever stops the writer."""
    finals = [Path(f) for f in texts]
    with staged_files(finals) as paths:
        for final, text in zip(finals, texts.values()):
            with open(paths[final], "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())


def write_kept(path: Path, key: Any, body: dict[str, Any], *, indent: int = 1) -> None:
    """Work kept for reuse: ``body`` under ``key`` (what the work depended on) in the JSON file ``path``, staged."""
    write_staged({Path(path): json.dumps({"key": key, **body}, indent=indent)})


def read_kept(path: Path, key: Any) -> dict[str, Any] | None:
    """What ``write_kept`` kept in ``path`` for exactly ``key`` (compared as JSON); None when there is no file, it
    was kept for another key, or it cannot be read (said in a warning: the work is done again)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("'%s' cannot be read: what it kept is made again", path)
        return None
    if not isinstance(kept, dict) or kept.get("key") != json.loads(json.dumps(key)):
        return None
    return kept
