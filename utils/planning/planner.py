"""The planner: from a sensitivity map, one option per layer (a merge takes two) that meets a latency or parameter
budget at the least summed cost; a knapsack over layers, solved exactly on a conservative grid."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

COSTS = {"kl": "kl_teacher_student", "top1": "top1_drop", "agreement": "agreement_drop"}  # --cost -> map metric


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


def choose_plan(smap: dict[str, Any], target_speedup: float | None = None, target_params: int | None = None, *,
                cost: str = "kl", grid_steps: int = 1000) -> Plan:
    """One option (or none) per layer, a merge taking its layer and the next, saving at least the budget's need
    (encoder ms from the map's timings, or parameters, exactly) at the least summed ``cost`` from the map.

    Exact dynamic programme over layers on a grid of ``grid_steps`` steps of the need; each option's saving is
    rounded *down* to the grid, so a plan the programme accepts meets the budget with the unrounded values too.
    """
    if (target_speedup is None) == (target_params is None):
        raise ValueError("give exactly one of a target speed-up or a target parameter count")
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}, got '{cost}'")
    metric = COSTS[cost]
    problem = budget_problem(smap, target_speedup, target_params)
    if problem:
        raise PlanError(problem)
    b = _budget(smap, target_speedup, target_params)
    lines = [f"budget: {b.text}; need to save {b.needed:,.2f} {b.unit}; cost: {metric} of each unit alone in the "
             "teacher (summed over units: an approximation, units interact)"]
    cands = _candidates(smap, metric, budget=b, lines=lines)
    if b.needed <= 0:
        lines.append("the teacher already meets the budget: nothing to simplify")
        return Plan({}, 0.0, 0.0, b.needed, b.text, lines)
    n = smap["layers"]
    step = b.needed / grid_steps
    best, pick = _knapsack(cands, n, gain_key=b.gain_key, step=step, grid_steps=grid_steps)
    if best[0][grid_steps] == math.inf:
        most = _max_saving(cands, n, b.gain_key)
        raise PlanError(f"the budget cannot be met from this map: {b.text} needs {b.needed:,.2f} {b.unit} saved, "
                        f"the map's options save at most {most:,.2f}; map more options (more heads settings, "
                        "merges) or relax the target")
    return _read_plan(pick, cands, budget=b, step=step, grid_steps=grid_steps, n=n, lines=lines)


def _budget(smap: dict[str, Any], target_speedup: float | None, target_params: int | None) -> _Budget:
    if target_speedup is not None:
        total = smap["timing"]["encoder_ms"]
        return _Budget(total * (1 - 1 / target_speedup), "latency_saved_ms", "ms",
                       f"encoder latency <= {total / target_speedup:.2f} ms ({target_speedup:g}x of the teacher's "
                       f"{total:.2f} ms, timings of the map)")
    total = smap["teacher_params"]
    return _Budget(float(total - target_params), "params_saved", "parameters",
                   f"parameters <= {target_params:,} (teacher {total:,})")


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


def budget_problem(smap: dict[str, Any], target_speedup: float | None = None, target_params: int | None = None
                   ) -> str | None:
    """Why the budget cannot be met from the options of ``smap``, saying what they reach at most; None if it can
    (or if the map was not timed and the budget is a speed-up). Works on a map of untrained units too
    (``reach_map``), so a budget can be refused before any unit is trained."""
    n = smap["layers"]
    if target_speedup is not None:
        if not target_speedup >= 1:
            return f"`target_speedup` must be >= 1 (1 is the teacher itself), got {target_speedup:g}"
        if "timing" not in smap:
            return None
        total, key = smap["timing"]["encoder_ms"], "latency_saved_ms"
    else:
        total, key = smap["teacher_params"], "params_saved"
    cands: dict[int, list[dict[str, Any]]] = {i: [] for i in range(n)}
    for e in smap["entries"]:
        if e.get(key, 0) > 0:
            cands[e["layer"]].append(e)
    most = _max_saving(cands, n, key)
    if target_speedup is not None:
        if total * (1 - 1 / target_speedup) <= most:
            return None
        reach = total / (total - most) if most < total else math.inf
        return (f"`target_speedup` {target_speedup:g} cannot be met: the map's options reach at most {reach:.2f}x "
                f"(encoder {total:.2f} ms, at most {most:.2f} ms saved, timings on {smap.get('device', 'this device')}"
                "); ask for less, or map more options (`options`, `heads_set`)")
    if total - target_params <= most:
        return None
    return (f"`target_params` {target_params:,} cannot be met: the map's options remove at most {most:,.0f} of the "
            f"teacher's {total:,} parameters (the smallest student has {total - most:,.0f}); ask for more, or map "
            "more options (`options`, `heads_set`)")


def _max_saving(cands: dict[int, list[dict[str, Any]]], n: int, key: str) -> float:
    best = [0.0] * (n + 2)
    for i in range(n - 1, -1, -1):
        best[i] = max([best[i + 1]] + [e[key] + best[i + len(e["covers"])] for e in cands[i]])
    return best[0]
