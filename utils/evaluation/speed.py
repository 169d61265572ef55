"""Speed: callables timed round-robin (so that load from other jobs hits them alike), the machine's load seen while
they ran, and a causal LM's prefill and decode tokens/s and KV-cache bytes beside its teacher's."""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from models.base import SwappableModel


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``n`` inside the block (None: as they are), restored after it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class LoadLog:
    """The machine's 1-minute load average read while models were timed (before the warm-up and after each
    round-robin round): a timing under a load above the machine's CPUs shared them with other work, and its ratios
    can be off by several percent. The load average counts the timing's own threads and trails by about a minute."""

    samples: list[float] = field(default_factory=list)

    def read(self) -> None:
        try:
            self.samples.append(os.getloadavg()[0])
        except (OSError, AttributeError):  # no load average on this system (Windows)
            pass

    def summary(self) -> dict[str, float]:
        """The lowest and highest load seen and the usable CPUs; empty where no load average could be read."""
        if not self.samples:
            return {}
        return {"load_1min_min": round(min(self.samples), 2), "load_1min_max": round(max(self.samples), 2),
                "cpus": usable_cpus()}


def load_text(summary: dict[str, float]) -> str:
    """A ``LoadLog.summary`` in words, for a report ("" for an empty one)."""
    if not summary:
        return ""
    lo, hi, cpus = summary["load_1min_min"], summary["load_1min_max"], summary["cpus"]
    seen = f"{lo:.2f}" if lo == hi else f"{lo:.2f}-{hi:.2f}"
    return f"load average {seen} on {cpus} CPUs" + (" (more work than CPUs)" if hi > cpus else "")


@torch.no_grad()
def round_robin_ms(fns: dict[str, Callable[[], Any]], reps: int, device: torch.device, *, threads: int | None = None,
                   load: LoadLog | None = None) -> dict[str, float]:
    """Median wall time (ms) of each callable, timed in turn so that load from other jobs hits them alike; on
    ``threads`` CPU threads when given (a job may train on more threads than its speed-ups are stated for). ``load``:
    where the machine's load average is logged before the warm-up and after each round."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    log_load = load.read if load is not None else (lambda: None)
    with cpu_threads(threads):
        log_load()
        for f in fns.values():
            f(), f()  # warm-up
        for _ in range(reps):
            for k, f in fns.items():
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                times[k].append(1000 * (time.perf_counter() - t0))
            log_load()
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass(frozen=True)
class Timing:
    """How models are timed against each other: round-robin, the median of ``reps`` runs on ``batch`` x ``seq``
    tokens, on ``threads`` CPU threads (None: the job's)."""

    reps: int = 20
    batch: int = 32
    seq: int = 40
    threads: int | None = None

    def ms(self, fns: dict[str, Callable[[], Any]], device: torch.device, *, load: LoadLog | None = None
           ) -> dict[str, float]:
        """``round_robin_ms`` of ``fns`` with these settings (the machine's load logged in ``load`` when given)."""
        return round_robin_ms(fns, self.reps, device, threads=self.threads, load=load)

    def threads_used(self) -> int:
        """The CPU threads these timings run on."""
        return self.threads or torch.get_num_threads()


@torch.no_grad()
def lm_speed(models: dict[str, SwappableModel], prompt: torch.Tensor, *, decode_tokens: int = 32, reps: int = 5,
             load: LoadLog | None = None) -> dict[str, dict[str, float]]:
    """Prefill and decode tokens/s of causal LMs, timed round-robin (median of ``reps``).

    Prefill: one forward over the ``prompt`` batch [B, T] and the logits of its last position. Decode: greedy
    generation with the KV cache from the first prompt row; the tokens after the first, over the time beyond that
    row's own prefill. ``load``: where the machine's load is logged while they run."""
    device = prompt.device
    fns: dict[str, Callable[[], Any]] = {}
    for who, m in models.items():
        m.eval()
        fns[f"{who}/prefill"] = lambda m=m: m.lm_logits(m(prompt, with_logits=False).last_hidden_state[:, -1])
        fns[f"{who}/prefill_one"] = lambda m=m: m.lm_logits(m(prompt[:1], with_logits=False).last_hidden_state[:, -1])
        fns[f"{who}/generate"] = lambda m=m: m.generate(prompt[:1], decode_tokens)
    ms = round_robin_ms(fns, reps, device, load=load)
    out = {}
    for who in models:
        decode_ms = max(ms[f"{who}/generate"] - ms[f"{who}/prefill_one"], 1e-6)
        out[who] = {"prefill_tokens_per_s": 1000 * prompt.numel() / ms[f"{who}/prefill"],
                    "decode_tokens_per_s": 1000 * (decode_tokens - 1) / decode_ms,
                    "prefill_ms": ms[f"{who}/prefill"], "decode_ms_per_token": decode_ms / (decode_tokens - 1)}
    return out


def decoder_costs(teacher: SwappableModel, student: SwappableModel, prompt: torch.Tensor, *, decode_tokens: int = 32,
                  reps: int = 5) -> dict[str, float]:
    """KV-cache bytes per token and prefill / decode tokens/s of a decoder teacher and student (``lm_speed``, on
    ``prompt``: at most 4 windows), and the machine's load while they were timed (``LoadLog.summary``, ``timing_``
    before each key)."""
    load = LoadLog()
    speed = lm_speed({"teacher": teacher, "student": student}, prompt[:4], decode_tokens=decode_tokens, reps=reps,
                     load=load)
    out = {f"{who}_kv_cache_bytes_per_token": m.config.kv_cache_bytes_per_token()
           for who, m in (("teacher", teacher), ("student", student))}
    for who, v in speed.items():
        out.update({f"{who}_{k}": x for k, x in v.items()})
    out["prefill_speedup"] = speed["student"]["prefill_tokens_per_s"] / speed["teacher"]["prefill_tokens_per_s"]
    out["decode_speedup"] = speed["student"]["decode_tokens_per_s"] / speed["teacher"]["decode_tokens_per_s"]
    out.update({f"timing_{k}": v for k, v in load.summary().items()})
    return out
