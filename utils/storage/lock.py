"""Locks for shared output folders: one job per trained unit, one builder per teacher-cache feature.

A unit lock is a file ``<unit>/lock`` holding the holder's host, pid, start time and a heartbeat (its mtime, touched
while training). It is created with ``O_EXCL`` semantics (a hard link of a complete temporary file), so two jobs
starting at once cannot both get it. A lock whose process is gone (same host, pid not alive) or whose heartbeat is
older than ``stale_after`` seconds (another host) is taken over with a warning.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Iterator

from .checkpoint import probe_writable

log = logging.getLogger(__name__)

LOCK_NAME = "lock"


class UnitBusy(RuntimeError):
    """Another live job holds the unit's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class UnitLock:
    """Exclusive ownership of one unit folder by one job; ``stale_after`` bounds a foreign host's silence."""

    HEARTBEAT_EVERY = 30.0

    def __init__(self, unit_dir: str | os.PathLike, what: str, stale_after: float = 600.0):
        self.dir = Path(unit_dir)
        self.path = self.dir / LOCK_NAME
        self.what = what
        self.stale_after = stale_after
        self.held = False
        self._last_beat = 0.0
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "token": secrets.token_hex(8)}

    def _read(self, path: Path | None = None) -> dict | None:
        try:
            return json.loads((path or self.path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a holder that died at that instant: treated as stale below

    def _stale(self, holder: dict) -> str | None:
        """Why the current holder can be displaced, or None if it is alive."""
        if not holder:
            return "an unreadable lock file"
        if holder.get("host") == self.info["host"]:
            pid = int(holder.get("pid", -1))
            return None if _pid_alive(pid) else f"process {pid} on this host is gone"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "a lock that vanished"
        return f"no heartbeat from host {holder.get('host')} for {age:.0f} s" if age > self.stale_after else None

    def acquire(self) -> "UnitLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".lock.{self.info['token']}"
        tmp.write_text(json.dumps(self.info))
        try:
            for _ in range(20):
                try:
                    os.link(tmp, self.path)  # atomic: fails if a lock exists
                    self.held = True
                    self._last_beat = time.time()
                    return self
                except FileExistsError:
                    pass
                holder = self._read()
                if holder is None:
                    continue  # released in the meantime
                why = self._stale(holder)
                if why is None:
                    raise UnitBusy(
                        f"{self.what} is being trained by another job: host {holder.get('host')}, pid "
                        f"{holder.get('pid')}, started {holder.get('started')} (lock file '{self.path}'). Wait for "
                        "it, or if that job is dead on another machine, delete the lock file."
                    )
                # take over: move the stale lock aside under a unique name (only one contender succeeds)
                aside = self.dir / f".lock.stale.{self.info['token']}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                if self._read(aside) != holder:
                    # a live holder replaced the stale one between our read and the rename: put it back
                    with contextlib.suppress(OSError):
                        os.link(aside, self.path)
                    aside.unlink()
                    continue
                aside.unlink()
                log.warning("%s: took over a stale lock (%s; it was held by host %s, pid %s since %s)", self.what,
                            why, holder.get("host"), holder.get("pid"), holder.get("started"))
            raise UnitBusy(f"could not take the lock '{self.path}' (it changed hands 20 times)")
        finally:
            tmp.unlink(missing_ok=True)

    def heartbeat(self) -> None:
        """Touch the lock (at most every HEARTBEAT_EVERY seconds) so other hosts see the holder is alive."""
        now = time.time()
        if self.held and now - self._last_beat >= self.HEARTBEAT_EVERY:
            with contextlib.suppress(OSError):
                os.utime(self.path)
            self._last_beat = now

    def release(self) -> None:
        if not self.held:
            return
        holder = self._read()
        if holder and holder.get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "UnitLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, waiting_message: str, shared: bool = False) -> Iterator[None]:
    """Block until this process holds an ``flock`` on ``path``: exclusive, or ``shared`` with other readers (released
    when the process dies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s", waiting_message)
            fcntl.flock(fh.fileno(), mode)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def claim_units(unit_dirs: list[Path], what: str = "unit") -> Iterator[list[UnitLock]]:
    """Lock every unit folder this job will train (rank 0 only) for the duration of the ``with`` block, before any
    work: a second job for a unit stops here naming the holder. A holder that dies leaves a lock that the next job
    takes over (see ``UnitLock``). A job that fails leaves no empty folder behind that it created."""
    created = sorted({p for d in unit_dirs for p in (Path(d), *Path(d).parents) if not p.exists()},
                     key=lambda p: len(p.parts), reverse=True)
    try:
        with contextlib.ExitStack() as stack:
            locks = []
            if int(os.environ.get("RANK", 0)) == 0:
                for d in unit_dirs:
                    probe_writable(d)  # an unwritable or full output folder fails here, before any training
                    locks.append(stack.enter_context(UnitLock(d, f"{what} '{d.name}' in '{d.parent}'")))
            yield locks
    except BaseException:
        for p in created:  # deepest first; a folder something was written to stays
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
