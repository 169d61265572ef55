"""The paired tests of utils.evaluation.stats against values computed by hand or known in closed form."""
from __future__ import annotations

import math

import pytest

from utils.evaluation.stats import (binomial_two_sided, incomplete_beta, mcnemar, paired_t, sign_test,
                                    student_t_two_sided)


def test_binomial_tail_is_exact():
    assert binomial_two_sided(0, 6) == 2 / 64
    assert binomial_two_sided(6, 6) == 2 / 64  # the same tail from the other side
    assert binomial_two_sided(1, 3) == 1.0  # 2 * 4/8, capped
    assert binomial_two_sided(2, 10) == pytest.approx(2 * (1 + 10 + 45) / 1024, rel=1e-15)
    assert binomial_two_sided(0, 0) == 1.0
    # large n: symmetric around n/2, ~ the normal tail, no overflow
    p = binomial_two_sided(14_500 - 300, 29_000)
    assert p == pytest.approx(math.erfc(300 / math.sqrt(29_000 / 4) / math.sqrt(2)), rel=0.05)
    assert binomial_two_sided(0, 5000) == 0.0  # below the smallest float: 0, not an error
    with pytest.raises(ValueError, match="0 <= k <= n"):
        binomial_two_sided(4, 3)


def test_student_t_and_incomplete_beta_known_values():
    assert student_t_two_sided(2.0, 10) == pytest.approx(0.073388034770740, rel=1e-9)
    assert student_t_two_sided(1.0, 1) == pytest.approx(0.5, rel=1e-12)  # Cauchy: 1 - 2 atan(1) / pi
    assert student_t_two_sided(3.0, 2) == pytest.approx(1 - 3 / math.sqrt(11), rel=1e-12)  # closed form for df 2
    assert student_t_two_sided(1.959963985, 10 ** 8) == pytest.approx(0.05, rel=1e-6)  # the normal limit
    assert student_t_two_sided(0.0, 7) == 1.0 and student_t_two_sided(math.inf, 7) == 0.0
    assert incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248, rel=1e-12)  # 1 - sum_{j<2} C(4,j) .4^j .6^(4-j)
    assert incomplete_beta(3, 2, 0.6) == pytest.approx(1 - 0.5248, rel=1e-12)  # I_x(a,b) = 1 - I_{1-x}(b,a)


def test_paired_tests_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.5, 2.5, 2.0, 3.0]  # differences .5, -.5, 1, 1: mean .5, sd sqrt(.5)
    r = paired_t(a, b)
    assert r["mean_diff"] == pytest.approx(0.5) and r["df"] == 3
    assert r["t"] == pytest.approx(0.5 / math.sqrt(0.5 / 4))
    assert r["p"] == pytest.approx(student_t_two_sided(r["t"], 3))
    assert paired_t([1, 2], [1, 2])["p"] == 1.0 and paired_t([2, 3], [1, 2])["p"] == 0.0  # no spread
    s = sign_test(a + [7.0], b + [7.0])
    assert (s["a_lower"], s["a_higher"], s["ties"]) == (1, 3, 1) and s["p"] == binomial_two_sided(1, 4)
    m = mcnemar([True, True, False, False, True], [False, False, False, True, True])
    assert (m["only_a"], m["only_b"]) == (2, 1) and m["p"] == 1.0 and m["z"] == pytest.approx(1 / math.sqrt(3))
    for f in (paired_t, sign_test, mcnemar):
        with pytest.raises(ValueError, match="equal lengths"):
            f([1, 2], [1])
    with pytest.raises(ValueError, match="at least 2"):
        paired_t([1.0], [2.0])
