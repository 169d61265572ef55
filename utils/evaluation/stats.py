"""Paired tests of two models on the same items (sentences, tokens, windows): McNemar's test of paired right / wrong
outcomes, the sign test and the paired t-test of paired values. No SciPy: the binomial tail is summed exactly in
integers, Student's t from the regularised incomplete beta function.
"""
from __future__ import annotations

import math
from typing import Any, Sequence


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of ``k`` successes in ``n`` fair coin flips: 2 P(X <= min(k, n - k)), at most 1.

    Summed in integers (one term from the last), so it is exact for any ``n``; underflows to 0.0 below ~1e-308."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 1.0
    k = min(k, n - k)
    term = total = 1  # C(n, 0)
    for i in range(1, k + 1):
        term = term * (n - i + 1) // i
        total += term
    return min(1.0, 2 * total / 2 ** n)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test of paired outcomes: only a (a right, b wrong) vs only b; z with no correction."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    z = 0.0 if n == 0 else (only_a - only_b) / math.sqrt(n)
    return {"only_a": only_a, "only_b": only_b, "z": z, "p": binomial_two_sided(min(only_a, only_b), n)}


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Exact two-sided sign test of paired values: how often a < b against how often a > b (ties left out)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    lower = sum(1 for x, y in zip(a, b) if x < y)
    higher = sum(1 for x, y in zip(a, b) if x > y)
    return {"a_lower": lower, "a_higher": higher, "ties": len(a) - lower - higher,
            "p": binomial_two_sided(min(lower, higher), lower + higher)}


def paired_t(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired t-test of a - b (two-sided): mean difference, its standard error, t, degrees of freedom, p."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = math.fsum(d) / n
    var = math.fsum((x - mean) ** 2 for x in d) / (n - 1)
    se = math.sqrt(var / n)
    if se == 0:
        return {"mean_diff": mean, "se": 0.0, "t": 0.0 if mean == 0 else math.copysign(math.inf, mean), "df": n - 1,
                "p": 1.0 if mean == 0 else 0.0}
    t = mean / se
    return {"mean_diff": mean, "se": se, "t": t, "df": n - 1, "p": student_t_two_sided(t, n - 1)}


def student_t_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom: I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2, 0.5, df / (df + t * t))


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), taken on the
    side of x where it converges fast."""
    if not 0 <= x <= 1:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0, 1):
        return float(x)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float, *, eps: float = 1e-15, tiny: float = 1e-300) -> float:
    """The continued fraction of I_x(a, b) (without its front factor), evaluated from the top."""
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            return h
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, x={x}")


def format_p(p: float) -> str:
    """A p-value for a table: two significant digits, or "< 1e-300" where it underflows to 0."""
    return "< 1e-300" if p == 0 else f"{p:.2g}"

