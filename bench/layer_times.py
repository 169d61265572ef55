"""Where a student's speed comes from: each layer's time inside the whole model, for the teacher and each saved
student, beside the speed-up the whole models measure.

A map prices a unit timed alone (``time_units``), a bench measures whole models; when the two disagree, this table
says which layers do. Every model runs the same --batch x --seq pass (no vocabulary projection: what the map and the
benches time as prefill) on --threads CPU threads. In each of --reps rounds every model runs once, round-robin, so
that load from other work falls on all alike; inside a run each layer's start and end are stamped, so a layer's time
is what it costs in the model (its input, its place in memory), not alone. Reported: the median per layer, of the
embeddings and of the whole pass, each student's speed-up, the part of the teacher's time each student saves per
layer, and the machine's load average during the rounds. A dropped layer shows as saving all its time; a merged
layer is shown at its first teacher layer.

    python bench/layer_times.py --teacher bench/results/qwen2.5-coder-0.5b-instruct \\
        --models planned=runs/kv12h/planned/model/best --seq 256 --batch 1 --threads 1 --reps 10
    python bench/layer_times.py --quick --teacher <a tiny teacher folder> --models s=<its student>

Writes layer_times.json and layer_times.md in --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.paired_decoders import named_models  # noqa: E402
from bench.quick import add_quick  # noqa: E402
from models import SwappableModel, load_teacher  # noqa: E402
from models.config import LayerSpec  # noqa: E402
from models.staging import write_staged  # noqa: E402
from utils.cli.run import run_main  # noqa: E402
from utils.cli.types import positive_int  # noqa: E402
from utils.evaluation.speed import LoadLog, load_text, round_robin_ms  # noqa: E402
from utils.planning.sensitivity import encoder_inputs  # noqa: E402
from utils.training.students import load_model  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher's folder (or hub id)")
    p.add_argument("--models", nargs="+", default=[], metavar="NAME=DIR",
                   help="saved students (python -m utils.assemble, plan_student.py, finetune_merged.py)")
    p.add_argument("--batch", type=positive_int("--batch"), default=1, help="rows per pass")
    p.add_argument("--seq", type=positive_int("--seq"), default=256, help="tokens per row")
    p.add_argument("--reps", type=positive_int("--reps"), default=10, help="timed rounds (after 2 untimed ones)")
    p.add_argument("--threads", type=positive_int("--threads"), default=1, help="CPU threads the passes run on")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench/results/layer_times"))
    add_quick(p, {"seq": 16, "reps": 2}, "16-token passes, 2 rounds")
    return p


def describe(spec: LayerSpec) -> str:
    """A layer in a few words: its attention (heads over key/value heads) and its feed-forward width."""
    if spec.num_heads == 0:
        att = f"attention {spec.attention}"
    else:
        kv = f"/{spec.num_kv_heads}" if spec.num_kv_heads is not None else ""
        att = f"{spec.attention} {spec.num_heads}{kv}x{spec.head_dim}"
    return f"{att}, ffn {spec.intermediate_size}" + (f" (merges {spec.origin})" if len(spec.origin) > 1 else "")


@torch.no_grad()
def stamped_pass(model: SwappableModel, ids: torch.Tensor, att: torch.Tensor) -> tuple[float, float, list[float]]:
    """One pass as ``model(ids, att, with_logits=False)`` runs it, each part's wall time stamped: (whole ms,
    embeddings ms, [ms of each layer])."""
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    ctx = model.context(att, ids.shape[1])
    h = model.embed(ids)
    sync()
    stamps = [time.perf_counter()]
    for layer in model.layers:
        h = layer(h, ctx)
        sync()
        stamps.append(time.perf_counter())
    return (1000 * (stamps[-1] - t0), 1000 * (stamps[0] - t0),
            [1000 * (b - a) for a, b in zip(stamps, stamps[1:])])


def layer_times(models: dict[str, SwappableModel], *, batch: int, seq: int, reps: int, threads: int | None,
                load: LoadLog | None = None) -> dict[str, dict[str, Any]]:
    """Median whole, embeddings and per-layer ms of each model (``stamped_pass``), round-robin over ``reps`` rounds
    after two untimed ones (``round_robin_ms``: its warm-up, threads and load log), on ``threads`` CPU threads."""
    first = next(iter(models.values()))
    ids, att = encoder_inputs(first, batch=batch, seq=seq, device=next(first.parameters()).device)
    stamped: dict[str, list[tuple[float, float, list[float]]]] = {k: [] for k in models}
    fns = {name: (lambda m=m.eval(), into=stamped[name]: into.append(stamped_pass(m, ids, att)))
           for name, m in models.items()}
    round_robin_ms(fns, reps, ids.device, threads=threads, load=load)
    runs = {name: got[2:] for name, got in stamped.items()}  # the two warm-up passes of each model left out
    out = {}
    for name, got in runs.items():
        n = len(got[0][2])
        out[name] = {"whole_ms": statistics.median(g[0] for g in got),
                     "embeddings_ms": statistics.median(g[1] for g in got),
                     "layer_ms": [statistics.median(g[2][i] for g in got) for i in range(n)],
                     "layers": [describe(s) for s in models[name].config.layers],
                     "origin": [list(s.origin) for s in models[name].config.layers]}
    return out


def compare(timed: dict[str, dict[str, Any]], n_teacher: int) -> dict[str, dict[str, Any]]:
    """Each student against the teacher: its measured speed-up, what each teacher layer's replacement saves (a
    dropped layer: all of it; a merged layer: its two teacher layers against it) and the speed-up those savings
    predict from the teacher's whole time."""
    t = timed["teacher"]
    out = {}
    for name, s in timed.items():
        if name == "teacher":
            continue
        saved: list[float | None] = [t["layer_ms"][i] for i in range(n_teacher)]  # dropped until found
        for j, origin in enumerate(s["origin"]):
            saved[origin[0]] = sum(t["layer_ms"][i] for i in origin) - s["layer_ms"][j]
            for i in origin[1:]:
                saved[i] = None  # counted at the merged layer's first teacher layer
        total = sum(x for x in saved if x is not None)
        out[name] = {"speedup": t["whole_ms"] / s["whole_ms"], "saved_ms": saved, "saved_total_ms": total,
                     "speedup_from_layers": t["whole_ms"] / (t["whole_ms"] - total)}
    return out


def markdown(r: dict[str, Any]) -> str:
    timed, students = r["timed"], r["students"]
    t = timed["teacher"]
    head = (f"Teacher {Path(r['teacher']).name}: {r['batch']}x{r['seq']} pass, {t['whole_ms']:.1f} ms (embeddings "
            f"{t['embeddings_ms']:.2f} ms), median of {r['reps']} round-robin rounds on {r['threads']} CPU "
            f"thread(s), {r['device']}" + (f"; {load_text(r['load'])}" if r["load"] else "") + ".")
    lines = [head, "", "| model | whole ms | speed-up measured | saved by its layers (ms) | speed-up the layers add "
             "up to |", "|---|---:|---:|---:|---:|"]
    for name, c in students.items():
        lines.append(f"| {name} | {timed[name]['whole_ms']:.1f} | {c['speedup']:.3f}x | {c['saved_total_ms']:.1f} | "
                     f"{c['speedup_from_layers']:.3f}x |")
    names = list(students)
    lines += ["", "Per teacher layer: its ms in the teacher, and for each student the ms saved there (the layer "
              "that replaces it).", "",
              "| layer | teacher ms | " + " | ".join(f"{n}: saved ms (its layer)" for n in names) + " |",
              "|---|---:|" + "---|" * len(names)]
    where = {n: {o[0]: j for j, o in enumerate(timed[n]["origin"])} for n in names}
    for i, ms in enumerate(t["layer_ms"]):
        cells = []
        for n in names:
            saved, j = students[n]["saved_ms"][i], where[n].get(i)
            if saved is None:
                cells.append("(merged above)")
            else:
                cells.append(f"{saved:.2f} ({timed[n]['layers'][j]})" if j is not None else f"{saved:.2f} (dropped)")
        lines.append(f"| {i} | {ms:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    specs = named_models(args.models, parser)  # a bad spec fails before anything is read
    if "teacher" in specs:
        parser.error("--models: 'teacher' names the teacher; give the student another name")
    teacher, _ = load_teacher(args.teacher, device=args.device)
    models: dict[str, SwappableModel] = {"teacher": teacher}
    for name, folder in specs.items():
        models[name] = load_model(folder, teacher_config=teacher.config)[0].to(args.device)
    load = LoadLog()
    timed = layer_times(models, batch=args.batch, seq=args.seq, reps=args.reps, threads=args.threads, load=load)
    result = {"teacher": str(args.teacher), "models": {k: str(v) for k, v in specs.items()}, "batch": args.batch,
              "seq": args.seq, "reps": args.reps, "threads": args.threads, "device": str(args.device),
              "load": load.summary(), "timed": timed, "students": compare(timed, len(teacher.layers))}
    text = markdown(result)
    write_staged({args.out / "layer_times.json": json.dumps(result, indent=2),
                  args.out / "layer_times.md": text})
    print(text)
    return args.out


if __name__ == "__main__":
    parser = build_parser()
    sys.exit(run_main(lambda a: main(a, parser), parser))
