"""What the scripts print on stdout besides the last line (``run_main`` prints where the results went)."""
from __future__ import annotations

from .. import runtime
from ..api import CachedFeatures, Evaluation, TrainedUnits
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
    print(report_text(EvalResult(ev.metrics, ev.rows, ev.notes)))


def print_cached(done: CachedFeatures) -> None:
    """What a --cache-only job left in the cache (rank 0)."""
    if not runtime.is_main_process():
        return
    built = f"built {', '.join(done.built)}" if done.built else "all were there already"
    print(f"teacher cache {done.folder}: {', '.join(done.features)} ({done.tokens} tokens each; {built})")
