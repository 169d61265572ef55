"""The one training loop every script uses.

A *task* is an ``nn.Module`` whose ``forward(batch)`` returns ``(loss, logs)`` and whose trainable parts are listed as
*units* (one per retrained block / merged layer / model); each unit keeps its own ``last`` and ``best`` checkpoint.
The loop owns everything else: AdamW, warm-up + decay, per-unit gradient clipping, bf16 autocast and fused AdamW on
CUDA, DistributedDataParallel under torchrun, tqdm, tensorboard, NaN checks, atomic checkpoints and exact resume.

Exact resume: each epoch re-seeds the global RNG from (seed, epoch) and the samplers are seeded by epoch, so
restarting from the end of epoch k replays epoch k+1 bit for bit on CPU.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import runtime
from .checkpoint import CheckpointError, check_meta, load_checkpoint, load_into, probe_writable, save_checkpoint

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# unit metadata a resumed run must share with its resume checkpoint (teacher_hash: unless --force)
RESUME_CHECKED = ("kind", "teacher_hash", "hidden_size", "num_heads", "head_dim", "intermediate_size", "layer",
                  "layers")
# test-only hook: seconds to sleep after every training step, so that tests/test_reliability.py can kill a run
# reliably in the middle of an epoch; unset (0) in normal use
STEP_DELAY_ENV = "SIMPLIFYING_TRANSFORMERS_TEST_STEP_DELAY"


@dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    schedule: str = "linear"
    clip: float = 1.0
    seed: int = 0
    save_every: int = 0
    resume: bool = False
    compile: bool = False
    log_every: int = 10
    max_steps_per_epoch: int | None = None  # for smoke tests and benchmarks
    force: bool = False  # resume although the resume checkpoint was made against another teacher


@dataclass
class Unit:
    """One independently checkpointed trainable module."""

    name: str
    module: nn.Module
    out_dir: Path
    meta: dict[str, Any]  # kind, layer, shapes, teacher, criterion... (epoch and metrics are added at save time)
    metric: str = "loss"  # validation metric of this unit, lower is better
    best: float = math.inf


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


class Trainer:
    def __init__(self, task: nn.Module, units: list[Unit], cfg: TrainConfig, run_dir: str | Path,
                 device: torch.device, evaluate: Callable[[], dict[str, float]],
                 samples: Callable[[], str] | None = None, run_meta: dict[str, Any] | None = None):
        self.task, self.units, self.cfg, self.device = task, units, cfg, device
        self.run_dir = Path(run_dir)
        self.evaluate, self.samples = evaluate, samples
        self.run_meta = run_meta or {}
        self.amp = device.type == "cuda"
        if runtime.is_main_process():
            probe_writable(self.run_dir)
            for u in units:
                probe_writable(u.out_dir)
        params = [p for u in units for p in u.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: the units have no parameter that requires a gradient")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        kw = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, **kw)
        self.model: nn.Module = task
        if runtime.is_distributed():
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            self.model = DDP(task, device_ids=ids)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.start_epoch = 0
        self.global_step = 0
        self.writer = None

    # ---- resume state ----
    @property
    def resume_dir(self) -> Path:
        return self.run_dir / "resume"

    def _train_state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch, "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "best": {u.name: u.best for u in self.units},
        }

    def _try_resume(self) -> None:
        if not self.cfg.resume:
            return
        if not (self.resume_dir / "meta.json").is_file() and not (self.run_dir / "resume.prev" / "meta.json").is_file():
            log.warning("--resume: nothing to resume in %s; starting from scratch", self.run_dir)
            return
        sd, meta, state = load_checkpoint(self.resume_dir, with_train_state=True)
        expected = sorted(u.name for u in self.units)
        if sorted(meta.get("units", [])) != expected:
            raise CheckpointError(
                f"'{self.resume_dir}' holds units {meta.get('units')}, this run trains {expected}: not the same run"
            )
        saved = meta.get("unit_meta", {})
        for u in self.units:
            check_meta(saved.get(u.name, {}), self.resume_dir, force_teacher=self.cfg.force,
                       **{k: u.meta[k] for k in RESUME_CHECKED if k in u.meta})
        for u in self.units:
            prefix = u.name + "."
            load_into(u.module, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                      self.resume_dir)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.global_step = int(state["global_step"])
        for u in self.units:
            u.best = float(state["best"][u.name])
        log.info("resumed from %s: epoch %d done, continuing at epoch %d", self.resume_dir, state["epoch"] + 1,
                 self.start_epoch + 1)

    # ---- checkpoints ----
    def _save(self, epoch: int, metrics: dict[str, float]) -> None:
        if not runtime.is_main_process():
            return
        for u in self.units:
            m = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(u.name + "/")}
            meta = {**u.meta, "epoch": epoch + 1, "metrics": m, "run": self.run_meta}
            sd = u.module.state_dict()
            save_checkpoint(u.out_dir / "last", sd, meta)
            value = m.get(u.metric, math.inf)
            if value < u.best:
                u.best = value
                save_checkpoint(u.out_dir / "best", sd, meta)
            if self.cfg.save_every and (epoch + 1) % self.cfg.save_every == 0:
                save_checkpoint(u.out_dir / f"epoch_{epoch + 1}", sd, meta)
        all_sd = {f"{u.name}.{k}": v for u in self.units for k, v in u.module.state_dict().items()}
        save_checkpoint(self.resume_dir, all_sd, {"kind": "resume", "units": [u.name for u in self.units],
                                                  "unit_meta": {u.name: u.meta for u in self.units},
                                                  "epoch": epoch + 1, "run": self.run_meta},
                        train_state=self._train_state(epoch))

    # ---- the loop ----
    def fit(self, loader: DataLoader, sampler=None) -> dict[str, float]:
        cfg = self.cfg
        steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        if steps_per_epoch == 0:
            raise ValueError("the training split yields no batch (too few sentences for the batch size and ranks?)")
        total = steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.schedule, int(cfg.warmup * total), total))
        self._try_resume()
        if runtime.is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        from tqdm.auto import tqdm

        metrics: dict[str, float] = {}
        step_delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
        for epoch in range(self.start_epoch, cfg.epochs):
            # dropout & masking replay exactly on resume; each rank draws its own (rank 0 as a single process)
            torch.manual_seed(cfg.seed * 7919 + epoch + 1_000_003 * runtime.rank())
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            self.task.train()
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                       disable=not runtime.is_main_process(), dynamic_ncols=True)
            running, t0 = None, time.perf_counter()
            for step, batch in enumerate(loader):
                if step >= steps_per_epoch:
                    break
                batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    loss, logs = self.model(batch)
                if not torch.isfinite(loss):
                    bar.close()
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} (global step "
                        f"{self.global_step + 1}); stopped. The last good checkpoint in {self.run_dir} is kept."
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip > 0:
                    for u in self.units:
                        torch.nn.utils.clip_grad_norm_([p for p in u.module.parameters() if p.grad is not None],
                                                       cfg.clip)
                try:
                    self.optimizer.step()
                except RuntimeError as e:  # a huge --lr: Adam's step size no longer fits a float
                    if "overflow" not in str(e):
                        raise
                    bar.close()
                    raise TrainingDiverged(
                        f"the optimizer step overflowed at epoch {epoch + 1}, step {step + 1} (global step "
                        f"{self.global_step + 1}): {e}; lower --lr. Stopped; the last good checkpoint in "
                        f"{self.run_dir} is kept."
                    ) from None
                self.scheduler.step()
                self.global_step += 1
                lv = loss.item()
                running = lv if running is None else 0.95 * running + 0.05 * lv
                bar.set_postfix(loss=f"{running:.4g}")
                bar.update()
                if step_delay:
                    time.sleep(step_delay)
                if self.writer is not None and self.global_step % cfg.log_every == 0:
                    self.writer.add_scalar("train/loss", lv, self.global_step)
                    self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.global_step)
                    for k, v in logs.items():
                        self.writer.add_scalar(f"train/{k}", float(v), self.global_step)
            bar.close()
            elapsed = time.perf_counter() - t0
            self.task.eval()
            metrics = self.evaluate()
            # a last step with finite loss can still leave NaN weights: never save them over a good checkpoint
            broken = [u.name for u in self.units
                      if not math.isfinite(metrics.get(f"{u.name}/{u.metric}", 0.0))
                      or not all(bool(torch.isfinite(p).all()) for p in u.module.parameters())]
            if broken:
                raise TrainingDiverged(
                    f"the weights or validation {', '.join(sorted({u.metric for u in self.units}))} of "
                    f"{', '.join(broken)} became non-finite in epoch {epoch + 1} (by global step {self.global_step}); "
                    f"stopped before saving. The last good checkpoint in {self.run_dir} is kept."
                )
            if self.writer is not None:
                for k, v in metrics.items():
                    self.writer.add_scalar(f"val/{k}", v, epoch + 1)
                self.writer.flush()
            shown = "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
            log.info("epoch %d/%d  train loss %.4g  %.1fs  %s", epoch + 1, cfg.epochs,
                     float("nan") if running is None else running,
                     elapsed, shown)
            self._save(epoch, metrics)
            if self.samples is not None:
                text = self.samples()  # on every rank: the comparison all-reduces its counts
                if runtime.is_main_process():
                    print(text, flush=True)
        if self.writer is not None:
            self.writer.close()
        runtime.barrier()  # every rank returns once rank 0's checkpoints are on disk
        return metrics


def make_train_config(args: Any) -> TrainConfig:
    """TrainConfig from the shared argparse namespace."""
    return TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
                       schedule=args.schedule, clip=args.clip, seed=args.seed, save_every=args.save_checkpoint_every,
                       resume=args.resume, compile=args.compile,
                       max_steps_per_epoch=getattr(args, "max_steps_per_epoch", None),
                       force=getattr(args, "force", False))

