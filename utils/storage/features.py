"""What the students learn from: teacher hidden states and block outputs, computed once per batch for all layers,
or once per dataset into a cache on disk (fp16, packed without padding, read memory-mapped).

Names of features: ``in_{i}`` hidden state entering teacher layer i; ``block_{i}`` teacher attention block output of
layer i (before residual + LayerNorm); ``out_{i}`` hidden state leaving layer i (== ``in_{i+1}``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from models.base import SwappableModel
from models.hf import TeacherError, layer_device
from models.staging import remove_dead_stages, unique_tag, write_staged
from ..data.batches import token_ids_hash

log = logging.getLogger(__name__)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _named(e: OSError, path: Path) -> OSError:
    """``e`` with the file it concerns (os.pwrite and friends report none), so the error line can name it."""
    return OSError(e.errno, e.strerror, str(path))


def _reserve_npy(fd: int, path: Path, *, shape: tuple[int, int], dtype: type) -> int:
    """Write a ``.npy`` header for ``shape`` / ``dtype`` to the empty file ``fd`` and reserve the data's space on
    disk; returns the offset of the data. A disk without room fails here (OSError ENOSPC), before any teacher pass;
    the data are then written with ``os.pwrite`` (never through a memory map, where a full disk is a SIGBUS)."""
    import io

    from numpy.lib import format as npy

    head = io.BytesIO()
    npy.write_array_header_1_0(head, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                      "shape": shape})
    header = head.getvalue()
    size = len(header) + shape[0] * shape[1] * np.dtype(dtype).itemsize
    _pwrite_all(fd, header, offset=0, path=path)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # no reservation there: writes will tell
            raise _named(e, path) from None
        os.ftruncate(fd, size)
    return len(header)


def _pwrite_all(fd: int, data: bytes, *, offset: int, path: Path) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as e:
            raise _named(e, path) from None
        view, offset = view[n:], offset + n


def _fsync(fd: int, path: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        raise _named(e, path) from None


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype] | str:
    """(shape, dtype) from a ``.npy`` file's header, nothing else read; or why it is not a readable ``.npy``."""
    from numpy.lib import format as npy

    try:
        with open(path, "rb") as fh:
            version = npy.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                return f"a .npy file of format version {version}"
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, fortran, dtype = read(fh)
    except (ValueError, EOFError, SyntaxError) as e:
        return f"no readable .npy header ({' '.join(str(e).split())[:80]})"
    return (tuple(shape), dtype) if not fortran else "a Fortran-ordered array"


def _first_non_finite(path: Path) -> int | None:
    """The first row of a 2-D float ``.npy`` array holding NaN or an infinity, or None (an integer array: None).
    Read memory-mapped, in chunks; float16 as bits (a float16 is NaN or infinite exactly when its five exponent bits
    are all set): about four times faster than ``np.isfinite``, so checking the values costs less than the sha256
    before it."""
    arr = np.load(path, mmap_mode="r")
    if not np.issubdtype(arr.dtype, np.floating):
        return None
    half = arr.dtype == np.float16
    step = max(1, (1 << 24) // (arr.dtype.itemsize * max(1, arr.shape[1])))
    for start in range(0, arr.shape[0], step):
        part = arr[start:start + step]
        hit = (part.view(np.uint16) & 0x7C00) == 0x7C00 if half else ~np.isfinite(part)
        if hit.any():
            return start + int(np.flatnonzero(hit.any(axis=1))[0])
    return None


def _parse(name: str) -> tuple[str, int]:
    kind, _, idx = name.partition("_")
    if kind not in ("in", "block", "out") or not idx.isdigit():
        raise ValueError(f"unknown teacher feature '{name}' (expected in_N, block_N or out_N)")
    return kind, int(idx)


@torch.no_grad()
def teacher_features(teacher: SwappableModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     names: list[str]) -> dict[str, torch.Tensor]:
    """One forward pass of the teacher, stopping after the last layer any requested feature needs."""
    wanted = {}
    for n in names:
        kind, i = _parse(n)
        if kind == "out":
            kind, i = "in", i + 1
        wanted.setdefault(i, set()).add(kind)
        if i > len(teacher.layers) or (kind == "block" and i >= len(teacher.layers)):
            raise IndexError(f"teacher feature '{n}' does not exist: the teacher has {len(teacher.layers)} layers")
    mask = teacher.context(attention_mask)
    h = teacher.embed(input_ids)
    got: dict[str, torch.Tensor] = {}
    last = max(wanted)
    for i in range(last + 1):
        kinds = wanted.get(i, set())
        if "in" in kinds:
            got[f"in_{i}"] = h
        if i == last and "block" not in kinds:
            break
        layer = teacher.layers[i]
        device = layer_device(layer)
        if device is not None and device != h.device:  # a teacher spread over several devices (models.hf.dispatch)
            h, mask = h.to(device), mask.to(device) if mask is not None else None
        blk, _ = layer.block.contribution(h, mask)
        if "block" in kinds:
            got[f"block_{i}"] = blk
        a = layer.block.finish(h, blk)
        h = layer.feed_forward(a)
    out = {}
    for n in names:
        kind, i = _parse(n)
        out[n] = got[f"in_{i + 1}"] if kind == "out" else got[n]
    return out


class TeacherCache:
    """Teacher features for every sentence of a tokenised split, on disk as fp16 ``.npy`` files (memory-mapped).

    The folder is keyed by a hash of the teacher weights, the token ids and the tokenizer settings, so it is reused
    across epochs, runs and student configurations and rebuilt when any of those change. Features missing from an
    existing cache (another block, say) are added in one extra teacher pass.

    Safe for concurrent runs sharing ``root``: features are checked and built under an exclusive lock of the folder
    (so each is built once; a second run waits, then reuses them), written under unique temporary names and renamed
    into place. Each feature's size and sha256 are recorded beside it at build time and checked before use: a damaged,
    truncated or unrecorded file is named in a warning and rebuilt, never used.

    What a feature holds is ``layout`` (values per token, dtype) and ``compute`` (one batch's values): hidden states
    here; a subclass stores other per-token teacher outputs the same way (``storage.logits.TopKCache``).
    """

    def __init__(self, root: str | os.PathLike, teacher: SwappableModel, *, teacher_hash: str,
                 token_ids: list[list[int]], tokenizer_name: str, seq_len: int):
        self.key = token_ids_hash(token_ids, teacher_hash, tokenizer_name, seq_len)
        self.dir = Path(root) / self.key
        self.teacher, self.ids = teacher, token_ids
        lengths = np.array([len(x) for x in token_ids], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.arrays: dict[str, np.ndarray] = {}
        self.rebuilt: dict[str, str] = {}  # feature -> why it had to be rebuilt
        self.built: list[str] = []  # the features the last ``ensure`` built (the others were on disk)

    def layout(self, name: str) -> tuple[int, np.dtype]:
        """The width (values per token) and dtype of feature ``name`` on disk: a hidden state, in float16."""
        _parse(name)
        return self.teacher.config.hidden_size, np.dtype(np.float16)

    def compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, names: list[str]
                ) -> dict[str, torch.Tensor]:
        """The features ``names`` of one padded batch, [B, T, width] each (one teacher pass)."""
        return teacher_features(self.teacher, input_ids, attention_mask, names=names)

    def ensure(self, names: list[str], batch_size: int, device: torch.device) -> "TeacherCache":
        """Load ``names`` from disk, building the missing or damaged ones with one teacher pass over the data.

        Runs that only read check their features under a shared lock, side by side; a run that has to build takes the
        lock exclusively, checks again (another run may have built them meanwhile) and builds what is still missing.
        """
        from .lock import file_lock

        self.dir.mkdir(parents=True, exist_ok=True)
        lock, waiting = self.dir / ".lock", f"teacher cache {self.dir}: another run is building it; waiting for it"
        with file_lock(lock, waiting, shared=True):
            self._remove_dead_temporaries()
            missing = self._check(names, report=False)
            if not missing:
                self._map(names)
        if missing:
            with file_lock(lock, waiting):
                missing = self._check(names, report=True)
                if missing:
                    self._build(missing, batch_size, device)
                self._map(names)
        self.built = list(missing)
        log.info("teacher cache %s: %s (%d tokens)%s", self.dir, ", ".join(names), self.offsets[-1],
                 f"; built {', '.join(missing)}" if missing else "; all reused")
        return self

    def _remove_dead_temporaries(self) -> None:
        """Delete what builders that died mid-build (kill -9, a lost node) left behind: ``*.tmp.<host>.<pid>.<random>``
        files (and staged records' folders) whose writer is gone, by the one rule for temporaries of dead writers (a
        dead pid on this host, or a day old from another host). A live builder's files are never touched."""
        for left in sorted(self.dir.glob("*.tmp.*")):  # files of a feature, or a staged record's folder
            remove_dead_stages(self.dir / left.name.split(".tmp.", 1)[0])
            if not left.exists():
                log.info("teacher cache: removed '%s', left by a build that died", left)

    def _check(self, names: list[str], report: bool) -> list[str]:
        """The features of ``names`` that are missing or damaged (damaged ones named in a warning with ``report``)."""
        missing = []
        for n in names:
            problem = self._problem(n)
            if problem and problem != "missing" and report:
                log.warning("teacher cache: '%s' is damaged (%s); rebuilding it", self.dir / f"{n}.npy", problem)
                self.rebuilt[n] = problem
            if problem:
                missing.append(n)
        return missing

    def _map(self, names: list[str]) -> None:
        for n in names:
            self.arrays[n] = np.load(self.dir / f"{n}.npy", mmap_mode="r")

    def _problem(self, name: str) -> str | None:
        """None if feature ``name`` is on disk and intact; 'missing'; or what is wrong with it."""
        f, rec = self.dir / f"{name}.npy", self.dir / f"{name}.json"
        if not f.is_file():
            return "missing"
        try:
            want = json.loads(rec.read_text())
            size, digest = int(want["bytes"]), str(want["sha256"])
        except FileNotFoundError:
            return f"no size/checksum record '{rec.name}' beside it"
        except (ValueError, KeyError, TypeError):
            return f"its record '{rec.name}' is unreadable"
        got = f.stat().st_size
        if got != size:
            return f"{got} bytes on disk, {size} recorded: truncated or overwritten"
        if _file_sha256(f) != digest:
            return "its sha256 differs from the one recorded at build time"
        held = _npy_layout(f)  # a file whose record was rewritten to match it (by hand, by another tool)
        width, dtype = self.layout(name)
        want = ((int(self.offsets[-1]), width), dtype)
        if held != want:
            shown = held if isinstance(held, str) else f"a {held[1]} array of shape {held[0]}"
            return f"it holds {shown}; this cache needs a {dtype} array of shape {want[0]}"
        row = _first_non_finite(f)  # a build never writes one (``_build`` refuses them): written by something else
        if row is not None:
            return f"it holds NaN or infinite values (first in row {row}), which no teacher feature has"
        return None

    @torch.no_grad()
    def _build(self, names: list[str], batch_size: int, device: torch.device) -> None:
        from tqdm.auto import tqdm

        total = int(self.offsets[-1])
        tag = unique_tag()
        tmp = {n: self.dir / f"{n}.npy.tmp.{tag}" for n in names}
        files: dict[str, tuple[int, int]] = {}  # feature -> (file descriptor, offset of row 0)
        try:
            for n, p in tmp.items():
                width, dtype = self.layout(n)
                files[n] = (os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), 0)
                files[n] = (files[n][0], _reserve_npy(files[n][0], p, shape=(total, width), dtype=dtype))
            # sentences in length order: each teacher batch is nearly free of padding
            order = np.argsort(np.diff(self.offsets), kind="stable")
            for start in tqdm(range(0, len(order), batch_size), desc="caching teacher features", unit="batch"):
                self._write_batch(order[start:start + batch_size], files, tmp=tmp, device=device)
            for n, (fd, _) in files.items():
                _fsync(fd, tmp[n])
            for n in names:
                self._publish(n, tmp[n])
        finally:
            for fd, _ in files.values():
                os.close(fd)
            for p in tmp.values():
                p.unlink(missing_ok=True)
        write_staged({self.dir / "info.json": json.dumps(
            {"sentences": len(self.ids), "tokens": total, "hidden": self.teacher.config.hidden_size,
             "features": sorted(p.stem for p in self.dir.glob("*.npy"))}, indent=2)})

    def _write_batch(self, index: np.ndarray, files: dict[str, tuple[int, int]], *, tmp: dict[str, Path],
                     device: torch.device) -> None:
        """Compute the features of sentences ``index`` as one padded batch and write each sentence's rows (its real
        tokens, contiguous in the file) to the open temporary files."""
        chunk = [self.ids[i] for i in index]
        T = max(len(x) for x in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        att = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, x in enumerate(chunk):
            ids[b, :len(x)] = torch.tensor(x)
            att[b, :len(x)] = 1
        feats = self.compute(ids.to(device), att.to(device), list(files))
        valid = att.bool()
        lengths = self.offsets[index + 1] - self.offsets[index]
        for n, t in feats.items():  # each on its layer's device when the teacher is spread over several
            width, dtype = self.layout(n)
            rows = t[valid.to(t.device)]
            if rows.is_floating_point():  # cast by torch: a value beyond the range becomes inf (refused below)
                rows = rows.to(getattr(torch, str(dtype)))
            packed = rows.cpu().numpy().astype(dtype, copy=False)
            if not np.isfinite(packed).all():  # never cached: every later run would train on them
                raise TeacherError(
                    f"teacher feature {n} holds NaN or infinite values in {dtype} (the teacher's own output, "
                    f"or beyond {dtype}'s range): it cannot be cached in {self.dir}")
            fd, base = files[n]
            row_bytes, at = width * dtype.itemsize, 0
            for i, k in zip(index, lengths):
                _pwrite_all(fd, packed[at:at + k].tobytes(), offset=base + int(self.offsets[i]) * row_bytes,
                            path=tmp[n])
                at += k

    def _publish(self, name: str, tmp: Path) -> None:
        """Rename a complete temporary file into place, then its size / sha256 record beside it."""
        width, dtype = self.layout(name)
        record = {"bytes": tmp.stat().st_size, "sha256": _file_sha256(tmp), "shape": [int(self.offsets[-1]), width],
                  "dtype": str(dtype)}
        os.replace(tmp, self.dir / f"{name}.npy")
        write_staged({self.dir / f"{name}.json": json.dumps(record)})

    def _rows(self, index: np.ndarray) -> np.ndarray:
        """Packed row numbers of the tokens of sentences ``index``, sentence after sentence."""
        lo = self.offsets[index]
        n = self.offsets[index + 1] - lo
        return np.arange(int(n.sum())) + np.repeat(lo - (np.cumsum(n) - n), n)

    def batch(self, names: list[str], index: torch.Tensor, *, length: int, device: torch.device
              ) -> dict[str, torch.Tensor]:
        """Padded [B, length, D] float tensors (int64 for an integer feature) for the sentences ``index`` (padding
        positions are zero).

        One gather per feature: the packed fp16 rows go to ``device`` as they are and are scattered into place there.
        """
        idx = index.cpu().numpy()
        n = self.offsets[idx + 1] - self.offsets[idx]
        rows = self._rows(idx)
        # position of each gathered token in the flattened [B * T] batch
        pos = np.repeat(np.arange(len(idx)) * length - (np.cumsum(n) - n), n) + np.arange(len(rows))
        pos_t = torch.from_numpy(pos).to(device)
        out = {}
        for name in names:
            arr = self.arrays[name]
            whole = not np.issubdtype(arr.dtype, np.floating)  # token ids (uint16 / int32): as int64
            got = arr[rows].astype(np.int64) if whole else arr[rows]
            src = torch.from_numpy(got).to(device, non_blocking=True)
            x = torch.zeros(len(idx) * length, arr.shape[1], dtype=torch.int64 if whole else torch.float32,
                            device=device)
            x.index_copy_(0, pos_t, src if whole else src.float())
            out[name] = x.view(len(idx), length, arr.shape[1])
        return out

