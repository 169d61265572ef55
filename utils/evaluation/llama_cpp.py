"""Speed in llama.cpp itself (through llama-cpp-python), for students planned with ``runtime`` llama.cpp: the model
is written to a GGUF file by the one exporter (``models.gguf_export``, at the storage type it will be served in) and
timed against the teacher's GGUF round-robin (``speed.round_robin_ms``), the median of ``reps`` runs on ``threads``
CPU threads. Prefill: one sequence of ``seq`` tokens evaluated at once (its last logits included); decode: one new
token after ``seq`` cached ones (the cache is filled once; each run evaluates the same position again). Several
models can be timed in one round-robin (``round_robin_llms``: bench/llama_cpp_speed.py), and a GGUF's per-token NLL
on token windows taken in llama.cpp (``gguf_nll``), to compare its perplexity with ours."""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from models.base import SwappableModel
from models.gguf_export import GGUF_TYPES, export_gguf
from ..errors import SettingError
from .speed import round_robin_ms

SPEEDS = ("prefill", "decode")


def check_llama_cpp(why: str = "`runtime` llama.cpp times students in llama.cpp itself",
                    otherwise: str = ", or plan for another `runtime`") -> None:
    """SettingError (one line: ``why`` llama.cpp is needed, what to do ``otherwise``) when llama-cpp-python is
    missing: nothing can be timed in llama.cpp then."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SettingError(f"{why}: llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)"
                           f"{otherwise}") from None


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


def timing_ids(vocab: int, seq: int) -> list[int]:
    """The ``seq`` token ids every model is timed on: seeded, drawn above the first 1000 ids (special and byte
    tokens) where the vocabulary has them."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(min(1000, vocab - 1), vocab, (seq,), generator=g).tolist()


def round_robin_llms(llms: dict[str, Any], ids: list[int], timing: GgufTiming, *,
                     speeds: tuple[str, ...] = SPEEDS) -> dict[str, float]:
    """``<name>_<speed>_ms`` of every loaded model in ``llms`` (name -> llama_cpp.Llama from ``load_gguf``), timed
    round-robin on ``ids``: the median of ``timing.reps`` runs."""
    fns = {f"{who}_{speed}_ms": _run(m, ids, speed) for speed in speeds for who, m in llms.items()}
    return round_robin_ms(fns, timing.reps, torch.device("cpu"))


def tokens_per_s(ms: dict[str, float], who: str, seq: int) -> dict[str, float]:
    """``prefill_tokens_per_s`` and ``decode_tokens_per_s`` of ``who`` from its times in ``ms`` (a prefill is ``seq``
    tokens, a decode step one)."""
    return {"prefill_tokens_per_s": 1000 * seq / ms[f"{who}_prefill_ms"],
            "decode_tokens_per_s": 1000 / ms[f"{who}_decode_ms"]}


def gguf_nll(path: Path, windows: list[list[int]], *, threads: int = 1) -> list[float]:
    """Per predicted token NLL of the GGUF at ``path`` in llama.cpp, window by window (each evaluated from an empty
    cache, every position's logits kept, no BOS added): what our evaluator scores on the same windows, to compare."""
    import llama_cpp

    n = max(len(w) for w in windows)
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    out: list[float] = []
    try:
        for w in windows:
            llm.reset()
            llm.eval(w)
            logits = torch.from_numpy(llm.scores[:len(w) - 1]).double()
            out += torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="none").tolist()
    finally:
        llm.close()
    return out


class LlamaCppTimer:
    """Times students against the teacher in llama.cpp: the teacher is written to a GGUF (in a scratch folder) and
    loaded once; each student is written, loaded, timed and freed."""

    def __init__(self, teacher: SwappableModel, tokenizer, timing: GgufTiming):
        check_llama_cpp()
        self.timing, self.tokenizer = timing, tokenizer
        self._scratch = tempfile.TemporaryDirectory(prefix="llama_cpp_timing_")
        self.folder = Path(self._scratch.name)
        self.ids = timing_ids(teacher.config.vocab_size, timing.seq)
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
            return round_robin_llms({"teacher": self._teacher, "student": llm}, self.ids, self.timing, speeds=speeds)
        finally:
            llm.close()

    def speeds(self, student: SwappableModel) -> dict[str, Any]:
        """Prefill and decode tokens/s of the teacher and ``student`` in llama.cpp, and the speed-ups (results.json's
        ``llama_cpp``)."""
        ms, t = self.ms(student), self.timing
        out: dict[str, Any] = {"gguf_type": t.gguf_type, "threads": t.threads, "reps": t.reps, "seq": t.seq}
        for who in ("teacher", "student"):
            out.update({f"{who}_{k}": v for k, v in tokens_per_s(ms, who, t.seq).items()})
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


@contextmanager
def llama_timer(teacher: SwappableModel, tokenizer, timing: GgufTiming | None) -> Iterator[LlamaCppTimer | None]:
    """A ``LlamaCppTimer`` of ``teacher`` (its GGUF written and loaded once) for the block, closed after; None when
    ``timing`` is None (nothing is timed in llama.cpp)."""
    if timing is None:
        yield None
        return
    with LlamaCppTimer(teacher, tokenizer, timing) as timer:
        yield timer
