"""Speed in llama.cpp itself (through llama-cpp-python), for students planned with ``runtime`` llama.cpp: the model
is written to a GGUF file by the one exporter (``models.gguf_export``, at the storage type it will be served in) and
timed against the teacher's GGUF round-robin (``speed.round_robin_ms``), the median of ``reps`` runs on ``threads``
CPU threads. Prefill: one sequence of ``seq`` tokens evaluated at once (its last logits included); decode: one new
token after ``seq`` cached ones (the cache is filled once; each run evaluates the same position again)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from models.base import SwappableModel
from models.gguf_export import GGUF_TYPES, export_gguf
from ..errors import SettingError
from .speed import round_robin_ms

SPEEDS = ("prefill", "decode")


def check_llama_cpp() -> None:
    """SettingError (one line) when llama-cpp-python is missing: nothing can be timed in llama.cpp then."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SettingError("`runtime` llama.cpp times students in llama.cpp itself: llama-cpp-python is not "
                           "installed (pip install llama-cpp-python==0.3.36), or plan for another `runtime`") from None


@dataclass(frozen=True)
class GgufTiming:
    """How models are timed in llama.cpp: stored as ``gguf_type``, on ``threads`` CPU threads, the median of
    ``reps`` round-robin runs on ``seq`` tokens."""

    gguf_type: str = "f16"
    threads: int = 1
    reps: int = 20
    seq: int = 40

    def __post_init__(self) -> None:
        if self.gguf_type not in GGUF_TYPES:
            raise SettingError(f"`gguf_type` must be one of {', '.join(GGUF_TYPES)}, got '{self.gguf_type}'")


def load_gguf(path: Path, timing: GgufTiming):
    """llama_cpp.Llama on ``path``, sized for ``timing`` (one batch holds the whole prefill)."""
    import llama_cpp

    n = max(timing.seq, 1)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n + 8, n_batch=n, n_ubatch=n, n_threads=timing.threads,
                           n_threads_batch=timing.threads, verbose=False)


def _run(llm, ids: list[int], speed: str) -> Callable[[], Any]:
    """One timed run of ``speed`` on ``llm`` (for decode, the cache of ``ids`` is filled first)."""
    def prefill() -> None:
        llm.n_tokens = 0  # llama-cpp-python drops the cache from n_tokens on at the next eval
        llm.eval(ids)

    def decode() -> None:
        llm.n_tokens = len(ids)
        llm.eval(ids[:1])

    if speed == "decode":
        prefill()
    return prefill if speed == "prefill" else decode


class LlamaCppTimer:
    """Times students against the teacher in llama.cpp: the teacher is written to a GGUF (in a scratch folder) and
    loaded once; each student is written, loaded, timed and freed."""

    def __init__(self, teacher: SwappableModel, tokenizer, timing: GgufTiming):
        check_llama_cpp()
        self.timing, self.tokenizer = timing, tokenizer
        self._scratch = tempfile.TemporaryDirectory(prefix="llama_cpp_timing_")
        self.folder = Path(self._scratch.name)
        g = torch.Generator().manual_seed(0)
        vocab = teacher.config.vocab_size
        self.ids = torch.randint(min(1000, vocab - 1), vocab, (timing.seq,), generator=g).tolist()
        self._teacher = load_gguf(self._write(teacher, "teacher"), timing)

    def _write(self, model: SwappableModel, name: str) -> Path:
        device = next(model.parameters()).device
        path, _ = export_gguf(model, self.folder / f"{name}.gguf", self.tokenizer, gguf_type=self.timing.gguf_type)
        model.to(device)  # the exporter moves the model to the CPU
        return path

    def ms(self, student: SwappableModel, speeds: tuple[str, ...] = SPEEDS) -> dict[str, float]:
        """``<who>_<speed>_ms`` of the teacher and ``student``, timed round-robin in llama.cpp."""
        llm = load_gguf(self._write(student, "student"), self.timing)
        try:
            fns = {f"{who}_{speed}_ms": _run(m, self.ids, speed)
                   for speed in speeds for who, m in (("teacher", self._teacher), ("student", llm))}
            return round_robin_ms(fns, self.timing.reps, torch.device("cpu"))
        finally:
            llm.close()

    def speeds(self, student: SwappableModel) -> dict[str, Any]:
        """Prefill and decode tokens/s of the teacher and ``student`` in llama.cpp, and the speed-ups (results.json's
        ``llama_cpp``)."""
        ms, t = self.ms(student), self.timing
        out: dict[str, Any] = {"gguf_type": t.gguf_type, "threads": t.threads, "reps": t.reps, "seq": t.seq}
        for who in ("teacher", "student"):
            out[f"{who}_prefill_tokens_per_s"] = 1000 * t.seq / ms[f"{who}_prefill_ms"]
            out[f"{who}_decode_tokens_per_s"] = 1000 / ms[f"{who}_decode_ms"]
        for speed in SPEEDS:
            out[f"{speed}_speedup"] = ms[f"teacher_{speed}_ms"] / ms[f"student_{speed}_ms"]
        return {**out, **ms}

    def close(self) -> None:
        self._teacher.close()
        self._scratch.cleanup()

    def __enter__(self) -> "LlamaCppTimer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
