"""What the scripts print on stdout besides the last line (``run_main`` prints where the results went)."""
from __future__ import annotations

from .. import runtime
from ..api import CachedFeatures, Evaluation, TrainedUnits
from ..evaluation.chat import chat_table
from ..evaluation.metrics import EvalResult
from ..evaluation.report import report_text


def print_units(result: TrainedUnits) -> None:
    """Per-unit summary table after training (rank 0)."""
    if not runtime.is_main_process():
        return
    print("| unit | init | best val loss | last val loss |\n|---|---|---:|---:|")
    for u in result.units:
        print(f"| {u.name} | {u.init[:60]} | {u.best:.5g} | {u.last:.5g} |")


def print_evaluation(ev: Evaluation) -> None:
    """The student's per-layer plan, the notes and the table of a comparison with the teacher (rank 0)."""
    if not runtime.is_main_process():
        return
    print(ev.model.config.describe())
    print(report_text(EvalResult(ev.metrics, ev.rows, ev.notes, ev.texts)))
    if ev.lm_eval is not None:
        print(ev.lm_eval.table())
    if ev.chat is not None:
        print(chat_table(ev.chat))


def print_cached(done: CachedFeatures) -> None:
    """What a --cache-only job left in the cache (rank 0)."""
    if not runtime.is_main_process():
        return
    built = f"built {', '.join(done.built)}" if done.built else "all were there already"
    print(f"teacher cache {done.folder}: {', '.join(done.features)} ({done.tokens} tokens each; {built})")
def plan_table(res: dict) -> str:
    """The planned student beside the teacher: size, measured speed (and KV cache), quality on the test split."""
    m, nan = res["metrics"], float("nan")
    decode = "decode_measured_speedup" in res
    head = "| model | params | prefill ms | speed-up |" + (" decode speed-up | KV bytes / token |" if decode else "")
    quality = (("perplexity", "teacher_perplexity", "student_perplexity"),) if "student_perplexity" in m else ()
    quality += (("top-1", "teacher_top1", "student_top1"),)
    head += " " + " | ".join(q[0] for q in quality) + " | agreement | KL |"
    ms = res["measured_encoder_ms"]
    rows = []
    for who, speed, extra in (("teacher", "1.00x", (" 1.00x | " + f"{res['teacher_kv_bytes_per_token']:,} |")
                               if decode else ""), ("planned student", f"{res['measured_speedup']:.2f}x",
                                                    (f" {res.get('decode_measured_speedup', nan):.2f}x | "
                                                     f"{res['student_kv_bytes_per_token']:,} |") if decode else "")):
        params = res["teacher_params" if who == "teacher" else "student_params"]
        q = " | ".join(f"{m.get(k[1] if who == 'teacher' else k[2], nan):.4f}" for k in quality)
        tail = "1 | 0 |" if who == "teacher" else (f"{m.get('agreement_top1', nan):.4f} | "
                                                  f"{m.get('kl_teacher_student', nan):.4f} |")
        rows.append(f"| {who} | {params:,} | {ms['teacher' if who == 'teacher' else 'student']:.1f} | {speed} |"
                    f"{extra} {q} | {tail}")
    sep = "|---" + "|---:" * (head.count("|") - 2) + "|"
    if res.get("llama_cpp"):  # --runtime llama.cpp: the speeds where the student will be served
        t = res["llama_cpp"]
        rows += ["", f"in llama.cpp ({t['gguf_type']} GGUF, {t['threads']} thread(s), median of {t['reps']}): prefill "
                 f"{t['teacher_prefill_tokens_per_s']:,.0f} -> {t['student_prefill_tokens_per_s']:,.0f} tokens/s "
                 f"({t['prefill_speedup']:.2f}x), decode {t['teacher_decode_tokens_per_s']:,.1f} -> "
                 f"{t['student_decode_tokens_per_s']:,.1f} tokens/s ({t['decode_speedup']:.2f}x)"]
    if res.get("texts"):  # the named texts, one row each, after the test split's
        from ..evaluation.texts import texts_table

        rows += ["", texts_table({"sentences": res.get("test_sentences"), **m}, res["texts"])]
    return "\n".join([head, sep, *rows])
