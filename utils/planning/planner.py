"""The planner: from a sensitivity map, one option per layer (a merge takes two) that meets a latency or parameter
budget at the least summed cost; a knapsack over layers, solved exactly on a conservative grid."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

# --cost -> map metric (perplexity: the student's over the teacher's, minus 1; causal LMs)
COSTS = {"kl": "kl_teacher_student", "top1": "top1_drop", "agreement": "agreement_drop", "ppl": "perplexity_increase"}


class PlanError(ValueError):
    """A budget the map cannot meet, or a map that cannot be planned from; the message says what the map reaches."""


@dataclass
class Plan:
    choices: dict[int, str]  # first teacher layer -> option name
    cost: float
    saved: float
    needed: float
    budget: str
    lines: list[str]


@dataclass
class _Budget:
    """What a target asks of the map: how much to save, of which quantity, in words."""

    needed: float
    gain_key: str  # the map entries' saving: latency_saved_ms or params_saved
    unit: str
    text: str


@dataclass(frozen=True)
class Target:
    """One budget: a ``speedup`` over the teacher in ``speed`` (``prefill``: a whole sequence at once, the encoder
    pass of a masked LM; ``decode``: one new token after a KV cache), at most ``params`` parameters, or at most
    ``kv_cache`` times the teacher's KV-cache bytes per token."""

    speedup: float | None = None
    params: int | None = None
    kv_cache: float | None = None
    speed: str = "prefill"

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.speedup, self.params, self.kv_cache)) != 1:
            raise ValueError("give exactly one of a target speed-up, parameter count or KV-cache fraction")
        if self.speed not in ("prefill", "decode"):
            raise ValueError(f"`speed` must be prefill or decode, got '{self.speed}'")

    @property
    def label(self) -> str:
        """For tables: 1.5x (prefill), decode 2x, KV 0.333, params 18,000,000."""
        if self.speedup is not None:
            return f"{self.speedup:g}x" if self.speed == "prefill" else f"decode {self.speedup:g}x"
        return f"params {self.params:,}" if self.params is not None else f"KV {self.kv_cache:.3g}"

    @property
    def name(self) -> str:
        if self.speedup is not None:
            return f"{self.speed}_speedup{self.speedup:g}"
        return f"params{self.params}" if self.params is not None else f"kv_cache{self.kv_cache:g}"


def choose_plan(smap: dict[str, Any], target_speedup: float | None = None, target_params: int | None = None, *,
                target_kv_cache: float | None = None, speed: str = "prefill", cost: str = "kl",
                grid_steps: int = 1000) -> Plan:
    """One option (or none) per layer, a merge taking its layer and the next, saving at least the budget's need
    (ms of the map's timings, parameters or KV-cache bytes per token) at the least summed ``cost`` from the map.

    Exact dynamic programme over layers on a grid of ``grid_steps`` steps of the need; each option's saving is
    rounded *down* to the grid, so a plan the programme accepts meets the budget with the unrounded values too.
    """
    target = Target(target_speedup, target_params, target_kv_cache, speed)
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}, got '{cost}'")
    metric = COSTS[cost]
    problem = budget_problem(smap, target_speedup, target_params, target_kv_cache=target_kv_cache, speed=speed)
    if problem:
        raise PlanError(problem)
    b = _budget(smap, target)
    lines = list(smap.get("runtime_notes", []))  # a map filtered for a runtime (planning.runtimes)
    lines.append(f"budget: {b.text}; need to save {b.needed:,.2f} {b.unit}; cost: {metric} of each unit alone in "
                 "the teacher (summed over units: an approximation, units interact)")
    cands = _candidates(smap, metric, budget=b, lines=lines)
    if b.needed <= 0:
        lines.append("the teacher already meets the budget: nothing to simplify")
        return Plan({}, 0.0, 0.0, b.needed, b.text, lines)
    n = smap["layers"]
    step, grid_steps = _grid(cands, b, grid_steps)
    best, pick = _knapsack(cands, n, gain_key=b.gain_key, step=step, grid_steps=grid_steps)
    if best[0][grid_steps] == math.inf:
        most = _max_saving(cands, n, b.gain_key)
        raise PlanError(f"the budget cannot be met from this map: {b.text} needs {b.needed:,.2f} {b.unit} saved, "
                        f"the map's options{runtime_note(smap)} save at most {most:,.2f}; map more options (more "
                        "heads settings, merges) or relax the target")
    return _read_plan(pick, cands, budget=b, step=step, grid_steps=grid_steps, n=n, lines=lines)


def _grid(cands: dict[int, list[dict[str, Any]]], b: _Budget, grid_steps: int) -> tuple[float, int]:
    """The knapsack's grid: ``grid_steps`` steps of the need, or, where every saving is a whole number (bytes,
    parameters) with a common divisor that makes a grid no finer than that, steps of that divisor, exact (1/3 of a
    KV cache is then reachable by one key/value head in every layer, not lost to rounding)."""
    savings = [e[b.gain_key] for c in cands.values() for e in c]
    if savings and all(float(v).is_integer() for v in savings):
        g = math.gcd(*(int(v) for v in savings))
        steps = math.ceil(b.needed / g - 1e-6)
        if 0 < steps <= grid_steps:
            return float(g), steps
    return b.needed / grid_steps, grid_steps


SPEED_KEYS = {"prefill": ("encoder_ms", "latency_saved_ms", "prefill"),
              "decode": ("decode_ms", "decode_saved_ms", "decode step")}


def _budget(smap: dict[str, Any], target: Target) -> _Budget:
    if target.speedup is not None:
        total_key, gain_key, what = SPEED_KEYS[target.speed]
        if total_key not in smap.get("timing", {}):
            raise PlanError(f"the map has no {what} timings (a masked LM has no decode step); plan for prefill")
        total, s = smap["timing"][total_key], target.speedup
        return _Budget(total * (1 - 1 / s), gain_key, "ms",
                       f"{what} latency <= {total / s:.2f} ms ({s:g}x of the teacher's {total:.2f} ms, timings of "
                       "the map)")
    if target.kv_cache is not None:
        total = smap["teacher_kv_bytes_per_token"]
        return _Budget(total * (1 - target.kv_cache), "kv_bytes_saved", "KV-cache bytes per token",
                       f"KV cache <= {total * target.kv_cache:,.0f} bytes per token ({target.kv_cache:g} of the "
                       f"teacher's {total:,})")
    total = smap["teacher_params"]
    return _Budget(float(total - target.params), "params_saved", "parameters",
                   f"parameters <= {target.params:,} (teacher {total:,})")


def _candidates(smap: dict[str, Any], metric: str, *, budget: _Budget, lines: list[str]
                ) -> dict[int, list[dict[str, Any]]]:
    """The map's entries that save something, by layer, with their cost; listed in ``lines`` by cost per saving."""
    b = budget
    cands: dict[int, list[dict[str, Any]]] = {i: [] for i in range(smap["layers"])}
    for e in smap["entries"]:
        if metric not in e:
            raise PlanError(f"the map has no '{metric}' (a teacher without an MLM head?): use another `cost`")
        e = {**e, "cost": max(0.0, float(e[metric]))}
        if e[b.gain_key] > 0:
            cands[e["layer"]].append(e)
    lines.append("candidates (cost per " + b.unit + " saved, lowest first):")
    for e in sorted((e for c in cands.values() for e in c), key=lambda e: e["cost"] / e[b.gain_key]):
        lines.append(f"  layer {e['layer']} {e['option']:<12} cost {e['cost']:.4g}  saves {e[b.gain_key]:,.2f} "
                     f"{b.unit}  ratio {e['cost'] / e[b.gain_key]:.3g}")
    return cands


def _steps(e: dict[str, Any], gain_key: str, step: float) -> int:
    """An entry's saving in grid steps, rounded down."""
    return int(math.floor(e[gain_key] / step + 1e-9))


def _knapsack(cands: dict[int, list[dict[str, Any]]], n: int, *, gain_key: str, step: float, grid_steps: int
              ) -> tuple[list[list[float]], list[list[Any]]]:
    """best[i][g]: least cost for layers i.. to still save g grid steps (g capped at the need); pick: the choice."""
    inf = math.inf
    best = [[inf] * (grid_steps + 1) for _ in range(n + 2)]
    pick: list[list[Any]] = [[None] * (grid_steps + 1) for _ in range(n + 2)]
    for g in range(grid_steps + 1):
        best[n][g] = 0.0 if g == 0 else inf
        best[n + 1][g] = best[n][g]
    for i in range(n - 1, -1, -1):
        for g in range(grid_steps + 1):
            b, p = best[i + 1][g], ("keep", None)
            for e in cands[i]:
                c = e["cost"] + best[i + len(e["covers"])][max(0, g - _steps(e, gain_key, step))]
                if c < b - 1e-15:
                    b, p = c, ("take", e)
            best[i][g], pick[i][g] = b, p
    return best, pick


def _read_plan(pick: list[list[Any]], cands: dict[int, list[dict[str, Any]]], *, budget: _Budget, step: float,
               grid_steps: int, n: int, lines: list[str]) -> Plan:
    """The choices along the knapsack's picks, each explained in ``lines`` with the cheapest alternatives."""
    b = budget
    choices, i, g, saved, total_cost = {}, 0, grid_steps, 0.0, 0.0
    lines.append("plan (exact knapsack over layers on the grid; a merge uses two layers):")
    while i < n:
        what, e = pick[i][g]
        if what == "keep":
            lines.append(f"  layer {i}: keep (teacher)")
            i += 1
            continue
        choices[i] = e["option"]
        saved += e[b.gain_key]
        total_cost += e["cost"]
        alts = sorted((a for a in cands[i] if a["option"] != e["option"]), key=lambda a: a["cost"])[:2]
        alt = "; ".join(f"{a['option']} cost {a['cost']:.4g} saves {a[b.gain_key]:,.2f}" for a in alts)
        others = f" (cheapest others: {alt})" if alt else ""
        lines.append(f"  layer {i}{'+' + str(i + 1) if e['kind'] == 'merge' else ''}: {e['option']} — cost "
                     f"{e['cost']:.4g}, saves {e[b.gain_key]:,.2f} {b.unit}{others}")
        g = max(0, g - _steps(e, b.gain_key, step))
        i += len(e["covers"])
    lines.append(f"total: cost {total_cost:.4g}, saves {saved:,.2f} of {b.needed:,.2f} {b.unit} needed")
    return Plan(choices, total_cost, saved, b.needed, b.text, lines)


def budget_problem(smap: dict[str, Any], target_speedup: float | None = None, target_params: int | None = None, *,
                   target_kv_cache: float | None = None, speed: str = "prefill") -> str | None:
    """Why the budget cannot be met from the options of ``smap``, saying what they reach at most; None if it can
    (or if the map was not timed and the budget is a speed-up). Works on a map of untrained units too
    (``reach_map``), so a budget can be refused before any unit is trained."""
    target = Target(target_speedup, target_params, target_kv_cache, speed)
    if target_speedup is not None and not target_speedup >= 1:
        return f"`target_speedup` must be >= 1 (1 is the teacher itself), got {target_speedup:g}"
    if target_kv_cache is not None and not 0 <= target_kv_cache <= 1:
        return f"`target_kv_cache` is a fraction of the teacher's KV cache in [0, 1], got {target_kv_cache:g}"
    if target_speedup is not None and "timing" not in smap:
        return None
    try:
        b = _budget(smap, target)
    except PlanError as e:
        return str(e)
    cands: dict[int, list[dict[str, Any]]] = {i: [] for i in range(smap["layers"])}
    for e in smap["entries"]:
        if e.get(b.gain_key, 0) > 0:
            cands[e["layer"]].append(e)
    most = _max_saving(cands, smap["layers"], b.gain_key)
    if target_speedup is not None:  # timing noise cannot save more than the layers take: the rest of the model stays
        timing = smap["timing"]
        layer_key = "layer_ms" if speed == "prefill" else "decode_layer_ms"
        most = min(most, sum(timing.get(layer_key, [])) or most)
        if speed == "prefill" and timing.get("embeddings_ms"):  # layers timed alone can add up to more than the model
            most = min(most, timing["encoder_ms"] - timing["embeddings_ms"])
    if b.needed <= most + 1e-9 * abs(b.needed):  # 1/3 of a KV cache is 1 - 1/3 in floating point: not quite 2/3
        return None
    if target_speedup is not None:
        total = b.needed / (1 - 1 / target_speedup)
        reach = total / (total - most) if most < total else math.inf
        return (f"`target_speedup` {target_speedup:g} cannot be met: the map's options{runtime_note(smap)} reach "
                f"at most {reach:.2f}x ({SPEED_KEYS[speed][2]} {total:.2f} ms, at most {most:.2f} ms saved, timings "
                f"on {smap.get('device', 'this device')}); ask for less, or map more options (`options`, `heads_set`)")
    if target_kv_cache is not None:
        total = smap["teacher_kv_bytes_per_token"]
        return (f"`target_kv_cache` {target_kv_cache:g} cannot be met: the map's options{runtime_note(smap)} keep "
                f"at least {(total - most) / total:.3f} of the teacher's KV cache; ask for more, or map more options")
    total = smap["teacher_params"]
    return (f"`target_params` {target_params:,} cannot be met: the map's options{runtime_note(smap)} remove at most "
            f"{most:,.0f} of the teacher's {total:,} parameters (the smallest student has {total - most:,.0f}); ask "
            "for more, or map more options (`options`, `heads_set`)")


def runtime_note(smap: dict[str, Any]) -> str:
    """' that <runtime> runs' for a map filtered for a runtime (``planning.runtimes.runtime_map``), else ''."""
    return f" that {smap['runtime']} runs" if smap.get("runtime") not in (None, "pytorch") else ""


def _max_saving(cands: dict[int, list[dict[str, Any]]], n: int, key: str) -> float:
    best = [0.0] * (n + 2)
    for i in range(n - 1, -1, -1):
        best[i] = max([best[i + 1]] + [e[key] + best[i + len(e["covers"])] for e in cands[i]])
    return best[0]


# a speed plan's re-timing (``aim``): the timings allowed, and how far above the target two of them must measure
RETIME_ROUNDS = 8
SPEED_MARGIN = 0.03


def _timing_line(n: int, ask: float, timings: list[dict[str, float]], *, again: bool) -> str:
    """plan.log's line for timing ``n`` of the plan asked for ``ask`` (its timings so far)."""
    last = timings[-1]
    extra = ", ".join(f"{k.removesuffix('_ms')} {v:.2f} ms" for k, v in last.items() if k.endswith("_ms"))
    slower = min(t["measured_speedup"] for t in timings)
    return (f"re-timing {n}: planned for {ask:.3f}x, measured {last['measured_speedup']:.3f}x"
            + (" (this plan, timed before)" if again else f" ({extra})" if extra else "")
            + (f", {slower:.3f}x at the slower of its two timings" if len(timings) == 2 and not again else ""))


def verdict(speedups: list[float], bar: float) -> bool | None:
    """The rule a speed plan is kept by: two timings, both at least ``bar``. False once one measured under it, True
    when two did and none under, None while it needs another timing."""
    if any(x < bar for x in speedups):
        return False
    return True if len(speedups) >= 2 else None


def meets_as_measured(measure: Callable[[], float], bar: float) -> bool:
    """``verdict`` on timings taken (``measure`` returns one speed-up) until it is decided."""
    speedups: list[float] = []
    while (v := verdict(speedups, bar)) is None:
        speedups.append(measure())
    return v


def aim(target: float, plan_for: Callable[[float], Plan], measure: Callable[[Plan], dict[str, float]], *,
        rounds: int, tolerance: float = 0.02,
        margin: float = SPEED_MARGIN) -> tuple[Plan, list[dict[str, float]], list[str]]:
    """Search the speed-up to ask the planner for, so that the plan's *measured* speed-up meets ``target`` with the
    least overshoot (the map's summed savings only guess the composed model's). A plan meets it when two timings
    both measure at least ``target * (1 + margin)`` (one timing on a loaded machine moves by a few percent); it
    counts at the slower. The ask rises by the shortfall while plans fall short, falls by the overshoot while they
    overshoot, then bisects between the highest short ask and the lowest that met. Stops within ``tolerance`` above
    the bar, when bisection finds no new plan, or after ``rounds`` timings. ``measure`` returns at least
    ``measured_speedup``. Returns (the plan of the lowest ask that met, else the last; every timing; plan.log lines).
    """
    bar = target * (1 + margin)
    ask, short, met = target, None, None  # met: (ask, plan, speed-up) of the lowest ask that met
    plan = plan_for(ask)
    timed: dict[tuple, list[dict[str, float]]] = {}
    trace: list[dict[str, float]] = []
    lines: list[str] = []
    for _ in range(4 * rounds):
        key = tuple(sorted(plan.choices.items()))
        before = timed.setdefault(key, [])
        again = verdict([t["measured_speedup"] for t in before], bar) is not None  # a plan timed enough already
        if not again:
            if len(trace) == rounds:
                break
            before.append(measure(plan))
            trace.append({"asked": ask, **before[-1]})
        got = min(t["measured_speedup"] for t in before)  # the slower of its timings
        if again and short is not None and met is not None:  # bisection found no plan between the two: done
            break
        lines.append(_timing_line(len(trace), ask, before, again=again))
        if verdict([t["measured_speedup"] for t in before], bar) is None:
            if len(trace) == rounds:
                lines.append(f"re-timing: no timing left to confirm {got:.3f}x")
                break
            continue  # time the same plan again before it counts
        if got >= bar:
            if met is None or ask < met[0]:
                met = (ask, plan, got)
            if got <= bar * (1 + tolerance):
                break
        elif short is None or ask > short:
            short = ask
        if met is not None and short is not None and met[0] - short < 1e-3 * target:
            break
        nxt = (short + met[0]) / 2 if met is not None and short is not None else \
            ask * bar / got * (1.005 if met is None else 1.0)
        try:
            plan = plan_for(nxt)
        except PlanError as e:
            lines.append(f"re-timing: cannot ask for {nxt:.3f}x ({e})")
            break
        ask = nxt
    if met is None:
        lines.append(f"re-timing: no plan met {target:g}x with a {margin:.0%} margin in {len(trace)} timings (twice "
                     "each); keeping the last plan")
        return plan, trace, lines
    lines.append(f"re-timing: the plan asked for {met[0]:.3f}x meets {target:g}x with a {margin:.0%} margin as "
                 f"measured ({met[2]:.3f}x at the slower of two timings), the lowest ask that did")
    return met[1], trace, lines
