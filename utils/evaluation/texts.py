"""Named evaluation texts (issue 32): besides the test split, any number of texts (a file or a folder each: held-out
articles, source code, other prose, chat) scored in the same run, each exactly as the test split is.

A decoder reads a text's documents in order (``utils.data.text.read_documents``), joined and cut into the token
windows of the test split (``TokenWindows``: stride = window = ``seq_len``, no BOS); a masked LM reads its lines cut
into sentences (``split_sentences``), each with its seeded [MASK], as it reads its own splits. Each text is compared
by ``compare_models`` like the test split (perplexities and their ratio, top-k, agreement, KL, NLL − entropy), its
results kept per name: in results.json ("texts"), in the printed table (one row per text) and in tensorboard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..data.batches import TokenizedSentences, TokenWindows, tokenize_split
from ..data.text import DataError, Document, read_documents, split_sentences
from ..errors import SettingError
from ..session import Session
from .metrics import compare_models

# what the per-text results leave out: the cost of the models (the test split's report has it)
COST_KEYS = ("teacher_params", "student_params", "param_ratio", "teacher_latency_ms_per_batch",
             "student_latency_ms_per_batch", "speedup")


@dataclass(frozen=True)
class EvalText:
    """A named evaluation text: ``name`` (a simple identifier: the key in results.json and the tensorboard tag) and
    ``path`` (a file, a folder of text files or a JSONL of texts, as ``read_documents`` reads them)."""

    name: str
    path: str

    def __post_init__(self):
        problem = name_problem(self.name)
        if problem:
            raise SettingError(f"`texts`: {problem}")
        if not str(self.path):
            raise SettingError(f"`texts`: '{self.name}' names no path (NAME=PATH)")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a text (None: it can): a simple identifier of ASCII letters, digits and _."""
    if not (name.isascii() and name.isidentifier()):
        return f"the name '{name}' is not a simple identifier (letters, digits and _, not starting with a digit)"
    return None


def parse_text(spec: str) -> EvalText:
    """``NAME=PATH`` as an ``EvalText`` whose path holds text (SettingError / DataError saying what is wrong)."""
    name, eq, path = spec.partition("=")
    if not eq:
        raise SettingError(f"`texts`: expected NAME=PATH, got '{spec}'")
    text = EvalText(name.strip(), path)
    read_documents(path)  # DataError: no such file or folder, or no text in it
    return text


def check_texts(texts: Sequence[EvalText]) -> None:
    """Names unique and paths that exist (SettingError), before any work."""
    seen: set[str] = set()
    for t in texts:
        if not isinstance(t, EvalText):
            raise SettingError(f"`texts` holds EvalText(name, path) items, got {t!r}")
        if t.name in seen:
            raise SettingError(f"`texts`: the name '{t.name}' is given twice")
        seen.add(t.name)
        if not Path(t.path).exists():
            raise SettingError(f"`texts`: '{t.name}': '{t.path}' is neither a file nor a folder")


def read_texts(texts: Sequence[EvalText]) -> dict[str, list[Document]]:
    """Every text's documents, in order (DataError naming a path without text)."""
    check_texts(texts)
    return {t.name: read_documents(t.path) for t in texts}


def text_dataset(docs: list[Document], s: Session) -> TokenizedSentences | TokenWindows:
    """A text as the teacher's task reads its test split: the documents' token windows (causal LM), or their
    sentences with a seeded evaluation mask each (masked LM)."""
    d = s.data
    if s.teacher.TASK == "causal":
        parts = [doc.text for doc in docs]
    else:
        parts = split_sentences([line for doc in docs for line in doc.text.splitlines()], d.min_words)
        if not parts:
            raise DataError(f"no sentence of {d.min_words} words or more in {len(docs)} document(s)")
    return tokenize_split(parts, s.tokenizer, d.seq_len, task=s.teacher.TASK, mask_seed=d.seed)


def score_texts(s: Session, student, texts: Sequence[EvalText], *, docs: dict[str, list[Document]] | None = None,
                max_batches: int | None = None) -> dict[str, dict[str, Any]]:
    """Each text compared like the test split: name -> path, what was counted (documents, windows and tokens, or
    sentences) and the metrics of ``compare_models`` without the models' cost. ``docs``: the texts already read."""
    docs = docs if docs is not None else read_texts(texts)
    out: dict[str, dict[str, Any]] = {}
    for t in texts:
        try:
            ds = text_dataset(docs[t.name], s)
        except DataError as e:
            raise DataError(f"evaluation text '{t.name}' ({t.path}): {e}") from None
        loader, _ = s.loader(ds, shuffle=False)
        m = compare_models(s.teacher, student, loader, tokenizer=s.tokenizer, device=s.device, keep_rows=False,
                           max_batches=max_batches).metrics
        counted = ({"windows": len(ds), "tokens": ds.tokens} if isinstance(ds, TokenWindows) else
                   {"sentences": len(ds), "truncated": ds.truncated})
        out[t.name] = {"path": str(t.path), "documents": len(docs[t.name]), **counted,
                       "metrics": {k: v for k, v in m.items() if k not in COST_KEYS}}
    return out


def _f(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) and math.isfinite(v) else "" if v is None else str(v)


def texts_table(test: dict[str, Any], texts: dict[str, dict[str, Any]], split: str = "test") -> str:
    """One row per text (the ``split`` first, from its metrics ``test``): markdown, for a paper or an issue."""
    causal = "teacher_perplexity" in test
    rows = [(split, test, test.get("predicted_tokens" if causal else "sentences"))]
    rows += [(name, r["metrics"], r["metrics"].get("predicted_tokens" if causal else "sentences"))
             for name, r in texts.items()]
    if causal:
        head = ("| text | predicted tokens | teacher ppl | student ppl | ratio | teacher top-1 | student top-1 | "
                "agreement | KL | teacher NLL − H | student NLL − H |")
        keys = ("teacher_perplexity", "student_perplexity", "perplexity_ratio", "teacher_top1", "student_top1",
                "agreement_top1", "kl_teacher_student", "teacher_overconfidence", "student_overconfidence")
    else:
        head = "| text | sentences | teacher top-1 | student top-1 | teacher top-5 | student top-5 | agreement | KL |"
        keys = ("teacher_top1", "student_top1", "teacher_top5", "student_top5", "agreement_top1",
                "kl_teacher_student")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for name, m, n in rows:
        cells = [name, f"{n:,}" if isinstance(n, int) else _f(n)]
        cells += [_f(m.get(k), 3 if "perplexity" in k else 4) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_scalars(out: str | Path, test: dict[str, Any], texts: dict[str, dict[str, Any]], *, split: str = "test"
                  ) -> Path:
    """The numbers of the table to tensorboard in ``<out>/tb``: ``<split>/<metric>`` and ``texts/<name>/<metric>``
    (step 0), so runs compare text by text in one board."""
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(out) / "tb"
    writer = SummaryWriter(str(folder))
    try:
        for tag, m in [(split, test)] + [(f"texts/{n}", r["metrics"]) for n, r in texts.items()]:
            for k, v in m.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in COST_KEYS:
                    writer.add_scalar(f"{tag}/{k}", v, 0)
    finally:
        writer.close()
    return folder
