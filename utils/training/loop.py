"""The one training loop every script uses.

A *task* is an ``nn.Module`` whose ``forward(batch)`` returns ``(loss, logs)`` and whose trainable parts are listed as
*units* (one per retrained block / merged layer / model). Each unit owns its folder and everything in it: ``last`` and
``best`` checkpoints, its resume point (``resume/``), its run record (``run.json``), its tensorboard log (``tb/``), its
optimizer and schedule. So ``--block 0`` ... ``--block 11`` run as separate jobs into one output folder never touch
each other's state, and ``--block all`` trains all units on one shared teacher pass.

The loop owns everything else: AdamW, warm-up + decay, per-unit gradient clipping, bf16 autocast and fused AdamW on
CUDA, DistributedDataParallel under torchrun (or, with ``fsdp``, FSDP2 sharding of whole models and sharded resume
points: ``sharding``), tqdm, tensorboard, NaN checks, atomic checkpoints, preemption and exact resume.

Exact resume: each epoch re-seeds the global RNG from (seed, epoch) and the samplers are seeded by epoch; a resume
point also stores the RNG states and the position inside the epoch. Restarting from any resume point (end of an epoch,
``--save-every-steps``, or the save made on SIGTERM / SIGUSR1 / SIGINT) replays the rest bit for bit on CPU.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import signal
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from models.staging import write_staged

from .. import runtime
from . import sharding
from ..stops import STOP_SIGNALS, Stopped, note_stop  # STOP_SIGNALS: the exit code of a stop on each signal
from ..storage.checkpoint import (CheckpointError, check_meta, has_checkpoint, load_checkpoint, load_into,
                                  probe_writable, read_meta, remove_checkpoint, resolve_dir, save_checkpoint)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# unit metadata that fixes a unit's shape: a resume point with other values never fits, even with --force-config
SHAPE_KEYS = ("kind", "hidden_size", "num_heads", "head_dim", "intermediate_size", "layer", "layers", "spec")
# training settings a resumed run must share with its resume point (epochs may grow); --force-config accepts others
SETUP_FIELDS = ("lr", "weight_decay", "warmup", "warmup_steps", "schedule", "clip", "seed", "max_steps_per_epoch",
                "optimizer", "betas")
# unit metadata that is not part of the training setup (paths: where the teacher lies may differ between machines)
NOT_SETUP = ("teacher", "init", "sources")


@dataclass
class TrainConfig:
    """The training loop's settings: schedule, optimiser, checkpoints and resuming (the same for every unit)."""

    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    schedule: str = "linear"
    clip: float = 1.0
    seed: int = 0
    save_every: int = 0  # keep an epoch_K snapshot every K epochs
    save_every_steps: int = 0  # write a mid-epoch resume point every K optimizer steps
    resume: bool = False
    compile: bool = False
    log_every: int = 10  # tensorboard scalars every N steps
    print_every: int = 0  # also print the loss every N steps (the seed's --log_freq); 0: the progress bar only
    max_steps_per_epoch: int | None = None  # for smoke tests and benchmarks
    force: bool = False  # resume although the resume point was made against another teacher
    force_config: bool = False  # resume although the training setup differs (logged)
    optimizer: str = "adamw"  # or "adam": the seed's torch.optim.Adam, weight decay as L2 on every parameter
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None  # absolute warm-up steps; None: ``warmup`` (a fraction of all steps)
    fsdp: bool = False  # shard whole models with FSDP2 under torchrun; sharded (DCP) resume points (``sharding``)
    dtype: str = "fp32"  # with fsdp on a GPU: bf16 compute, fp32 master weights
    activation_checkpointing: bool = False  # recompute each layer of a trained model in the backward pass
    # validate before the first step and let the starting weights be ``best``: a run that only makes validation worse
    # (a too-high lr) returns what it started from, and says so
    keep_start: bool = False
    # a narrower feed-forward part (a unit keeping some of its teacher layer's neurons) starts with its output
    # projection refit by least squares on this many of the first training tokens (``models.compress``); 0: the kept
    # neurons' weights as copied
    ffn_refit_tokens: int = 16384
    # after the last epoch, keep the resume point (a later run may grow ``epochs`` and continue from it); False: a
    # finished run removes it — the optimizer state of a whole model is twice its weights (7.3 GB beside the 2.4 GB
    # student of a 0.5B teacher), and a caller that never continues a finished run (a plan's heal) has no use for it
    keep_final_resume: bool = True

    def unsharded(self) -> "TrainConfig":
        """These settings for units that are not whole models (a planner's blocks): no FSDP, no checkpointing."""
        from dataclasses import replace

        return replace(self, fsdp=False, dtype="fp32", activation_checkpointing=False)

    def warmup_steps_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup * total_steps)


@dataclass
class Unit:
    """One independently checkpointed trainable module, owning ``out_dir``."""

    name: str
    module: nn.Module
    out_dir: Path
    meta: dict[str, Any]  # kind, layer, shapes, teacher, criterion... (epoch and metrics are added at save time)
    metric: str = "loss"  # validation metric of this unit, lower is better
    best: float = math.inf
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = field(default=None, repr=False)
    writer: Any = field(default=None, repr=False)

    @property
    def resume_dir(self) -> Path:
        return resume_points(self.out_dir)[0]


@dataclass(frozen=True, order=True)
class Position:
    """Where training stands: ``step`` batches of epoch ``epoch`` (0-based) are done; ``global_step`` in all."""

    epoch: int
    step: int
    global_step: int


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)
    return f


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """``adamw``: AdamW, decoupled weight decay on matrices only (not biases / LayerNorm). ``adam``: the seed's
    torch.optim.Adam, whose weight decay is an L2 term added to the gradient of every trained parameter."""
    kw: dict[str, Any] = {"fused": True} if device.type == "cuda" and not cfg.fsdp else {}  # sharded: foreach
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **kw)
    if cfg.optimizer != "adamw":
        raise ValueError(f"optimizer must be 'adamw' or 'adam', got '{cfg.optimizer}'")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, **kw)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class StopRequests:
    """While installed, SIGTERM / SIGUSR1 / SIGINT only record that a stop was asked for; the loop stops at the next
    step boundary after saving. A second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.signal = self.signal or name
        log.warning("%s received: saving a resume point at the end of this step, then stopping", name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequests"]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, h in self._previous.items():
                signal.signal(sig, h)
            self._previous.clear()
        if self.signal is not None:  # asked for after the loop's last check: the handlers outside the loop act on it
            signal.raise_signal(getattr(signal, self.signal))

    def requested(self) -> str | None:
        """The signal asked for, agreed on by every rank (any rank's request stops all)."""
        if runtime.is_distributed():
            flag = torch.tensor([float(self.signal is not None)], device=_reduce_device())
            if runtime.all_reduce_sum(flag).item() > 0 and self.signal is None:
                self.signal = "SIGTERM"
        return self.signal


def _previous_invocations(f: Path) -> list[dict[str, Any]]:
    """The invocations already recorded in ``run.json`` (none without one). History is only ever appended to: a file
    that cannot be read is kept aside as ``run.json.unreadable.<time>`` with a warning, never silently replaced."""
    import json

    try:
        invocations = json.loads(f.read_text())["invocations"]
        if isinstance(invocations, list):
            return invocations
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError):
        pass
    aside = f.with_name(f"{f.name}.unreadable.{time.strftime('%Y%m%dT%H%M%S')}")
    f.replace(aside)
    log.warning("'%s' could not be read; kept as '%s', a new history starts", f, aside)
    return []


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if (
        torch.distributed.get_backend() == "nccl") else torch.device("cpu")


def run_setup(cfg: TrainConfig, setup: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training setup a run records and a resumed run must share: ``cfg``'s SETUP_FIELDS and ``setup`` (batch size,
    data hash, ...)."""
    return {**{k: getattr(cfg, k) for k in SETUP_FIELDS}, **(setup or {})}


class Trainer:
    """Trains ``units`` on ``task``. ``record`` (argv, arguments, ...) goes into each unit's ``run.json``;
    ``setup`` (batch size, data hash, ...) is the part of the training setup the loop cannot see, checked on resume."""

    def __init__(self, task: nn.Module, units: list[Unit], cfg: TrainConfig, *, run_dir: str | Path,
                 device: torch.device, evaluate: Callable[[], dict[str, float]],
                 samples: Callable[[], str] | None = None, run_meta: dict[str, Any] | None = None,
                 setup: dict[str, Any] | None = None, record: dict[str, Any] | None = None,
                 locks: list | None = None, after_step: Callable[[Position], None] | None = None):
        self.task, self.units, self.cfg, self.device = task, units, cfg, device
        self.run_dir = Path(run_dir)
        self.evaluate, self.samples = evaluate, samples
        self.run_meta = run_meta or {}
        self.setup = run_setup(cfg, setup)
        self.record = record or {}
        self.locks = locks or []
        self.after_step = after_step  # a hook called after every optimizer step (tests use it to stop at a step)
        self.amp = device.type == "cuda"
        if runtime.is_main_process():
            probe_writable(self.run_dir)
            for u in units:
                probe_writable(u.out_dir)
        sharding.prepare(task, units, cfg, device=device)  # before the optimizers: sharding replaces the parameters
        for u in units:
            params = [p for p in u.module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"nothing to train in unit {u.name}: it has no parameter that requires a gradient")
            u.optimizer = make_optimizer(params, cfg, device)
        self.model: nn.Module = task
        if runtime.is_distributed() and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            self.model = DDP(task, device_ids=ids)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.run_id = runtime.all_gather_objects(uuid.uuid4().hex[:16])[0]  # rank 0's: every rank names files alike
        self.start = self.position = Position(0, 0, 0)
        self.resumed_rng: dict[str, Any] | None = None
        self.stops = StopRequests()

    @property
    def start_epoch(self) -> int:
        return self.start.epoch

    @property
    def global_step(self) -> int:
        return self.position.global_step

    # ---- resume points ----
    def _train_state(self, u: Unit, pos: Position, shards_hash: str | None) -> dict[str, Any]:
        """What a resume needs beside the weights; sharded (``shards_hash``): the optimizer is in the shards."""
        from models.hf import weights_hash

        own = ({"optimizer": u.optimizer.state_dict(), "weights_hash": weights_hash(u.module)} if shards_hash is None
               else {"optimizer": {}, "weights_hash": shards_hash, "sharded": True})
        return {"position": asdict(pos), "scheduler": u.scheduler.state_dict(), "best": u.best, "rng": rng_state(),
                "run_id": self.run_id, "unit": u.name, **own}

    def _save_resume(self, pos: Position) -> None:
        """Each unit's resume point at ``pos``; with ``fsdp`` every rank first writes its shards (DCP), which rank 0
        moves into the resume point as it swaps it in."""
        for u in self.units:
            shards, shards_hash = None, None
            if self.cfg.fsdp:
                shards = u.out_dir / f"{u.resume_dir.name}.shards.{self.run_id}.{pos.global_step}"
                shards_hash = sharding.write_shards(u.module, u.optimizer, shards, stamp=f"{self.run_id}:{pos}")
            if not runtime.is_main_process():
                continue
            meta = {"kind": "resume", "unit": u.name, "unit_meta": u.meta, "setup": self.setup, "run_id": self.run_id,
                    "position": asdict(pos), "epoch": pos.epoch, "run": self.run_meta}
            # keep the previous point too: with several units, a stop between their saves leaves a common point
            save_checkpoint(u.resume_dir, u.module.state_dict() if shards is None else {}, meta,
                            train_state=self._train_state(u, pos, shards_hash), keep_previous=len(self.units) > 1,
                            folders={sharding.SHARDS: shards} if shards is not None else None)
            sharding.remove_stale_shards(u.out_dir, u.resume_dir.name)  # left by a job that died mid-save
        runtime.barrier()  # no rank stops (and ends the job) while rank 0 still writes

    def _resume_candidates(self, u: Unit) -> list[Path]:
        return [d for d in resume_points(u.out_dir) if has_checkpoint(d)]

    def _check_resume_meta(self, u: Unit, meta: dict[str, Any], where: Path) -> None:
        if meta.get("unit") != u.name:
            raise CheckpointError(f"'{where}' is the resume point of unit {meta.get('unit')!r}, not of {u.name!r}")
        saved = meta.get("unit_meta", {})
        # a resume point written before units stored their whole spec is checked on the flat shape fields
        check_meta(saved, where, force_teacher=self.cfg.force,
                   **{k: u.meta[k] for k in (*SHAPE_KEYS, "teacher_hash") if k in u.meta
                      and (k != "spec" or k in saved)})
        now = {**{k: v for k, v in u.meta.items() if k not in (*SHAPE_KEYS, "teacher_hash", *NOT_SETUP)},
               **self.setup}
        before = {**{k: v for k, v in saved.items() if k not in (*SHAPE_KEYS, "teacher_hash", *NOT_SETUP)},
                  **meta.get("setup", {})}
        diffs = [f"{k}: resume point has {before.get(k)!r}, this run has {now.get(k)!r}"
                 for k in sorted(set(now) | set(before)) if _differs(before.get(k), now.get(k))]
        if diffs and not self.cfg.force_config:
            raise CheckpointError(
                f"`resume`: the training setup differs from the one of '{where}': " + "; ".join(diffs)
                + ". Rerun with the original settings, train into another `run_name`, or pass `force_config` to "
                "continue with the new settings")
        for d in diffs:
            log.warning("`force_config`: %s: %s", u.name, d)

    def _load_resume(self, u: Unit, where: Path) -> tuple[dict, dict, dict]:
        from models.hf import weights_hash

        sd, meta, state = load_checkpoint(where, with_train_state=True)
        self._check_resume_meta(u, meta, where)
        for key in ("run_id", "unit", "position", "optimizer", "scheduler", "weights_hash", "rng"):
            if key not in state:
                raise CheckpointError(f"'{where}/train_state.pt' has no '{key}': not a resume point of this toolkit")
        if state["run_id"] != meta.get("run_id") or state["unit"] != u.name:
            raise CheckpointError(f"'{where}/train_state.pt' belongs to another run (run {state['run_id']}, unit "
                                  f"{state['unit']}), not to this resume point (run {meta.get('run_id')}, "
                                  f"unit {u.name})")
        if state.get("sharded"):  # the weights and the optimizer state are in its shards (any number of processes)
            sharding.read_shards(u.module, u.optimizer, resolve_dir(where) / sharding.SHARDS,
                                 expected=state["weights_hash"])
            return sd, meta, state
        if self.cfg.fsdp:
            raise CheckpointError(f"'{where}' was written without `fsdp` (one whole state, not shards): resume it "
                                  "without `fsdp`, or train into another `run_name`")
        probe = u.module  # load, then verify that the weights are the ones the training state was saved with
        load_into(probe, sd, where)
        if weights_hash(probe) != state["weights_hash"]:
            raise CheckpointError(f"'{where}': the weights are not the ones its train_state.pt was saved with")
        u.optimizer.load_state_dict(state["optimizer"])
        return sd, meta, state

    def _try_resume(self) -> None:
        if not self.cfg.resume:
            return
        found = {u.name: self._resume_candidates(u) for u in self.units}
        if not any(found.values()):
            log.warning("`resume`: nothing to resume for %s in %s; starting from scratch",
                        ", ".join(u.name for u in self.units), self.run_dir)
            return
        missing = [n for n, c in found.items() if not c]
        if missing:
            having = [n for n, c in found.items() if c]
            run = self._first_save_cut_short(found)
            if run is None:
                raise CheckpointError(f"`resume`: units {missing} have no resume point while {having} do: these were "
                                      "not trained together")
            log.warning("`resume`: units %s have no resume point while %s have their first, all of run %s: that save "
                        "stopped part-way (a full disk, a kill), so the one position every unit has is the start; "
                        "training them all from scratch", missing, having, run)
            if runtime.is_main_process():  # the stopped save's points: this run writes its own at the same places
                for d in (d for c in found.values() for d in c):
                    remove_checkpoint(d)
            runtime.barrier()
            return
        # the newest position every unit has (several units save one after the other; each keeps its previous point)
        points: dict[str, dict[Position, Path]] = {}
        for u in self.units:
            points[u.name] = {}
            for d in found[u.name]:
                meta = read_meta(d)
                if not isinstance(meta.get("position"), dict):
                    raise CheckpointError(f"'{d}' has no position: not a resume point of this version of the toolkit")
                points[u.name][Position(**meta["position"])] = d
        common = set.intersection(*(set(p) for p in points.values()))
        if not common:
            raise CheckpointError("`resume`: the units' resume points are at different positions: "
                                  + "; ".join(f"{n}: {sorted(p)}" for n, p in points.items()))
        pos = max(common)
        run_ids = set()
        for u in self.units:
            _, meta, state = self._load_resume(u, points[u.name][pos])
            u.scheduler.load_state_dict(state["scheduler"])
            self._apply_settings(u)
            u.best = float(state["best"])
            run_ids.add(state["run_id"])
            self.resumed_rng = state["rng"]
        if len(run_ids) > 1:
            raise CheckpointError(f"`resume`: the units' resume points come from different runs {sorted(run_ids)}")
        self.run_id = run_ids.pop()
        self.start = pos
        log.info("resumed from %s: epoch %d done, continuing at epoch %d%s", self.units[0].resume_dir, pos.epoch,
                 pos.epoch + 1, f" after step {pos.step}" if pos.step else "")

    def _first_save_cut_short(self, found: dict[str, list[Path]]) -> str | None:
        """The run whose first resume point reached only some units (a save stopped part-way), else None: every unit
        with a point has just that one, all of one run, and every unit without one records that run in its
        ``run.json`` (written when the run started)."""
        import json

        runs = set()
        for u in self.units:
            if found[u.name]:
                if len(found[u.name]) != 1:
                    return None
                runs.add(read_meta(found[u.name][0]).get("run_id"))
            else:
                try:
                    runs.add(json.loads((u.out_dir / "run.json").read_text()).get("run_id"))
                except (OSError, ValueError, AttributeError):
                    return None
        return runs.pop() if len(runs) == 1 and None not in runs else None

    def _apply_settings(self, u: Unit) -> None:
        """After loading optimizer and schedule states, use this run's lr and weight decay (they are the stored ones
        unless ``force_config`` accepted new ones): the lr at the resumed step follows the new schedule."""
        sched = u.scheduler
        sched.base_lrs = [self.cfg.lr for _ in u.optimizer.param_groups]
        for g, base, lam in zip(u.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            g["initial_lr"] = base
            g["lr"] = base * lam(sched.last_epoch)
            if g["weight_decay"]:
                g["weight_decay"] = self.cfg.weight_decay

    # ---- checkpoints ----
    def _save_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for u in self.units:
            sd = sharding.full_state_dict(u.module)  # sharded: gathered to rank 0 (every rank takes part)
            if not runtime.is_main_process():
                continue
            meta = self._checkpoint_meta(u, metrics, epoch=epoch + 1)
            save_checkpoint(u.out_dir / "last", sd, meta)
            value = meta["metrics"].get(u.metric, math.inf)
            if value < u.best:
                u.best = value
                save_checkpoint(u.out_dir / "best", sd, meta)
            if self.cfg.save_every and (epoch + 1) % self.cfg.save_every == 0:
                save_checkpoint(u.out_dir / f"epoch_{epoch + 1}", sd, meta)

    def _checkpoint_meta(self, u: Unit, metrics: dict[str, float], *, epoch: int) -> dict[str, Any]:
        """A checkpoint's metadata: the unit's own, the epochs done, its validation metrics, this run."""
        m = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(u.name + "/")}
        return {**u.meta, "epoch": epoch, "metrics": m, "run": {**self.run_meta, "run_id": self.run_id}}

    def _save_start(self) -> None:
        """``keep_start``: the starting weights validated and saved as each unit's ``best`` (epoch 0), so that an epoch
        must beat them to replace them."""
        metrics = self._validate(-1)
        log.info("start (before the first step): %s", "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        for u in self.units:
            sd = sharding.full_state_dict(u.module)
            if not runtime.is_main_process():
                continue
            meta = self._checkpoint_meta(u, metrics, epoch=0)
            u.best = meta["metrics"].get(u.metric, math.inf)
            save_checkpoint(u.out_dir / "best", sd, meta)

    def _say_if_start_kept(self) -> None:
        """A warning for each unit whose ``best`` is still its starting weights: training never improved them."""
        if not runtime.is_main_process():
            return
        for u in self.units:
            best = read_meta(u.out_dir / "best")
            if best.get("epoch") == 0:
                log.warning("%s: no epoch beat the starting weights on validation %s (%.4g at the start): best is "
                            "the start, training did not help (a lower lr?)", u.name, u.metric,
                            best.get("metrics", {}).get(u.metric, math.nan))

    def _write_records(self) -> None:
        """``run.json`` of each unit: the run id, the setup, and one entry per invocation (first run, resumes)."""
        import json

        import transformers

        if not runtime.is_main_process():
            return
        invocation = {"argv": sys.argv, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "run_id": self.run_id, "from_position": asdict(self.start), "world_size": runtime.world_size(),
                      "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                   "transformers": transformers.__version__}, **self.record}
        for u in self.units:
            f = u.out_dir / "run.json"
            previous = _previous_invocations(f)  # also of a run that died before its first resume point
            body = {"unit": u.name, "run_id": self.run_id, "setup": self.setup, "unit_meta": u.meta,
                    "invocations": previous + [invocation]}
            write_staged({f: json.dumps(body, indent=2, default=str)})

    # ---- the loop ----
    def fit(self, loader, sampler=None) -> dict[str, float]:
        cfg = self.cfg
        steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        if steps_per_epoch == 0:
            raise ValueError("the training split yields no batch (too few sentences for the batch size and ranks?)")
        total = steps_per_epoch * cfg.epochs
        for u in self.units:
            u.scheduler = torch.optim.lr_scheduler.LambdaLR(
                u.optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps_for(total), total))
        self._try_resume()
        self._write_records()
        if runtime.is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            for u in self.units:
                u.writer = SummaryWriter(str(u.out_dir / "tb"))
        metrics: dict[str, float] = {}
        self.position = self.start
        try:
            with self.stops.installed():
                if cfg.keep_start and self.start == Position(0, 0, 0):
                    self._save_start()
                for epoch in range(self.start.epoch, cfg.epochs):
                    metrics = self._epoch(epoch, loader, sampler, steps_per_epoch=steps_per_epoch) or metrics
        finally:
            for u in self.units:
                if u.writer is not None:
                    u.writer.close()
        runtime.barrier()  # every rank returns once rank 0's checkpoints are on disk
        if cfg.keep_start:
            self._say_if_start_kept()
        if not metrics and self.start.epoch:  # a resume found every epoch done: the last one's, as first returned
            metrics = self._stored_metrics()
        return metrics

    def _stored_metrics(self) -> dict[str, float]:
        """The validation metrics of the last epoch done, as each unit's ``last`` checkpoint stored them: what ``fit``
        returned when that epoch ran, so a caller that continues a finished run (a resumed sensitivity map reusing
        its units) records the same numbers as one that was never stopped."""
        out: dict[str, float] = {}
        for u in self.units:
            stored = read_meta(u.out_dir / "last").get("metrics") or {}
            out.update({f"{u.name}/{k}": v for k, v in stored.items()})
        return out

    def _epoch(self, epoch: int, loader, sampler, *, steps_per_epoch: int) -> dict[str, float]:
        """One epoch: its steps (from the resume position if it is the first), then validation and saves."""
        skip = self._begin_epoch(epoch, sampler)
        t0 = time.perf_counter()
        running = self._steps(epoch, _skip(loader, sampler, skip), skip=skip, steps_per_epoch=steps_per_epoch)
        return self._end_epoch(epoch, running, time.perf_counter() - t0)

    def _begin_epoch(self, epoch: int, sampler) -> int:
        """Random state and sampler for ``epoch``; returns the number of its batches already done (a resume)."""
        skip = self.start.step if epoch == self.start.epoch else 0
        if skip and self.resumed_rng is not None:
            set_rng_state(self.resumed_rng)  # mid-epoch: the RNG exactly as it was after step `skip`
        else:
            # dropout & masking replay exactly on resume; each rank draws its own (rank 0 as a single process)
            torch.manual_seed(self.cfg.seed * 7919 + epoch + 1_000_003 * runtime.rank())
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.task.train()
        return skip

    def _steps(self, epoch: int, batches, *, skip: int, steps_per_epoch: int) -> float | None:
        """The optimizer steps of an epoch under a progress bar; returns the running (smoothed) training loss."""
        from tqdm.auto import tqdm

        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="batch",
                   leave=False, disable=not runtime.is_main_process(), dynamic_ncols=True)
        running = None
        try:
            for step, batch in enumerate(batches, start=skip):
                if step >= steps_per_epoch:
                    break
                lv = self._step(batch, epoch, step)
                running = lv if running is None else 0.95 * running + 0.05 * lv
                bar.set_postfix(loss=f"{running:.4g}")
                bar.update()
                self._print_loss(bar, epoch, step=step, loss=lv, running=running)
                self._after_step(Position(epoch, step + 1, self.position.global_step + 1), steps_per_epoch)
        except BaseException:
            bar.leave = True  # keep the bar where it stopped, so that the error / stop line starts a line of its own
            raise
        finally:
            bar.close()
        return running

    def _print_loss(self, bar, epoch: int, *, step: int, loss: float, running: float) -> None:
        """``print_every`` (the seed's --log_freq): a loss line every N steps (the progress bar shows the running loss
        anyway)."""
        gs = self.position.global_step + 1
        if self.cfg.print_every and gs % self.cfg.print_every == 0 and runtime.is_main_process():
            bar.write(f"epoch {epoch + 1}, step {step + 1} (global step {gs}): loss {loss:.4g}, running "
                      f"{running:.4g}, lr {self.units[0].scheduler.get_last_lr()[0]:.3g}")

    def _after_step(self, position: Position, steps_per_epoch: int) -> None:
        """Advance the position; heartbeat the locks; save a resume point when one is due or a stop was asked."""
        self.position = position
        for lock in self.locks:
            lock.heartbeat()
        if self.after_step is not None:
            self.after_step(position)
        if self.cfg.fsdp and position.global_step == self.start.global_step + 1:  # the optimizer state exists now
            held = [sharding.local_bytes(u.module, u.optimizer) for u in self.units]
            log.info("fsdp: this process holds %.1f MiB of parameters and %.1f MiB of optimizer state (%d processes)",
                     sum(h["parameters"] for h in held) / 2**20, sum(h["optimizer"] for h in held) / 2**20,
                     runtime.world_size())
        stop = self.stops.requested()
        due = (self.cfg.save_every_steps and position.global_step % self.cfg.save_every_steps == 0
               and position.step < steps_per_epoch)  # the epoch's end saves anyway
        if stop or due:
            self._save_resume(position)
        if stop:
            self._stop(stop)

    def _end_epoch(self, epoch: int, running: float | None, elapsed: float) -> dict[str, float]:
        """Validate, log, save last / best and the resume point, print samples; stop here if asked to."""
        metrics = self._validate(epoch)
        shown = "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        loss_text = "n/a (no step)" if running is None else f"{running:.4g}"
        log.info("epoch %d/%d  train loss %s  %.1fs  %s", epoch + 1, self.cfg.epochs, loss_text, elapsed, shown)
        self._save_epoch(epoch, metrics)
        self.position = Position(epoch + 1, 0, self.position.global_step)
        if self._drops_final_resume:
            self._drop_resume()
        else:
            self._save_resume(self.position)
        if self.samples is not None:
            text = self.samples()  # on every rank: the comparison all-reduces its counts
            if runtime.is_main_process():
                print(text, flush=True)
        stop = self.stops.requested()
        if stop:
            self._stop(stop)
        return metrics

    @property
    def _drops_final_resume(self) -> bool:
        """Whether every epoch is done (the position is past the last one) and ``keep_final_resume`` is off: the run
        keeps no resume point."""
        return self.position.epoch >= self.cfg.epochs and not self.cfg.keep_final_resume

    def _drop_resume(self) -> None:
        """The run is finished and ``keep_final_resume`` is off: its units' resume points (and the previous points
        several units keep) are removed; ``best`` and ``last`` stay."""
        if runtime.is_main_process():
            for u in self.units:
                for d in resume_points(u.out_dir):
                    remove_checkpoint(d)
                sharding.remove_stale_shards(u.out_dir, u.resume_dir.name)
            log.info("training finished: resume point removed (keep_final_resume off); best and last kept in %s",
                     ", ".join(str(u.out_dir) for u in self.units))
        runtime.barrier()

    def _stop(self, name: str) -> None:
        note_stop(name)  # a signal while this stop unwinds must not start another
        where = ", ".join(str(u.resume_dir) for u in self.units)
        p = self.position
        if self._drops_final_resume:
            raise Stopped(f"stopped by {name} after the last epoch: training is finished (nothing to resume); its "
                          f"checkpoints are in {', '.join(str(u.out_dir) for u in self.units)}",
                          STOP_SIGNALS.get(name, 143))
        raise Stopped(f"stopped by {name} at epoch {p.epoch + 1}, step {p.step} (global step {p.global_step}); "
                      f"resume point saved to {where}: rerun the same command with `resume` to continue",
                      STOP_SIGNALS.get(name, 143))

    def _step(self, batch, epoch: int, step: int) -> float:
        cfg = self.cfg
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss, logs = self.model(batch)
        gs = self.position.global_step + 1
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} (global step {gs}); stopped. "
                f"The last good checkpoint in {self.run_dir} is kept."
            )
        for u in self.units:
            u.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for u in self.units:
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in u.module.parameters() if p.grad is not None], cfg.clip)
            try:
                u.optimizer.step()
            except RuntimeError as e:  # a huge --lr: Adam's step size no longer fits a float
                if "overflow" not in str(e):
                    raise
                raise TrainingDiverged(
                    f"the optimizer step overflowed at epoch {epoch + 1}, step {step + 1} (global step {gs}): {e}; "
                    f"lower `lr`. Stopped; the last good checkpoint in {self.run_dir} is kept."
                ) from None
            u.scheduler.step()
        lv = loss.item()
        if gs % cfg.log_every == 0:
            for u in self.units:
                if u.writer is None:
                    continue
                own = logs.get(f"{u.name}/loss", lv)
                u.writer.add_scalar("train/loss", float(own), gs)
                u.writer.add_scalar("train/lr", u.scheduler.get_last_lr()[0], gs)
                for k, v in logs.items():
                    if "/" not in k or k.startswith(u.name + "/"):
                        u.writer.add_scalar(f"train/{k.split('/', 1)[-1]}", float(v), gs)
        return lv

    def _validate(self, epoch: int) -> dict[str, float]:
        self.task.eval()
        metrics = self.evaluate()
        # a last step with finite loss can still leave NaN weights: never save them over a good checkpoint
        broken = [u.name for u in self.units
                  if not math.isfinite(metrics.get(f"{u.name}/{u.metric}", 0.0))
                  or not sharding.all_finite(u.module)]
        if broken:
            raise TrainingDiverged(
                f"the weights or validation {', '.join(sorted({u.metric for u in self.units}))} of "
                f"{', '.join(broken)} became non-finite in epoch {epoch + 1} (by global step "
                f"{self.position.global_step}); stopped before saving. The last good checkpoint in {self.run_dir} "
                "is kept."
            )
        for u in self.units:
            if u.writer is not None:
                for k, v in metrics.items():
                    if k.startswith(u.name + "/"):
                        u.writer.add_scalar(f"val/{k.split('/', 1)[1]}", v, epoch + 1)
                u.writer.flush()
        return metrics


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return not math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) != list(b)
    return a != b


def _skip(loader, sampler, n: int):
    """The loader's batches from batch ``n`` on: a sampler that can skip does (no batch is built for nothing)."""
    if n and sampler is not None and hasattr(sampler, "skip"):
        sampler.skip = n
        return loader
    if sampler is not None and hasattr(sampler, "skip"):
        sampler.skip = 0
    return itertools.islice(loader, n, None) if n else loader


def resume_points(unit_dir: str | Path) -> tuple[Path, Path]:
    """Where a unit's resume point lives in ``unit_dir``, and the previous point a save keeps beside it
    (``save_checkpoint(keep_previous=True)``: several units find a position they all reached)."""
    return Path(unit_dir) / "resume", Path(unit_dir) / "resume.old"


def stored_unit_meta(unit_dir: str | Path) -> dict[str, Any] | None:
    """The unit metadata stored with the resume point in ``unit_dir`` (``resume``, else the previous one kept as
    ``resume.old``), or None where there is none: what a resumed run reuses instead of recomputing (the scales of
    balanced loss terms)."""
    for d in resume_points(unit_dir):
        if has_checkpoint(d):
            meta = read_meta(d).get("unit_meta")
            if isinstance(meta, dict):
                return meta
    return None


def run_record(caller: dict[str, Any] | None, *, batch_size: int, train: TrainConfig, **resolved: Any
               ) -> dict[str, Any]:
    """A run record for ``Trainer`` (each unit's run.json, one entry per invocation): the caller's entries (the
    command line's arguments, recipe and explicit flags) and the fully resolved settings: the batch size, the
    training loop's, and what the run decided (``resolved``: the initialisation used, the loss, the shape...)."""
    return {**(caller or {}), "resolved": {"batch_size": batch_size, **asdict(train), **resolved}}
