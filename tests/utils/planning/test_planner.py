"""The planner's search for the ask whose plan meets a speed-up as measured (``planner.aim``), with a fake planner
and fake timings (plans are the ask rounded to 0.01, each 'measured' by a function of it); exact byte budgets."""
from __future__ import annotations

import pytest

from utils.planning.planner import Plan, PlanError, aim, choose_plan


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
    plan, trace, lines = aim(1.5, plan_for, measure, rounds=5)
    got = 1.2 * float(plan.choices[0])
    assert 1.5 <= got <= 1.5 * 1.02 and got < trace[0]["measured_speedup"]
    assert trace[0]["asked"] == 1.5 and lines[0].startswith("re-timing 1: planned for 1.500x, measured 1.800x")
    assert "meets 1.5x as measured" in lines[-1]


def test_a_short_plan_is_raised_until_it_meets():
    measure, _ = timer(lambda level: 0.9 * level)
    plan, trace, _ = aim(1.5, plan_for, measure, rounds=5)
    assert trace[0]["measured_speedup"] < 1.5 <= 0.9 * float(plan.choices[0])


def test_between_a_short_and_an_overshooting_plan_it_bisects_and_keeps_the_one_that_met():
    measure, calls = timer(lambda level: 1.4 if level < 1.6 else 1.9)  # nothing lands between 1.4x and 1.9x
    plan, trace, lines = aim(1.5, plan_for, measure, rounds=4)
    assert len(trace) == 4 == len(set(calls)) == len(calls)  # every timing a different plan
    assert [t["measured_speedup"] >= 1.5 for t in trace] == [False, True, False, False]
    assert trace[1]["asked"] > trace[2]["asked"] > trace[0]["asked"]  # the third ask lies between the first two
    assert 1.9 == trace[1]["measured_speedup"] and plan.choices == plan_for(trace[1]["asked"]).choices


def test_a_target_out_of_reach_keeps_the_last_plan_and_says_so():
    measure, calls = timer(lambda level: 1.0)
    plan, trace, lines = aim(1.5, plan_for, measure, rounds=3)
    assert len(trace) == 3 and "still short of 1.5x after 3 timings" in lines[-1]
    measure, calls = timer(lambda level: 1.0)
    _, trace, lines = aim(1.5, plan_for, measure, rounds=10)
    assert any("cannot ask" in x for x in lines) and "still short of 1.5x" in lines[-1]


@pytest.mark.parametrize("rounds", [1, 2])
def test_at_most_rounds_timings(rounds):
    measure, calls = timer(lambda level: 1.4 if level < 1.6 else 1.9)
    aim(1.5, plan_for, measure, rounds=rounds)
    assert len(calls) == rounds


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
    assert calls == ["slow", "fast"] and plan.choices == {0: "fast"} and len(lines) == 3
