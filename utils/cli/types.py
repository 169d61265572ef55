"""argparse types of the flags: each checks one value and says what was expected, naming the flag (exit code 2)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path, PurePath
from typing import Callable


def int_at_least(name: str, minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``, with an error naming the flag."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{s}'") from None
        if v < minimum:
            bound = "> 0" if minimum == 1 else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {v}")
        return v
    return parse


def criterion_arg(flag: str, *targets: str, exclude: tuple[str, ...] = (), what: str = "") -> Callable[[str], str]:
    """argparse type: a criterion of the registry in ``utils.training.losses`` for ``targets`` (any spelling the seed
    used), returned in its canonical name; ``allowed`` on the returned function lists the choices (for help texts)."""
    from ..training.losses import REGISTRY, normalize_criterion

    allowed = tuple(n for n in dict.fromkeys(n for t in targets for n in REGISTRY[t]) if n not in exclude)

    def parse(s: str) -> str:
        try:
            c = normalize_criterion(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if c not in allowed:
            raise argparse.ArgumentTypeError(f"{flag}{' for ' + what if what else ''} must be one of "
                                             f"{', '.join(allowed)}, got '{s}'")
        return c
    parse.allowed = allowed  # type: ignore[attr-defined]
    return parse


def positive_int(name: str) -> Callable[[str], int]:
    return int_at_least(name, 1)


def non_negative_int(name: str) -> Callable[[str], int]:
    return int_at_least(name, 0)


def number(s: str) -> float:
    """A number as a user types it: ``0.5``, ``2e-3`` or a ratio such as ``1/3`` (ValueError otherwise)."""
    top, slash, bottom = s.strip().partition("/")
    if not slash:
        return float(top)
    den = float(bottom)
    if den == 0:
        raise ValueError(f"division by zero in '{s}'")
    return float(top) / den


def _float_in(range_: str, ok: Callable[[float], bool], number: str) -> Callable[[str], float]:
    """argparse type: a number that ``ok`` accepts; the errors say ``number`` (what to type) and ``range_``."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {number}, got '{s}'") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {range_}, got {v}")
        return v
    return parse


fraction = _float_in("in (0, 1]", lambda v: 0 < v <= 1, "a number in (0, 1]")  # a share of the data
probability = _float_in("in [0, 1)", lambda v: 0 <= v < 1, "a number in [0, 1)")  # an Adam beta, a dropout
positive_float = _float_in("a finite number > 0", lambda v: 0 < v < math.inf, "a number")


def ratios(s: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got '{s}'") from None
    if (len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts)
            or abs(sum(parts) - 1) > 1e-6):
        raise argparse.ArgumentTypeError(f"expected three finite non-negative numbers summing to 1, got '{s}'")
    return parts  # type: ignore[return-value]


def _number(name: str, s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be a number, got '{s}'") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {s}")
    return v


def non_negative_float(name: str) -> Callable[[str], float]:
    """argparse type: a finite number >= 0 (nan and inf refused), with an error naming the flag."""
    def parse(s: str) -> float:
        v = _number(name, s)
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {v}")
        return v
    return parse


def term_weight(name: str, zero: bool = False) -> Callable[[str], float | str]:
    """argparse type of a loss term's weight: 'balanced' (scaled to the first term at the start, see
    ``utils.training.tasks.balance_terms``) or a finite number > 0 (>= 0 with ``zero``: 0 leaves the term out)."""
    from ..training.tasks import BALANCED

    def parse(s: str) -> float | str:
        if s.strip().lower() == BALANCED:
            return BALANCED
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be '{BALANCED}' or a number, got '{s}'") from None
        if not math.isfinite(v) or v < 0 or (v == 0 and not zero):
            raise argparse.ArgumentTypeError(f"{name} must be '{BALANCED}' or a finite number "
                                             f"{'>= 0' if zero else '> 0'}, got {s}")
        return v
    return parse


def warmup_fraction(s: str) -> float:
    """argparse type of --warmup: the fraction of all steps spent warming up, in [0, 1)."""
    v = _number("--warmup", s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"--warmup is a fraction of the training steps in [0, 1), got {v}")
    return v


SEED_MAX = 2**32 - 1  # the seed is multiplied into per-epoch and per-rank seeds, which must fit torch's int64


def seed(s: str) -> int:
    """argparse type of --seed: an integer in [0, 2**32 - 1]."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got '{s}'") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"--seed must be in [0, {SEED_MAX}], got {v}")
    return v


def run_name(s: str) -> str:
    """argparse type of --run-name: a relative path that stays inside --out (no '..', not absolute, not empty)."""
    parts = PurePath(s).parts
    if not s.strip() or PurePath(s).is_absolute() or s.startswith("~") or ".." in parts or not parts:
        raise argparse.ArgumentTypeError(f"--run-name must be a relative folder name inside --out (no '..', not "
                                         f"absolute), got '{s}'")
    return s


def judge_arg(s: str) -> str | None:
    """argparse type of --judge: a hub id or folder; 'none' means no judge."""
    return None if s.lower() == "none" else s


def int_list(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{s}'") from None
    if not v or any(x <= 0 for x in v):
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{s}'")
    return v


def name_list(s: str) -> tuple[str, ...]:
    """argparse type: comma-separated names (lm-eval tasks: piqa,hellaswag), none empty."""
    names = tuple(x.strip() for x in s.split(","))
    if not s.strip() or any(not n for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got '{s}'")
    return names


def layer_list(s: str) -> list[int]:
    """argparse type: comma-separated 0-based layer indices (3,17)."""
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices (0-based), got '{s}'") from None
    if not v or any(x < 0 for x in v):
        raise argparse.ArgumentTypeError(f"expected layer indices 0, 1, 2, ..., got '{s}'")
    return v


def option_kinds(s: str) -> tuple[str, ...]:
    from ..planning.sensitivity import ALL_OPTION_KINDS as OPTION_KINDS

    v = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [x for x in v if x not in OPTION_KINDS]
    if not v or bad:
        raise argparse.ArgumentTypeError(f"options are a comma-separated subset of {','.join(OPTION_KINDS)}; got '{s}'")
    return v


def device_map_arg(s: str) -> str | dict[str, str | int]:
    """--teacher-device-map: auto, balanced, sequential, or a JSON file mapping module names to devices."""
    from ..errors import SettingError
    from ..session import read_device_map

    try:
        return read_device_map(s)
    except SettingError as e:
        raise argparse.ArgumentTypeError(str(e).replace("`teacher_device_map`", "--teacher-device-map")) from None


def train_text(s: str):
    """argparse type of --train-text NAME=PATH[:WEIGHT]: a named text source of the training mixture (a file or
    folder that exists; WEIGHT a finite number > 0, 1 by default) as a ``TrainText``."""
    from ..data.text import TrainText

    name, eq, rest = s.partition("=")
    name, path, w = name.strip(), rest, 1.0
    head, colon, weight = rest.rpartition(":")
    if colon:
        try:
            path, w = head, float(weight)
        except ValueError:
            pass  # a colon of the path itself
    if not eq or not name or not path or "=" in name:
        raise argparse.ArgumentTypeError(f"--train-text takes NAME=PATH[:WEIGHT] (a file or folder of text), got '{s}'")
    if name == "data":
        raise argparse.ArgumentTypeError("--train-text: the name 'data' is the data split's own text (its weight is "
                                         "--data-weight); use another name")
    if not math.isfinite(w) or w <= 0:
        raise argparse.ArgumentTypeError(f"--train-text {name}: WEIGHT must be a finite number > 0, got '{weight}'")
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(f"--train-text {name}: '{path}' is neither a file nor a folder")
    return TrainText(name, path, w)


def eval_text(s: str):
    """argparse type of --eval-text: NAME=PATH, a simple identifier and a file or folder that holds text (an
    ``EvalText``)."""
    from ..data.text import DataError
    from ..errors import SettingError
    from ..evaluation.texts import parse_text

    try:
        return parse_text(s)
    except (SettingError, DataError) as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("`texts`: ")) from None  # argparse names the flag


class EvalTexts(argparse.Action):
    """--eval-text, repeatable: the texts in the order given; a name given twice is refused."""

    def __call__(self, parser, namespace, values, *rest):
        given = getattr(namespace, self.dest, None)
        given = list(given) if isinstance(given, list) else []  # the recipe parser's placeholder: none yet
        if any(t.name == values.name for t in given):
            raise argparse.ArgumentError(self, f"the name '{values.name}' is given twice")
        setattr(namespace, self.dest, given + [values])
