"""One checkpoint format: a folder with ``model.safetensors`` + ``meta.json`` (+ ``train_state.pt`` for resuming).

Writes are atomic: everything goes into a fresh temporary folder of a unique name that replaces ``<dir>`` by rename,
so a crash mid-save leaves the previous checkpoint loadable and concurrent readers never see a mix. ``meta.json``
carries the sha256 of the weights file: a truncated or corrupted file is refused, never silently replaced by random
weights. Training state (optimizer, scheduler) is read with ``torch.load(weights_only=True)``, which executes no pickled
code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from models.staging import disk_full  # the one recognition of a full disk, whatever library was writing
from models.staging import unique_tag, write_staged  # one naming of temporaries, one staged write of a text file
from models.staging import remove_dead_stages  # the one rule for temporaries of dead writers

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "meta.json"
STATE = "train_state.pt"
KINDS = ("block", "merged_layer", "model", "resume", "layer")  # layer: one whole layer of a new shape (ffn)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class OutputError(RuntimeError):
    """An output folder that cannot be written; the message names the setting and the folder."""


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


def _free_bytes(folder: Path) -> float:
    for d in [folder, *folder.parents]:
        try:
            return shutil.disk_usage(d).free
        except OSError:
            continue
    return math.inf


def write_failure(e: BaseException, folder: str | os.PathLike, needed_bytes: int = 0) -> str:
    """Why a write into ``folder`` failed, in words; a full disk is named as such.

    safetensors and torch.save report a full disk in their own words ("unexpected pos ...", "file write failed"):
    their errors are recognised by ``models.staging.disk_full``, or by the free space left where they were writing.
    """
    full = disk_full(e)
    free = _free_bytes(Path(folder))
    if full or free < max(needed_bytes, 1 << 20):
        return f"No space left on device ({free / 2**20:.1f} MiB free in '{folder}')"
    return getattr(e, "strerror", None) or " ".join(str(e).split())


def save_checkpoint(directory: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any], *,
                    train_state: dict[str, Any] | None = None, keep_previous: bool = False,
                    folders: dict[str, Path] | None = None) -> Path:
    """Atomically write weights (+ metadata, + optional training state) to ``directory``.

    Everything is written to a temporary folder of a unique name, then swapped in by two renames (the old folder
    moves aside under a unique ``.prev.*`` name, the new one takes its place). A reader sees the old checkpoint or the
    new one, never a mix; a crash between the renames leaves the ``.prev.*`` folder, which loading falls back to.
    ``keep_previous`` keeps the replaced checkpoint as ``<dir>.old`` (resume points of several units use it to find a
    position they all reached). ``folders`` (name -> a folder written beforehand: the shards of a sharded resume
    point) move into the checkpoint under their names before it is swapped in.
    """
    from safetensors import SafetensorError

    if meta.get("kind") not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {meta.get('kind')!r}")
    final = Path(directory)
    # the schema is checked on every load: refuse now what could not be read back
    validate_meta({"format_version": FORMAT_VERSION, **meta, "weights_sha256": "0" * 64}, final)
    tag = unique_tag()
    tmp = final.with_name(f"{final.name}.tmp.{tag}")
    prev = final.with_name(f"{final.name}.prev.{tag}")
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_folder(tmp, state_dict, meta, train_state=train_state, folders=folders)
        _swap_in(tmp, final, prev, keep_previous=keep_previous)
    except (OSError, SafetensorError, RuntimeError) as e:
        # safetensors reports its I/O errors (disk full...) as SafetensorError, torch.save as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists() and prev.exists():
            os.replace(prev, final)
        raise CheckpointError(
            f"could not write checkpoint '{final}': "
            f"{write_failure(e, final.parent, sum(v.numel() * v.element_size() for v in state_dict.values()))}. "
            "The previous checkpoint there (if any) is intact."
        ) from e
    return final


def _write_folder(tmp: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any], *,
                  train_state: dict[str, Any] | None, folders: dict[str, Path] | None = None) -> None:
    """A complete checkpoint in the new folder ``tmp``: weights, training state, the ``folders`` moved in, then the
    metadata with their hashes."""
    from safetensors.torch import save

    tmp.mkdir()
    for name, src in (folders or {}).items():
        os.replace(src, tmp / name)
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


def _swap_in(tmp: Path, final: Path, prev: Path, *, keep_previous: bool) -> None:
    """``tmp`` becomes ``final`` by two renames (the old one aside as ``prev``); then what earlier writers left."""
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
    remove_dead_stages(final)  # temporaries of writers that died mid-write


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _mtime(path: Path) -> float:
    """Modification time, or -inf for an entry removed since it was listed (a save cleaning up beside a reader)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return -math.inf


def resolve_dir(directory: str | os.PathLike) -> Path:
    """The folder that holds the checkpoint ``directory`` names: itself, or, where a save was cut short between its
    two renames, the newest ``<dir>.prev.*`` beside it. Direct loading and discovery both go through here."""
    directory = Path(directory)
    if (directory / META).is_file():
        return directory
    prevs = sorted(directory.parent.glob(f"{directory.name}.prev*"), key=_mtime, reverse=True)
    for prev in prevs:
        if (prev / META).is_file():
            log.warning("checkpoint '%s' was being replaced when a save was interrupted; using '%s'", directory, prev)
            return prev
    if (directory / META).is_file():  # the save that was under way has finished meanwhile
        return directory
    if directory.is_file():
        raise CheckpointError(f"'{directory}' is a file; a checkpoint is a folder with {WEIGHTS} and {META}")
    raise CheckpointError(f"no checkpoint at '{directory}': {META} not found")


# ---- metadata schema: every field this toolkit writes, its type and range; checked on every read ----
def _show(v: Any) -> str:
    return f"{type(v).__name__} {json.dumps(v, default=str)[:60]}"


def _int(lo: int = 0) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool):
            return f"an integer >= {lo}"
        return None if v >= lo else f"an integer >= {lo}"
    return check


def _num(lo: float, hi: float = math.inf, lo_open: bool = False) -> Callable[[Any], str | None]:
    want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def check(v: Any) -> str | None:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return want
        return None if (v > lo if lo_open else v >= lo) and v <= hi else want
    return check


def _is(t: type, what: str, nonempty: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, t) or (isinstance(v, bool) and t is not bool) or (nonempty and not v):
            return what
        return None
    return check


def _one_of(options: Iterable[str]) -> Callable[[Any], str | None]:
    options = tuple(options)
    return lambda v: None if isinstance(v, str) and v in options else f"one of {', '.join(options)}"


def _sha256_hex(v: Any) -> str | None:
    ok = isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
    return None if ok else ("the sha256 of the weights file (64 hex digits); if you trust the weights, run "
                            "`python -m utils.checkpoint rehash DIR`")


def _str_list(v: Any) -> str | None:
    return None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "a list of strings"


def _position(v: Any) -> str | None:
    ok = (isinstance(v, dict) and set(v) == {"epoch", "step", "global_step"}
          and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v.values()))
    return None if ok else "a position {epoch, step, global_step} of non-negative integers"


def _float_or_inf(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
    return None if ok else "a number (inf allowed)"


def _pair(v: Any) -> str | None:
    ok = (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
          and v[0] >= 0 and v[1] == v[0] + 1)
    return None if ok else "two consecutive layer indices [N, N+1]"


_STR = _is(str, "a string")
_TEXT = _is(str, "a non-empty string", nonempty=True)
_DICT = _is(dict, "an object")
_BOOL = _is(bool, "true or false")
_POS, _NONNEG = _int(1), _int(0)

# field -> check, for every kind; then the fields each kind requires and its own fields
COMMON_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "format_version": lambda v: _int(1)(v) or (None if v <= FORMAT_VERSION else
                                               f"a format version up to {FORMAT_VERSION} (a newer toolkit wrote it)"),
    "kind": _one_of(KINDS), "weights_sha256": _sha256_hex, "train_state_sha256": _sha256_hex, "saved_at": _STR,
    "teacher": _STR, "teacher_hash": _TEXT, "epoch": _NONNEG, "metrics": _DICT, "run": _DICT, "init": _STR,
}
KIND_FIELDS: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "block": {"layer": _NONNEG, "num_heads": _POS, "head_dim": _POS, "hidden_size": _POS,
              "teacher_heads": _POS, "teacher_head_dim": _POS, "spec": lambda v: _spec(v)},
    "merged_layer": {"layers": _pair, "num_heads": _POS, "head_dim": _POS, "intermediate_size": _NONNEG,
                     "hidden_size": _POS, "conditioned": _BOOL, "spec": lambda v: _spec(v)},
    "model": {"config": _DICT, "sources": _str_list},
    "layer": {"layer": _NONNEG, "num_heads": _POS, "head_dim": _POS, "intermediate_size": _NONNEG, "hidden_size": _POS,
              "spec": lambda v: _spec(v)},
    "resume": {"unit": _TEXT, "unit_meta": _DICT, "setup": _DICT, "run_id": _TEXT, "position": _position},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "block": ("layer", "num_heads", "head_dim", "hidden_size", "teacher_hash"),
    "merged_layer": ("layers", "num_heads", "head_dim", "intermediate_size", "hidden_size", "teacher_hash"),
    "model": ("config",),  # a model reloads from its folder alone; compared with a teacher when one is given
    "layer": ("layer", "num_heads", "head_dim", "intermediate_size", "hidden_size", "teacher_hash"),
    "resume": ("unit", "unit_meta", "setup", "run_id", "position"),
}
LAYER_KINDS = ("teacher", "block", "merged", "pruned", "dropped", "layer")  # LayerSpec.kind values models/ writes
_PRESENT, _MISSING = "present", object()


def _plan_problems(spec: dict[str, Any], name: str) -> list[tuple[str, str, Any]]:
    """(field, expected, found) for one layer plan: a ``models.config.LayerSpec`` as ``to_dict`` writes it."""
    from models import kinds
    from models.config import LayerSpec

    checks: dict[str, Callable[[Any], str | None]] = {
        "num_heads": _NONNEG, "head_dim": _NONNEG, "intermediate_size": _NONNEG, "kind": _one_of(LAYER_KINDS),
        "origin": lambda v: None if isinstance(v, list) and v and all(_NONNEG(x) is None for x in v)
        else "a non-empty list of teacher layer indices",
        "attention": _one_of(kinds.KINDS),
    }
    required = ("num_heads", "head_dim", "intermediate_size", "kind", "origin")  # older plans lack the rest
    out = [(f"{name}.{key}", "absent (not a field of a layer plan)", spec[key])
           for key in sorted(set(spec) - {f.name for f in dataclasses.fields(LayerSpec)})]
    out += [(f"{name}.{key}", _PRESENT, _MISSING) for key in required if key not in spec]
    out += [(f"{name}.{key}", want, spec[key]) for key, check in checks.items()
            if key in spec and (want := check(spec[key])) is not None]
    if not out:
        try:  # the spec's own rules: how its fields fit together
            LayerSpec.from_dict(spec)
        except (TypeError, ValueError) as e:
            out.append((name, f"a valid layer plan ({e})", spec))
    return out


def _spec(v: Any) -> str | None:
    """A unit's whole spec in its checkpoint metadata."""
    if not isinstance(v, dict):
        return "a layer plan object (num_heads, head_dim, intermediate_size, origin, kind, ...)"
    problems = _plan_problems(v, "spec")
    return None if not problems else "a valid layer plan: " + "; ".join(f"{f} {w}" for f, w, _ in problems)


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda v: None if v is None else (None if check(v) is None else f"{check(v)} or null")


def _token_ids(v: Any) -> str | None:
    ok = v is None or _NONNEG(v) is None or (isinstance(v, list) and all(_NONNEG(x) is None for x in v))
    return None if ok else "a token id, a list of token ids, or null"


def _config_checks() -> dict[str, Callable[[Any], str | None]]:
    """field -> check for every field a family's config writes (``models.*Config``)."""
    from models.base import ACTIVATIONS
    from models.llama import MODEL_TYPES

    eps = _num(0, lo_open=True)
    return {
        "vocab_size": _POS, "hidden_size": _POS, "num_attention_heads": _POS, "intermediate_size": _POS,
        "num_hidden_layers": _POS, "max_position_embeddings": _POS, "type_vocab_size": _POS,
        "layer_norm_eps": eps, "rms_norm_eps": eps, "hidden_act": _one_of(sorted(ACTIVATIONS)), "pad_token_id": _NONNEG,
        "hidden_dropout_prob": _num(0, 1), "attention_probs_dropout_prob": _num(0, 1), "has_mlm_head": _BOOL,
        "layers": lambda v: None if isinstance(v, list) and v else "a non-empty list of layer plans",
        "num_key_value_heads": _POS, "head_dim": _optional(_POS), "rope_theta": eps, "rope_scaling": _optional(_DICT),
        "attention_bias": _BOOL, "mlp_bias": _BOOL, "tie_word_embeddings": _BOOL, "model_type": _one_of(MODEL_TYPES),
        "bos_token_id": _token_ids, "eos_token_id": _token_ids, "sliding_window": _optional(_POS),
    }


def _config_problems(cfg: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(field, expected, found) for a saved model config (``config`` of a model checkpoint): the fields of its
    family's config class (configs saved before families existed are BERT's)."""
    from models.config import ModelConfig

    family = cfg.get("family", "bert")
    if family not in ModelConfig.FAMILIES:
        return [("config.family", f"one of {', '.join(sorted(ModelConfig.FAMILIES))}", family)]
    fields = {f.name for f in dataclasses.fields(ModelConfig.FAMILIES[family])}
    checks = _config_checks()
    out: list[tuple[str, str, Any]] = []
    for key in sorted(set(cfg) - fields - {"family"}):
        out.append((f"config.{key}", "absent (not a field of a model config)", cfg[key]))
    for key in sorted(fields, key=lambda k: (k == "layers", k)):
        if key not in cfg:
            out.append((f"config.{key}", _PRESENT, _MISSING))
        elif (want := checks[key](cfg[key])) is not None:
            out.append((f"config.{key}", want, cfg[key]))
    if out:
        return out
    for i, spec in enumerate(cfg["layers"]):
        name = f"config.layers[{i}]"
        if not isinstance(spec, dict):
            out.append((name, "an object", spec))
            continue
        out += _plan_problems(spec, name)
    if cfg["num_hidden_layers"] != len(cfg["layers"]):
        out.append(("config.num_hidden_layers", f"the number of layer plans ({len(cfg['layers'])})",
                    cfg["num_hidden_layers"]))
    if cfg["pad_token_id"] >= cfg["vocab_size"]:
        out.append(("config.pad_token_id", f"a token id below vocab_size {cfg['vocab_size']}", cfg["pad_token_id"]))
    if not out:
        try:  # the config's own rules: how its fields fit together
            ModelConfig.from_dict(cfg)
        except (TypeError, ValueError) as e:
            out.append(("config", f"a valid model config ({e})", "its fields"))
    return out


def _headless_zero(meta: dict[str, Any], key: str) -> bool:
    """A unit whose spec has an attention kind without heads (``none``, ``linear``) stores 0 heads of size 0."""
    from models import kinds

    spec = meta.get("spec")
    return (key in ("num_heads", "head_dim") and meta[key] == 0 and isinstance(spec, dict)
            and spec.get("attention") in kinds.KINDS and not kinds.KINDS[spec["attention"]].has_heads)


def _meta_problems(meta: dict[str, Any], prefix: str = "", unit: bool = False) -> list[tuple[str, str, Any]]:
    """(field, expected, found) for metadata; ``unit``: a resume checkpoint's copy of one unit's metadata (which has
    no weights of its own, so no hash or format version)."""
    problems: list[tuple[str, str, Any]] = []
    kinds = [k for k in KINDS if not (unit and k == "resume")]
    kind_ok = meta.get("kind") in kinds and isinstance(meta.get("kind"), str)
    fields = {**COMMON_FIELDS, "kind": _one_of(kinds), **(KIND_FIELDS[meta["kind"]] if kind_ok else {})}
    required = ("kind",) if unit else ("format_version", "kind", "weights_sha256")
    required += REQUIRED[meta["kind"]] if kind_ok else ()
    for key in required:
        if key not in meta:
            problems.append((prefix + key, _PRESENT, _MISSING))
    for key, check in fields.items():
        if key in meta and (want := check(meta[key])) is not None and not _headless_zero(meta, key):
            problems.append((prefix + key, want, meta[key]))
    if not problems and meta["kind"] == "model":
        problems = [(prefix + k, want, got) for k, want, got in _config_problems(meta["config"])]
    if not problems and meta["kind"] == "resume":
        problems += _meta_problems(meta["unit_meta"], f"{prefix}unit_meta.", unit=True)
    return problems


def validate_meta(meta: Any, where: str | os.PathLike) -> dict[str, Any]:
    """Check checkpoint metadata against the schema; CheckpointError naming the first bad field otherwise.

    Every field this toolkit writes is type- and range-checked when present (booleans are not integers); the fields
    a kind's loader relies on, and the weights' sha256, are required. Unknown top-level fields are allowed.
    """
    f = Path(where) / META if Path(where).name != META else Path(where)
    if not isinstance(meta, dict):
        raise CheckpointError(f"'{f}' is not a JSON object: not a checkpoint of this toolkit")
    if "kind" not in meta:
        raise CheckpointError(f"'{f}' has no 'kind': not a checkpoint of this toolkit")
    problems = _meta_problems(meta)
    if problems:
        key, want, got = problems[0]
        more = f" (and {len(problems) - 1} more problem{'s' * (len(problems) > 2)})" if len(problems) > 1 else ""
        if got is _MISSING:
            raise CheckpointError(f"'{f}': required field '{key}' is missing{more}")
        raise CheckpointError(f"'{f}': field '{key}' must be {want}, found {_show(got)}{more}")
    return meta


TRAIN_STATE_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "position": _position, "optimizer": _DICT, "scheduler": _DICT, "best": _float_or_inf, "rng": _DICT,
    "run_id": _TEXT, "unit": _TEXT, "weights_hash": _TEXT,
}


def validate_train_state(state: Any, where: str | os.PathLike) -> dict[str, Any]:
    """The training state a resume needs (what the training loop saves): CheckpointError naming a bad field."""
    if not isinstance(state, dict):
        raise CheckpointError(f"'{where}' does not hold a training state (found {type(state).__name__})")
    for key, check in TRAIN_STATE_FIELDS.items():
        if key not in state:
            raise CheckpointError(f"'{where}': required field '{key}' of the training state is missing")
        if (want := check(state[key])) is not None:
            raise CheckpointError(f"'{where}': field '{key}' of the training state must be {want}, found "
                                  f"{type(state[key]).__name__}")
    return state


def _parse_meta(raw: bytes, where: Path) -> dict[str, Any]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{where}' is not valid JSON ({e}); the checkpoint is corrupted") from None
    return validate_meta(meta, where)


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
            from models.hf import load_error_reason

            raise CheckpointError(f"'{sf}' cannot be read ({load_error_reason(e)})") from None
        validate_train_state(state, sf)
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
                log.warning("%s: trained against teacher %s, loading into teacher %s (`force`)", where, got, want)
                continue
            problems.append(f"{key}: checkpoint has {got!r}, expected {want!r}")
    if problems:
        hint = (" (pass `force` to accept a different teacher)" if any(p.startswith("teacher_hash") for p in problems)
                else "")
        raise CheckpointError(f"checkpoint '{where}' does not fit: " + "; ".join(problems) + hint)


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Strict load that reports shape and key mismatches by name."""
    from models.hf import state_dict_mismatch

    problem = state_dict_mismatch(module.state_dict(), sd)
    if problem:
        raise CheckpointError(f"checkpoint '{where}' does not match the model: {problem}")
    module.load_state_dict(sd)


def _checkpoint_names(root: Path, which: str) -> set[Path]:
    """``<folder>/<which>`` for every folder below ``root`` that lists ``which``, or its ``.prev.*`` / ``.tmp.*``
    copies (a save swapping it in: at the moment of the listing the checkpoint may go by either name). Names are
    listed, not read: a running job's saves create and remove those folders all the time, and a folder that vanishes
    between being listed and being entered is skipped (os.walk ignores folders it cannot list)."""
    names = set()
    for folder, dirs, _ in os.walk(root, followlinks=True):
        if any(d == which or d.startswith((f"{which}.prev", f"{which}.tmp.")) for d in dirs):
            names.add(Path(folder) / which)
    return names


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` (or the ``.prev`` copy of a save under way) holds a checkpoint now."""
    directory = Path(directory)
    return (directory / META).is_file() or any(
        (p / META).is_file() for p in directory.parent.glob(f"{directory.name}.prev*"))


def remove_checkpoint(directory: str | os.PathLike) -> None:
    """Removes the checkpoint ``directory`` and the ``.prev*`` copies a save cut short left beside it."""
    directory = Path(directory)
    for left in [directory, *directory.parent.glob(f"{directory.name}.prev*")]:
        shutil.rmtree(left, ignore_errors=True)


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
            logical = sorted(_checkpoint_names(root, which))
        for d in logical:
            if not has_checkpoint(d):
                continue  # a first save still under a temporary name, or a folder of that name that is no checkpoint
            meta = read_meta(d)
            if meta["kind"] in kinds:
                found.append((d, meta))
    return found


def write_probe(folder: Path) -> None:
    """Write, sync and remove a small file in ``folder``: OSError if the folder (or its disk) cannot take it."""
    probe = folder / f".write_probe.{unique_tag()}"
    with open(probe, "wb") as f:
        f.write(b"\0" * 4096)
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()


def probe_writable(directory: str | os.PathLike) -> Path:
    """Fail before any training if ``directory`` cannot be created or written."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        write_probe(d)
    except OSError as e:
        raise CheckpointError(f"output folder '{d}' is not writable: {write_failure(e, d)}") from None
    return d


def check_output_dir(path: str | os.PathLike, field: str = "out", keep: bool = False) -> Path:
    """Fail before any work if results cannot be written to ``path``; removes the folders it created unless ``keep``.

    Under torchrun only rank 0 probes (it alone writes results; the process group may not exist yet), unless
    ``keep``: every process may write there (each machine's teacher cache), and nothing is removed under another.
    """
    d = Path(path)
    if not keep and int(os.environ.get("RANK", 0)) != 0:
        return d
    created = []
    try:
        if d.exists() and not d.is_dir():
            raise OutputError(f"`{field}` '{d}' is an existing file; expected a folder (or a path to create one)")
        for parent in reversed([d, *d.parents]):
            if not parent.exists():
                parent.mkdir(exist_ok=keep)
                created.append(parent)
        write_probe(d)
    except OSError as e:
        raise OutputError(f"`{field}` '{d}' is not writable: {write_failure(e, d)}") from None
    finally:
        for c in reversed(created if not keep else []):
            try:
                c.rmdir()
            except OSError:
                pass
    return d


def rehash(directory: str | os.PathLike) -> list[str]:
    """Record the sha256 of each checkpoint's weights under ``directory`` (itself, or searched recursively).

    For checkpoints whose hash is missing or stale because their files were made or edited by hand, and whose
    weights the user vouches for. A weights file that safetensors cannot read, or metadata that is wrong in another
    field, is refused (CheckpointError) and nothing is written for it. Returns one line per checkpoint.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    root = Path(directory)
    metas = [root / META] if (root / META).is_file() else sorted(root.rglob(META))
    if not metas:
        raise CheckpointError(f"no checkpoint ({META}) in or under '{root}'")
    lines = []
    for m in metas:
        d = m.parent
        try:
            meta = json.loads(m.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"'{m}' is not valid JSON ({e}); fix it first") from None
        try:
            weights = (d / WEIGHTS).read_bytes()
            load(weights)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"'{d / WEIGHTS}' cannot be read as safetensors ({e}): not rehashed") from None
        digest = hashlib.sha256(weights).hexdigest()
        if isinstance(meta, dict) and meta.get("weights_sha256") == digest:
            lines.append(f"{d}: hash already correct")
            continue
        validate_meta({**meta, "weights_sha256": digest} if isinstance(meta, dict) else meta, d)
        write_staged({m: json.dumps({**meta, "weights_sha256": digest}, indent=2, sort_keys=True, default=str)})
        lines.append(f"{d}: weights_sha256 set to {digest}")
    return lines
