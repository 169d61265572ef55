"""The teacher and saved decoder students in llama.cpp itself: speed and perplexity of their GGUF files.

Each model (the teacher and every --models NAME=DIR, a folder python -m utils.assemble, finetune_merged.py or
bench/plans.py saved) is written to GGUF by the one exporter (models.gguf_export) at each of --gguf-types, and
loaded in llama.cpp through llama-cpp-python. Speed (utils.evaluation.llama_cpp): prefill tokens/s of one --seq-len
sequence and decode tokens/s of one token after it, all models of one type timed round-robin (so that load from
other jobs hits them alike), the median of --reps, at each of --threads; speed-ups against the teacher's file of the
same type. Perplexity: llama.cpp's against ours (fp32 PyTorch) on the same token windows, the first --windows of the
test split (window = stride = --seq-len, no BOS), per model and type, with their relative difference. Outputs in
--out/--run-name: llama_cpp.json, llama_cpp.md; the GGUF files in --gguf-dir when given (else a scratch folder).

    OMP_NUM_THREADS=1 python bench/llama_cpp_speed.py --teacher /work/models/smollm2 \\
        --data-dir /work/data/wt2_articles --seq-len 256 --gguf-types f16,q8_0 --threads 1,2 --reps 5 --windows 8 \\
        --models short6=/work/data/students/short6 healed=runs/finetune_dropped_layers/model/best
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.paired_decoders import load_students, named_models  # noqa: E402
from bench.quick import add_quick  # noqa: E402
from models.gguf_export import GGUF_TYPES, export_gguf  # noqa: E402
from models.staging import write_staged  # noqa: E402
from utils import session as _session  # noqa: E402
from utils.cli.configs import session_config  # noqa: E402
from utils.cli.parser import common_parser  # noqa: E402
from utils.cli.run import run_main  # noqa: E402
from utils.cli.types import int_list, name_list, positive_int, run_name  # noqa: E402
from utils.evaluation.llama_cpp import (SPEEDS, GgufTiming, check_llama_cpp, gguf_nll, load_gguf,  # noqa: E402
                                        round_robin_llms, timing_ids, tokens_per_s)
from utils.evaluation.metrics import token_scores  # noqa: E402

TEACHER = "teacher"


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(__doc__.split("\n")[0], default_out="bench/results/llama_cpp")
    p.set_defaults(seq_len=256, batch_size=4, device="cpu", percentage_data=1.0)
    g = p.add_argument_group("models and measurements")
    g.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR",
                   help="saved students (python -m utils.assemble, finetune_merged.py, bench/plans.py) beside the "
                        "teacher")
    g.add_argument("--gguf-types", type=name_list, default=("f16", "q8_0"),
                   help=f"comma-separated storage types of the GGUF files ({', '.join(GGUF_TYPES)})")
    g.add_argument("--threads", type=int_list, default=[1, 2], help="comma-separated CPU thread counts to time on")
    g.add_argument("--reps", type=positive_int("--reps"), default=10, help="timed runs per model (the median)")
    g.add_argument("--windows", type=positive_int("--windows"), default=8,
                   help="perplexity on the first N --seq-len windows of the test split")
    g.add_argument("--gguf-dir", default=None, help="keep the GGUF files here (default: a scratch folder)")
    g.add_argument("--run-name", type=run_name, default="llama_cpp", help="sub-folder of --out")
    add_quick(p, {"seq_len": 16, "batch_size": 8, "reps": 2, "windows": 2, "threads": [1]},
              "windows of 16, 2 reps, 2 perplexity windows, one thread")
    return p


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, str]:
    """The named students (a name of their own each, not the teacher's) and the storage types, or an argument
    error."""
    named = named_models(args.models, parser)
    if TEACHER in named:
        parser.error(f"--models: the name {TEACHER!r} is the teacher's; name the student otherwise")
    if len(named) < len(args.models):
        parser.error("--models: every NAME must be different")
    bad = [t for t in args.gguf_types if t not in GGUF_TYPES]
    if bad:
        parser.error(f"--gguf-types takes {', '.join(GGUF_TYPES)}, got {bad[0]!r}")
    return named


def export_all(models: dict, tokenizer, types: tuple[str, ...], folder: Path) -> dict[tuple[str, str], Path]:
    """Every model written to ``folder/NAME.TYPE.gguf`` at every storage type."""
    files = {}
    for name, model in models.items():
        for t in types:
            files[name, t] = export_gguf(model, folder / f"{name}.{t}.gguf", tokenizer, gguf_type=t)[0]
    return files


def time_all(files: dict[tuple[str, str], Path], names: list[str], ids: list[int], *, gguf_type: str,
             timing: GgufTiming) -> list[dict]:
    """One row per model of ``gguf_type``: prefill and decode ms and tokens/s (all models loaded together and timed
    round-robin), and the speed-ups against the teacher's file of the same type."""
    llms = {}
    try:
        for name in names:
            llms[name] = load_gguf(files[name, gguf_type], timing)
        ms = round_robin_llms(llms, ids, timing)
    finally:
        for llm in llms.values():
            llm.close()
    rows = []
    for name in names:
        row = {"model": name, "gguf_type": gguf_type, "threads": timing.threads,
               **{f"{s}_ms": ms[f"{name}_{s}_ms"] for s in SPEEDS}, **tokens_per_s(ms, name, timing.seq)}
        rows.append({**row, **{f"{s}_speedup": ms[f"{TEACHER}_{s}_ms"] / ms[f"{name}_{s}_ms"] for s in SPEEDS}})
    return rows


def perplexities(files: dict[tuple[str, str], Path], ours: dict[str, float], windows: list[list[int]], *,
                 threads: int) -> list[dict]:
    """Per model and type: our perplexity on ``windows``, llama.cpp's on the same ones, their relative difference."""
    rows = []
    for (name, t), path in files.items():
        nll = gguf_nll(path, windows, threads=threads)
        theirs = math.exp(math.fsum(nll) / len(nll))
        rows.append({"model": name, "gguf_type": t, "ours": ours[name], "llama_cpp": theirs,
                     "relative_difference": abs(theirs - ours[name]) / ours[name], "tokens": len(nll)})
    return rows


def measure(args: argparse.Namespace, named: dict[str, str], folder: Path) -> dict:
    """The GGUF files, their speeds at every type and thread count, and their perplexities against ours."""
    s = _session.start(session_config(args))
    students = load_students(s, named)
    test = s.first_sentences("test", None).first(args.windows)
    sc = token_scores(s.teacher, students, s.loader(test, shuffle=False)[0], device=s.device)
    models = {TEACHER: s.teacher, **students}
    files = export_all(models, s.tokenizer, args.gguf_types, folder)
    ids = timing_ids(s.teacher.config.vocab_size, args.seq_len)
    speed = [row for t in args.gguf_types for n in args.threads
             for row in time_all(files, list(models), ids, gguf_type=t,
                                 timing=GgufTiming(t, n, args.reps, args.seq_len))]
    ours = {name: sc.perplexity(name) for name in models}
    return {"teacher": args.teacher, "models": named, "seq_len": args.seq_len, "reps": args.reps,
            "threads": args.threads, "gguf_types": list(args.gguf_types), "windows": len(test.ids),
            "files": {f"{n}.{t}": {"path": str(p), "mb": p.stat().st_size / 2 ** 20} for (n, t), p in files.items()},
            "speed": speed, "perplexity": perplexities(files, ours, test.ids, threads=max(args.threads))}


def markdown(res: dict) -> str:
    """One row per model and type: file size, prefill and decode tokens/s with speed-ups at each thread count,
    perplexity ours / llama.cpp."""
    threads = res["threads"]
    head = ["model", "type", "file MB"]
    for n in threads:
        head += [f"prefill tok/s ({n}t)", f"decode tok/s ({n}t)"]
    head += ["perplexity ours", "perplexity llama.cpp", "rel. diff."]
    lines = [f"llama.cpp (llama-cpp-python), prefill of {res['seq_len']} tokens and decode of one after them, "
             f"median of {res['reps']} round-robin runs (speed-up against the teacher's file of the same type); "
             f"perplexity on {res['windows']} test windows of {res['seq_len']}", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    speed = {(r["model"], r["gguf_type"], r["threads"]): r for r in res["speed"]}
    for p in res["perplexity"]:
        name, t = p["model"], p["gguf_type"]
        cells = [name, t, f"{res['files'][f'{name}.{t}']['mb']:.1f}"]
        for n in threads:
            r = speed[name, t, n]
            cells += [f"{r['prefill_tokens_per_s']:.1f} ({r['prefill_speedup']:.2f}x)",
                      f"{r['decode_tokens_per_s']:.1f} ({r['decode_speedup']:.2f}x)"]
        cells += [f"{p['ours']:.3f}", f"{p['llama_cpp']:.3f}", f"{p['relative_difference']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    named = _check_args(args, parser)
    check_llama_cpp("this bench measures models in llama.cpp itself", "")
    out = Path(args.out) / args.run_name
    with tempfile.TemporaryDirectory(prefix="llama_cpp_bench_") as scratch:
        folder = Path(args.gguf_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        res = measure(args, named, folder)
    if not args.gguf_dir:
        res["files"] = {k: {**f, "path": None} for k, f in res["files"].items()}  # the scratch folder is gone
    table = markdown(res)
    write_staged({out / "llama_cpp.md": table + "\n", out / "llama_cpp.json": json.dumps(res, indent=2)})
    print(table)
    return out


if __name__ == "__main__":
    parser = build_parser()
    sys.exit(run_main(lambda a: main(a, parser), parser))
