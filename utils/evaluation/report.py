"""The report of a comparison: a markdown table (teacher and student side by side), results.json and
predictions.tsv."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.staging import write_staged
from .metrics import TOPK, EvalResult
from .speed import load_text


def format_table(m: dict[str, Any]) -> str:
    """Teacher and student side by side, markdown (pastes into a paper draft or an issue)."""
    lines = ["| metric | teacher | student |", "|---|---:|---:|"]

    def f(v):
        return f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    causal = "teacher_perplexity" in m
    if causal:
        lines.append(f"| perplexity | {m['teacher_perplexity']:.3f} | {m['student_perplexity']:.3f} |")
        if "teacher_overconfidence" in m:
            lines.append(f"| NLL − entropy (nats / token) | {m['teacher_overconfidence']:+.4f} | "
                         f"{m['student_overconfidence']:+.4f} |")
    for k in TOPK:
        if f"teacher_top{k}" in m:
            what = "next-token top-" if causal else "top-"
            lines.append(f"| {what}{k} accuracy | {f(m[f'teacher_top{k}'])} | {f(m[f'student_top{k}'])} |")
    for k in TOPK:
        if f"teacher_in_judge_top{k}" in m:
            lines.append(f"| top-1 in judge top-{k} | {f(m[f'teacher_in_judge_top{k}'])} | "
                         f"{f(m[f'student_in_judge_top{k}'])} |")
    lines.append(f"| parameters | {f(m['teacher_params'])} | {f(m['student_params'])} |")
    for key, label in (("kv_cache_bytes_per_token", "KV-cache bytes / token (fp16)"),
                       ("prefill_tokens_per_s", "prefill tokens / s"), ("decode_tokens_per_s", "decode tokens / s")):
        if f"teacher_{key}" in m:
            lines.append(f"| {label} | {m[f'teacher_{key}']:,.0f} | {m[f'student_{key}']:,.0f} |")
    lines.append(f"| latency ms / batch | {m['teacher_latency_ms_per_batch']:.2f} | "
                 f"{m['student_latency_ms_per_batch']:.2f} |")
    single = [("perplexity ratio (student / teacher)", "perplexity_ratio"),
              ("agreement (student top-1 = teacher top-1)", "agreement_top1"),
              ("KL(teacher ‖ student) at the mask" if not causal else "KL(teacher ‖ student) per token",
               "kl_teacher_student"),  # '|' would split the table cell
              ("final hidden-state cosine", "hidden_cosine"), ("final hidden-state MSE", "hidden_mse"),
              ("judge top-1 accuracy", "judge_top1"), ("parameter ratio", "param_ratio"), ("speed-up", "speedup"),
              ("prefill speed-up", "prefill_speedup"), ("decode speed-up", "decode_speedup"),
              ("predicted tokens" if causal else "sentences", "predicted_tokens" if causal else "sentences")]
    for label, key in single:
        if key in m:
            lines.append(f"| {label} | {f(m[key])} | |")
    timing_load = {k.removeprefix("timing_"): v for k, v in m.items() if k.startswith("timing_")}
    if timing_load:
        lines.append(f"| speeds timed at | {load_text(timing_load)} | |")
    return "\n".join(lines)


def counted(m: dict[str, Any]) -> str:
    """What a comparison's ``sentences`` counts: the token windows of a decoder's text (they cross sentences), or
    the sentences of a masked LM."""
    return "windows" if "teacher_perplexity" in m else "sentences"


def named_counts(m: dict[str, Any]) -> dict[str, Any]:
    """Metrics as results.json names them: a decoder's ``sentences`` as ``windows``."""
    return {(counted(m) if k == "sentences" else k): v for k, v in m.items()}


def write_report(result: EvalResult, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """results.json (a decoder's windows named as such) + predictions file (sentence, true word, teacher, student,
    judge top-10) in ``out_dir``."""
    out = Path(out_dir)
    payload = {"metrics": named_counts(result.metrics), "notes": result.notes, **(extra or {})}
    if result.texts:
        payload["texts"] = result.texts
    files = {}
    if result.rows:
        cols = ["index", "true", "teacher", "student"] + (["judge_top10"] if "judge_top10" in result.rows[0] else [])
        lines = ["\t".join(cols + ["masked sentence"])]
        for r in result.rows:
            vals = [" ".join(r[c]) if isinstance(r[c], list) else str(r[c]) for c in cols]
            lines.append("\t".join(vals + [r["masked"]]))
        files[out / "predictions.tsv"] = "\n".join(lines) + "\n"
    files[out / "results.json"] = json.dumps(payload, indent=2, default=str)
    write_staged(files)
    return out


def report_text(result: EvalResult, split: str = "test") -> str:
    """What is printed of a comparison: its notes, then the table (and with named texts, one row per text)."""
    from .texts import texts_table

    tables = [format_table(result.metrics)] + (["", texts_table(result.metrics, result.texts, split)]
                                               if result.texts else [])
    return "\n".join([f"note: {note}" for note in result.notes] + tables)
