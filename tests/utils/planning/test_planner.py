"""The planner's search for the ask whose plan meets a speed-up as measured (``planner.aim``), with a fake planner
and fake timings (plans are the ask rounded to 0.01, each 'measured' by a function of it); exact byte budgets."""
from __future__ import annotations

import pytest

from utils.planning.planner import Plan, PlanError, aim, choose_plan, meets_as_measured, verdict


def plan_for(ask: float) -> Plan:
    if ask > 5:
        raise PlanError("the map reaches 5x")
    return Plan({0: f"{round(ask, 2):.2f}"}, cost=ask, saved=ask, needed=ask, budget="speed", lines=[])


def timer(speedup):
    calls = []

    def measure(plan: Plan) -> dict[str, float]:
        calls.append(plan.choices[0])
        return {"measured_speedup": speedup(float(plan.choices[0])), "teacher_ms": 10.0}
    return measure, calls


def test_an_overshooting_plan_is_traded_for_a_cheaper_one_that_still_meets():
    measure, calls = timer(lambda level: 1.2 * level)  # the map underestimates: the first plan overshoots (1.8x)
    plan, trace, lines = aim(1.5, plan_for, measure, rounds=8)
    got = 1.2 * float(plan.choices[0])
    assert 1.5 * 1.03 <= got <= 1.5 * 1.03 * 1.02 and got < trace[0]["measured_speedup"]
    assert calls.count(plan.choices[0]) == 2  # the accepted plan was timed twice
    assert trace[0]["asked"] == 1.5 and lines[0].startswith("re-timing 1: planned for 1.500x, measured 1.800x")
    assert "meets 1.5x with a 3% margin as measured" in lines[-1]


def test_the_margin_is_kept_above_the_target():
    for margin in (0.0, 0.03, 0.1):
        measure, _ = timer(lambda level: level)
        plan, _, _ = aim(1.5, plan_for, measure, rounds=10, margin=margin)
        assert 1.5 * (1 + margin) <= float(plan.choices[0]) <= 1.5 * (1 + margin) * 1.02 + 0.01


def test_a_plan_that_meets_once_and_falls_short_when_timed_again_is_not_kept():
    seen: dict[str, int] = {}

    def measure(plan: Plan) -> dict[str, float]:
        level = float(plan.choices[0])
        seen[plan.choices[0]] = seen.get(plan.choices[0], 0) + 1
        if level >= 1.7:
            return {"measured_speedup": 1.8}
        return {"measured_speedup": 1.6 if seen[plan.choices[0]] == 1 else 1.45}  # a lucky first timing

    plan, trace, lines = aim(1.5, plan_for, measure, rounds=8)
    assert float(plan.choices[0]) >= 1.7 and seen[plan.choices[0]] == 2
    assert trace[0]["measured_speedup"] == 1.6 and trace[1]["measured_speedup"] == 1.45  # the same plan, again
    assert "1.450x at the slower of its two timings" in lines[1]


def test_a_short_plan_is_raised_until_it_meets():
    measure, _ = timer(lambda level: 0.9 * level)
    plan, trace, _ = aim(1.5, plan_for, measure, rounds=5)
    assert trace[0]["measured_speedup"] < 1.5 * 1.03 <= 0.9 * float(plan.choices[0])


def test_between_a_short_and_an_overshooting_plan_it_bisects_and_keeps_the_one_that_met():
    measure, calls = timer(lambda level: 1.4 if level < 1.6 else 1.9)  # nothing lands between 1.4x and 1.9x
    plan, trace, lines = aim(1.5, plan_for, measure, rounds=5)
    assert len(trace) == 5 and len(calls) == 5 and len(set(calls)) == 4  # only the plan that met timed twice
    assert [t["measured_speedup"] >= 1.5 for t in trace] == [False, True, True, False, True]
    assert trace[1]["asked"] > trace[4]["asked"] > trace[3]["asked"] > trace[0]["asked"]  # bisecting
    # the last plan met once, with no timing left to confirm it: the confirmed one is kept
    assert "no timing left to confirm" in lines[-2]
    assert 1.9 == trace[1]["measured_speedup"] and plan.choices == plan_for(trace[1]["asked"]).choices


def test_a_target_out_of_reach_keeps_the_last_plan_and_says_so():
    measure, calls = timer(lambda level: 1.0)
    plan, trace, lines = aim(1.5, plan_for, measure, rounds=3)
    assert len(trace) == 3 and "no plan met 1.5x with a 3% margin in 3 timings" in lines[-1]
    measure, calls = timer(lambda level: 1.0)
    _, trace, lines = aim(1.5, plan_for, measure, rounds=10)
    assert any("cannot ask" in x for x in lines) and "no plan met 1.5x" in lines[-1]


@pytest.mark.parametrize("rounds", [1, 2])
def test_at_most_rounds_timings(rounds):
    measure, calls = timer(lambda level: 1.4 if level < 1.6 else 1.9)
    _, _, lines = aim(1.5, plan_for, measure, rounds=rounds)
    assert len(calls) == rounds
    assert ("no timing left to confirm 1.900x" in lines[-2]) == (rounds == 2)


def test_a_third_of_the_kv_cache_is_met_exactly_by_one_kv_head_in_every_layer():
    """1 - 1/3 is not 2/3 in floating point, and a grid of the need rounds 512-byte savings down: neither may make
    the exact budget unreachable."""
    smap = {"layers": 30, "teacher_kv_bytes_per_token": 23040,
            "entries": [{"layer": i, "option": "kv 1", "kind": "block", "covers": [i], "kv_bytes_saved": 512,
                         "kl_teacher_student": 0.01} for i in range(30)]}
    plan = choose_plan(smap, target_kv_cache=1 / 3)
    assert len(plan.choices) == 30 and plan.saved == 15360
    with pytest.raises(PlanError, match="keep at least 0.333"):
        choose_plan(smap, target_kv_cache=0.33)



def test_bisection_stops_when_no_plan_lies_between():
    def two_plans(ask: float) -> Plan:
        return Plan({0: "fast" if ask >= 1.6 else "slow"}, cost=ask, saved=ask, needed=ask, budget="speed", lines=[])

    calls = []

    def measure(plan: Plan) -> dict[str, float]:
        calls.append(plan.choices[0])
        return {"measured_speedup": 1.9 if plan.choices[0] == "fast" else 1.4}

    plan, trace, lines = aim(1.5, two_plans, measure, rounds=5)
    assert calls == ["slow", "fast", "fast"] and plan.choices == {0: "fast"} and len(lines) == 4


@pytest.mark.parametrize("speedups, expected", [
    ([], None), ([1.6], None), ([1.6, 1.55], True), ([1.4], False), ([1.6, 1.4], False), ([1.5, 1.5], True),
])
def test_the_two_timing_rule(speedups, expected):
    assert verdict(speedups, bar=1.5) is expected


def test_a_baseline_is_timed_until_the_rule_decides():
    for timings, met, taken in (([1.6, 1.7, 9.0], True, 2), ([1.4, 9.0], False, 1), ([1.6, 1.4, 9.0], False, 2)):
        it = iter(timings)
        left = len(timings)
        assert meets_as_measured(lambda: next(it), bar=1.5) is met
        assert len(list(it)) == left - taken  # no timing beyond the ones that decided it
