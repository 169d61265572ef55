"""lm-evaluation-harness (``pip install lm-eval``) on a decoder teacher and its student, side by side.

Each model runs through lm-eval's own ``HFLM`` (``harness_model.InMemoryLM``), handed our model in memory inside
the transformers class its remote-code export loads (``models/modeling_compact_llama.py``): lm-eval's tokenisation,
request batching, rolling windows and metrics are its own, and the forward pass is ours, with no export written and
read back. The numbers equal ``HFLM(pretrained=<exported folder>)`` on the same tasks (tests/utils/evaluation).

Tasks are lm-eval's names (piqa, hellaswag, ...; their data comes from the Hugging Face Hub) or the names of YAML
task files in ``task_dir`` (lm-eval's ``--include_path``): with ``dataset_path: json`` and
``dataset_kwargs: {data_files: ...}`` a task reads local files and needs no network. Everything that can be checked
without the models (lm-eval installed, every task known, its data readable) is checked by ``load_tasks``, before
any model loads.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from models import family_of
from models.base import SwappableModel
from models.config import ModelConfig
from ..errors import SettingError

log = logging.getLogger(__name__)
SKIPPED_KEYS = ("alias", "name", "sample_len", "samples")  # entries of a task's results that are not metrics


class HarnessError(RuntimeError):
    """lm-eval cannot run what was asked (not installed, a task's data unreadable); the message says what to do."""


@dataclass(frozen=True)
class HarnessConfig:
    """Which lm-eval tasks to run on teacher and student, and how."""

    tasks: tuple[str, ...]  # lm-eval task (or group) names, or the names of YAML tasks in task_dir
    task_dir: str | None = None  # a folder of lm-eval YAML task files (lm-eval's --include_path)
    limit: int | None = None  # at most this many documents per task (None: all)
    batch_size: int = 1  # lm-eval's batch size (its own default)


@dataclass
class Tasks:
    """Tasks checked by ``load_tasks``: the config and lm-eval's task index that finds them."""

    config: HarnessConfig
    manager: Any  # lm_eval.tasks.TaskManager


def need_causal_lm(teacher: ModelConfig | SwappableModel) -> None:
    """Refuse a masked-LM teacher: lm-eval's tasks score next-token likelihoods and generations."""
    if family_of(teacher).task != "causal":
        raise SettingError("`tasks`: lm-eval's tasks need a causal LM (they score next-token likelihoods), and this "
                           "teacher is a masked LM")


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise HarnessError(f"lm-evaluation-harness is not installed ({e}): pip install lm-eval") from None
    return lm_eval


def _manager(task_dir: str | None, names: tuple[str, ...]):
    """lm-eval's task index over ``task_dir`` alone when it holds every task asked for (indexing lm-eval's own
    ~15,000 tasks takes tens of seconds), else over lm-eval's tasks and ``task_dir`` (whose tasks take precedence)."""
    from lm_eval.tasks import TaskManager

    if task_dir is not None:
        own = TaskManager(include_path=task_dir, include_defaults=False)
        if all(n in own.all_tasks for n in names):
            return own
    return TaskManager(include_path=task_dir)


def load_tasks(config: HarnessConfig) -> Tasks:
    """Check everything lm-eval needs before any model loads: lm-eval importable, ``task_dir`` a folder, every task
    known to lm-eval or found in ``task_dir``, and each task's documents loadable (without the Hub only local
    ones are)."""
    _import_lm_eval()
    if not config.tasks or any(not n.strip() for n in config.tasks):
        raise SettingError(f"`tasks` {','.join(config.tasks)!r}: give lm-eval task names separated by commas")
    if config.task_dir is not None and not Path(config.task_dir).is_dir():
        raise SettingError(f"`task_dir` '{config.task_dir}' is not a folder (of lm-eval YAML task files)")
    manager = _manager(config.task_dir, config.tasks)
    unknown = [n for n in config.tasks if n not in manager.all_tasks]
    if unknown:
        where = f" nor in `task_dir` '{config.task_dir}'" if config.task_dir else ""
        raise SettingError(f"`tasks`: lm-eval has no task {', '.join(repr(n) for n in unknown)} (not among its own "
                           f"tasks{where}); write it as an lm-eval YAML task file in a folder given as `task_dir` "
                           "(with local data: dataset_path: json, dataset_kwargs: {data_files: ...})")
    for name in config.tasks:
        try:
            manager.load([name])
        except Exception as e:  # noqa: BLE001 - whatever lm-eval or datasets raise for a task that cannot be read
            raise HarnessError(f"lm-eval task '{name}' could not be loaded ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:300]}); without the Hugging Face Hub, give a task over "
                               "local files in `task_dir` (dataset_path: json, dataset_kwargs: {data_files: ...})"
                               ) from None
    return Tasks(config, manager)


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's global generators: put them back as they were afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():  # the CPU's and every visible GPU's
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def run_tasks(model: SwappableModel, tokenizer, tasks: Tasks) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of one decoder of ours (on its own device) on ``tasks``: its whole output
    (``results``, ``n-samples``, ``higher_is_better``, ...)."""
    import lm_eval

    from .harness_model import InMemoryLM

    lm = InMemoryLM(model, copy.deepcopy(tokenizer), batch_size=tasks.config.batch_size)  # lm-eval sets a pad token
    with _random_state_kept():
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks.config.tasks), task_manager=tasks.manager,
                                       limit=tasks.config.limit, log_samples=False)


def task_metrics(output: dict[str, Any]) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(task, metric) -> (value, standard error or None) from lm-eval's output; the metric keeps lm-eval's filter
    suffix unless it is the default one (``acc,none`` -> ``acc``)."""
    out = {}
    for task, res in output["results"].items():
        for key, value in res.items():
            name, _, filt = key.partition(",")
            if name in SKIPPED_KEYS or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = res.get(f"{name}_stderr,{filt}")
            metric = name if filt in ("", "none") else f"{name},{filt}"
            out[task, metric] = (float(value), float(err) if isinstance(err, (int, float)) else None)
    return out


@dataclass
class HarnessComparison:
    """lm-eval's metrics of teacher and student, one row per (task, metric)."""

    config: HarnessConfig
    rows: list[dict[str, Any]]
    samples: dict[str, int]  # documents scored per task
    version: str

    def table(self) -> str:
        """Markdown: task, metric, teacher, student, difference (student - teacher), standard errors."""
        def f(v: float | None) -> str:
            return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

        lines = ["| lm-eval task | metric | teacher | student | difference | teacher stderr | student stderr |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['task']} | {r['metric']} | {f(r['teacher'])} | {f(r['student'])} | {f(r['difference'])} | "
                  f"{f(r['teacher_stderr'])} | {f(r['student_stderr'])} |" for r in self.rows]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"tasks": list(self.config.tasks), "task_dir": self.config.task_dir, "limit": self.config.limit,
                "batch_size": self.config.batch_size, "lm_eval_version": self.version, "samples": self.samples,
                "metrics": self.rows}


def _samples(output: dict[str, Any]) -> dict[str, int]:
    return {task: int(n.get("effective", n.get("original", 0))) for task, n in output.get("n-samples", {}).items()}


def compare(teacher: SwappableModel, student: SwappableModel, tokenizer, *, tasks: Tasks) -> HarnessComparison:
    """Teacher and student through lm-eval on the same tasks and documents; their metrics side by side."""
    import lm_eval

    need_causal_lm(teacher)
    log.info("lm-eval on the teacher: %s", ", ".join(tasks.config.tasks))
    theirs = run_tasks(teacher, tokenizer, tasks)
    log.info("lm-eval on the student: %s", ", ".join(tasks.config.tasks))
    ours = run_tasks(student, tokenizer, tasks)
    t, s = task_metrics(theirs), task_metrics(ours)
    rows = []
    for (task, metric), (tv, terr) in t.items():
        sv, serr = s.get((task, metric), (float("nan"), None))
        rows.append({"task": task, "metric": metric, "teacher": tv, "student": sv, "difference": sv - tv,
                     "teacher_stderr": terr, "student_stderr": serr})
    return HarnessComparison(tasks.config, rows, _samples(theirs), getattr(lm_eval, "__version__", "unknown"))
