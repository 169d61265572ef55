"""Planned against uniform students at equal encoder speed-up, from one sensitivity map (issue 15, item 4).

For every target speed-up S (--targets, default 1.3,1.5,2,3) of the map's encoder latency:

  planned     the planner's per-layer plan (utils.planning.planner.choose_plan, cost = the map's --cost);
  uniform     the same option in every layer (a merge in every pair), among those the map says meet S the one
              with the least summed map cost ("best uniform" by the map: only that one is trained, for the budget);
  untrained   baselines without any training: the uniform plan's units as initialised from the teacher, i.e. kept
              top heads (heads options; importance-ranked) and dropped layers (merge option: the first layer of
              each pair), each with the fewest cuts that meet S.

Trained students are built exactly as plan_student.py builds its one (units retrained from the teacher cache,
composed, fine-tuned end to end by KD: ``plan_student.make_student``); a plan reached by several targets or methods is
trained once. Every model is evaluated on the same test sentences with one seeded [MASK] each
(``utils.evaluation.metrics.compare_models``: top-1 / top-5, agreement with the teacher, KL, hidden cosine), its encoder
latency is timed round-robin with the teacher's on this device, and at each target the planned student is compared
with every other method by McNemar's exact test on the same masked sentences (top-1 correct, and agreement).
Outputs in --out/--run-name: plans.json, plans.md, pareto.png.

    python bench/plans.py --map bench/results/sensitivity_minilm --teacher ../shared/models/minilm-mlm-wikitext2 \\
        --data-dir bench/results/wikitext2_split --device cpu --max-train-sentences 2000 --eval-sentences 300
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils import session  # noqa: E402
from utils.cli.configs import map_config, plan_finetune, record, session_config, train_config  # noqa: E402
from utils.cli.groups import add_finetune_args, add_map_args  # noqa: E402
from utils.cli.parser import add_training_args, common_parser  # noqa: E402
from utils.cli.run import run_main  # noqa: E402
from utils.evaluation.metrics import compare_models  # noqa: E402
from utils.evaluation.stats import mcnemar  # noqa: E402
from utils.planning.planner import COSTS, choose_plan  # noqa: E402
from utils.planning.sensitivity import Option, encoder_inputs, option_from_dict, round_robin_ms  # noqa: E402
from utils.planning.students import context, make_student, read_map  # noqa: E402
from utils.storage.checkpoint import CheckpointError  # noqa: E402
from utils.storage.lock import claim_units  # noqa: E402
from utils.training.loop import run_record  # noqa: E402

log = logging.getLogger("simplifying_transformers")
METRICS = ("student_top1", "student_top5", "agreement_top1", "kl_teacher_student", "hidden_cosine")


def speedups(s: str) -> list[float]:
    try:
        v = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--targets must be comma-separated speed-ups such as 1.5,2; got '{s}'"
                                         ) from None
    if not v or any(x <= 1 for x in v):
        raise argparse.ArgumentTypeError(f"--targets must be speed-ups above 1, got '{s}'")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="bench/results")
    add_training_args(p, epochs=1, lr=1e-3)
    g = p.add_argument_group("plans")
    g.add_argument("--map", required=True, help="sensitivity.json or its folder (sensitivity_map.py)")
    g.add_argument("--targets", type=speedups, default=[1.3, 1.5, 2.0, 3.0], help="encoder speed-ups to plan for")
    g.add_argument("--cost", choices=list(COSTS), default="kl", help="what a unit costs, from the map")
    add_finetune_args(p)
    add_map_args(p)
    return p


# ---- plans ----
def uniform(opt: Option, n: int) -> dict[int, Option]:
    """``opt`` in every layer (a merge in every pair (0,1), (2,3), ...; an odd last layer is kept)."""
    step = len(opt.covers(0))
    return {i: opt for i in range(0, n, step) if opt.applies(i, n)}


def predicted(smap: dict[str, Any], choices: dict[int, Option], key: str) -> float:
    """The map's summed ``key`` (latency_saved_ms, a cost) over the plan's units."""
    cells = {(e["layer"], e["option"]): e for e in smap["entries"]}
    missing = [(i, o.name) for i, o in choices.items() if (i, o.name) not in cells]
    if missing:
        raise CheckpointError(f"the map has no entries for {missing}; map every layer (no --layers) for this bench")
    return sum(float(cells[i, o.name][key]) for i, o in choices.items())


def candidates(smap: dict[str, Any], target: float, cost: str) -> list[dict[str, Any]]:
    """The methods at one target: the planned plan, the best uniform plan by the map, the untrained baselines."""
    n = smap["layers"]
    enc = smap["timing"]["encoder_ms"]
    need = enc * (1 - 1 / target)
    options = [option_from_dict(o) for o in smap["options"]]
    out: list[dict[str, Any]] = []
    try:
        plan = choose_plan(smap, target_speedup=target, cost=cost)
        byname = {o.name: o for o in options}
        out.append({"method": "planned", "trained": True, "choices": {i: byname[c] for i, c in plan.choices.items()},
                    "why": plan.lines})
    except ValueError as e:
        log.warning("target %gx: no planned plan (%s)", target, e)
    feasible = [(o, uniform(o, n)) for o in options]
    feasible = [(o, c) for o, c in feasible if c and predicted(smap, c, "latency_saved_ms") >= need]
    if feasible:
        o, c = min(feasible, key=lambda oc: predicted(smap, oc[1], COSTS[cost]))
        out.append({"method": "uniform", "trained": True, "choices": c,
                    "why": [f"least map cost of {len(feasible)} uniform plans meeting {target:g}x"]})
    full_dim = max(o.head_dim for o in options)  # the teacher's: only the head_dim options halve it
    heads = [(o, c) for o, c in feasible if o.kind == "block" and o.head_dim == full_dim]
    if heads:
        o, c = max(heads, key=lambda oc: oc[0].num_heads)
        out.append({"method": "untrained: kept top heads", "trained": False, "choices": c, "why": []})
    drops = [(o, c) for o, c in feasible if o.name == "merge next"]
    if drops:
        out.append({"method": "untrained: dropped layers", "trained": False, "choices": drops[0][1], "why": []})
    for m in out:
        m["predicted_speedup"] = enc / (enc - predicted(smap, m["choices"], "latency_saved_ms"))
    return out


def plan_key(choices: dict[int, Option], trained: bool) -> str:
    body = ", ".join(f"{i}{'+' + str(i + 1) if o.kind == 'merge' else ''}: {o.name}"
                     for i, o in sorted(choices.items()))
    return ("" if trained else "untrained ") + (body or "teacher")


# ---- the bench ----
def main(args: argparse.Namespace) -> Path:
    out = Path(args.out) / (args.run_name or "plans")
    with claim_units([out], "plans bench"):
        return bench(args, out)


def bench(args: argparse.Namespace, out: Path) -> Path:
    s = session.start(session_config(args))
    teacher = s.teacher
    smap = read_map(args.map)
    if smap.get("teacher_hash") != s.teacher_hash and not args.force:
        raise CheckpointError(f"--map was made for another teacher ({smap.get('teacher')}); pass --force to use it")
    train = train_config(args)
    ctx = context(s, map_config(args), train=train,
                  record=run_record(record(args), batch_size=s.data.batch_size, train=train,
                                    percentage_data=s.data.fraction))
    test_loader, _ = s.loader(s.first_sentences("test", args.test_sentences), shuffle=False)
    per_target = {t: candidates(smap, t, args.cost) for t in args.targets}
    models: dict[str, dict[str, Any]] = {}
    for t, methods in per_target.items():
        for m in methods:
            key = m["key"] = plan_key(m["choices"], m["trained"])
            if key in models:
                continue
            run = out / f"model_{len(models)}"
            student, _ = make_student(s, ctx, m["choices"], run=run, origin=f"bench/plans.py: {key}",
                                      finetune=plan_finetune(args), train=m["trained"])
            res = compare_models(teacher, student, test_loader, tokenizer=s.tokenizer, device=s.device, keep_rows=True)
            models[key] = {"key": key, "run": str(run), "trained": m["trained"], "model": student,
                           "metrics": {k: res.metrics[k] for k in METRICS if k in res.metrics},
                           "params": student.num_parameters(), "predicted_speedup": m["predicted_speedup"],
                           "right": [r["student"] == r["true"] for r in res.rows],
                           "agree": [r["student"] == r["teacher"] for r in res.rows]}
            log.info("%s: %s", key, {k: round(v, 4) for k, v in models[key]["metrics"].items()})
    base = compare_models(teacher, teacher, test_loader, tokenizer=s.tokenizer, device=s.device,
                          keep_rows=False).metrics
    ids, att = encoder_inputs(teacher, batch=args.latency_batch, seq=args.seq_len, device=s.device)
    fns = {"teacher": lambda: teacher(ids, att, with_logits=False)}
    fns.update({k: (lambda m=v["model"]: m(ids, att, with_logits=False)) for k, v in models.items()})
    ms = round_robin_ms(fns, args.latency_reps, s.device)
    for k, v in models.items():
        v.update(encoder_ms=ms[k], speedup=ms["teacher"] / ms[k])
    rows, tests = [], []
    for t, methods in per_target.items():
        for m in methods:
            v = models[m["key"]]
            rows.append({"target": t, "method": m["method"], "plan": m["key"], "why": m["why"],
                         **{k: v[k] for k in ("params", "encoder_ms", "speedup", "predicted_speedup", "metrics")}})
        planned = next((m for m in methods if m["method"] == "planned"), None)
        for m in methods:
            if planned is None or m is planned or m["key"] == planned["key"]:
                continue
            a, b = models[planned["key"]], models[m["key"]]
            tests.append({"target": t, "against": m["method"], "plan": m["key"],
                          "top1": mcnemar(a["right"], b["right"]), "agreement": mcnemar(a["agree"], b["agree"])})
    result = {"teacher": str(args.teacher), "map": str(args.map), "device": str(s.device),
              "teacher_metrics": {k: base[k] for k in ("teacher_top1", "teacher_top5") if k in base},
              "teacher_params": teacher.num_parameters(), "teacher_encoder_ms": ms["teacher"],
              "test_sentences": base["sentences"], "targets": args.targets, "rows": rows, "tests": tests,
              "budget": {"max_train_sentences": args.max_train_sentences, "epochs": args.epochs,
                         "ft_epochs": args.ft_epochs, "eval_sentences": args.eval_sentences,
                         "latency_reps": args.latency_reps}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans.json").write_text(json.dumps(result, indent=2))
    (out / "plans.md").write_text(markdown(result) + "\n")
    plot(result, out / "pareto.png")
    print((out / "plans.md").read_text())
    return out


def markdown(r: dict[str, Any]) -> str:
    t1 = r["teacher_metrics"].get("teacher_top1", float("nan"))
    lines = [f"Teacher {Path(r['teacher']).name}: top-1 {t1:.4f}, {r['teacher_params'] / 1e6:.2f} M parameters, "
             f"encoder {r['teacher_encoder_ms']:.1f} ms ({r['device']}); {r['test_sentences']} test sentences.", "",
             "| target | method | plan | params (M) | encoder ms | speed-up measured / map | top-1 (x teacher) | top-5 "
             "| agreement | KL | hidden cos |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        m = row["metrics"]
        lines.append(f"| {row['target']:g}x | {row['method']} | {row['plan']} | {row['params'] / 1e6:.2f} | "
                     f"{row['encoder_ms']:.1f} | {row['speedup']:.2f}x / {row['predicted_speedup']:.2f}x | "
                     f"{m.get('student_top1', math.nan):.4f} ({m.get('student_top1', math.nan) / t1:.3f}) | "
                     f"{m.get('student_top5', math.nan):.4f} | {m.get('agreement_top1', math.nan):.4f} | "
                     f"{m.get('kl_teacher_student', math.nan):.4f} | {m.get('hidden_cosine', math.nan):.4f} |")
    lines += ["", "Paired tests, planned vs each other method at the same target (McNemar, exact two-sided; "
              "'only planned' / 'only other' = sentences where just that model is right / agrees with the teacher):",
              "", "| target | planned vs | top-1: only planned / only other, z, p | agreement: only planned / only "
              "other, z, p |", "|---|---|---:|---:|"]
    for x in r["tests"]:
        a, b = x["top1"], x["agreement"]
        lines.append(f"| {x['target']:g}x | {x['against']} ({x['plan']}) | {a['only_a']} / {a['only_b']}, "
                     f"z = {a['z']:+.2f}, p = {a['p']:.3g} | {b['only_a']} / {b['only_b']}, z = {b['z']:+.2f}, "
                     f"p = {b['p']:.3g} |")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> Path:
    """Top-1 and agreement against measured encoder speed-up, one marker per method, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"planned": ("o", "tab:red"), "uniform": ("s", "tab:blue"),
             "untrained: kept top heads": ("v", "tab:gray"), "untrained: dropped layers": ("x", "black")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    t1 = r["teacher_metrics"].get("teacher_top1")
    for ax, key, label in ((axes[0], "student_top1", "masked-token top-1"),
                           (axes[1], "agreement_top1", "agreement with the teacher's top-1")):
        for method, (marker, color) in style.items():
            pts = {row["plan"]: row for row in r["rows"] if row["method"] == method and key in row["metrics"]}
            ax.scatter([row["speedup"] for row in pts.values()], [row["metrics"][key] for row in pts.values()],
                       marker=marker, color=color, label=method, s=45)
        ref = t1 if key == "student_top1" else 1.0
        if ref is not None:
            ax.scatter([1.0], [ref], marker="*", s=120, color="gold", edgecolor="k", label="teacher")
            if key == "student_top1":
                ax.axhline(0.97 * ref, ls="--", lw=0.8, color="tab:green", label="0.97 x teacher")
                ax.axhline(0.90 * ref, ls=":", lw=0.8, color="tab:green", label="0.90 x teacher")
        for t in r["targets"]:
            ax.axvline(t, lw=0.5, color="lightgray")
        ax.set_xlabel(f"measured encoder speed-up over the teacher ({r['device']})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Planned vs uniform students and untrained baselines — {Path(r['teacher']).name}, "
                 f"{r['test_sentences']} test sentences", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
