"""Start-up shared by every script: logging, device, process group, seed, teacher, data; and the error wrapper
that turns expected failures into one clear line and a non-zero exit code."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from models import BertForMaskedLM, NoMLMHeadError, load_teacher, weights_hash
from . import runtime
from .checkpoint import CheckpointError, probe_writable
from .data import DataError, DataSpec, TokenizedSentences, load_sentences, make_loader, token_ids_hash
from .lock import UnitBusy, UnitLock
from .train import STOP_SIGNALS, Stopped, TrainingDiverged

log = logging.getLogger("simplifying_transformers")

EXPECTED_ERRORS = (DataError, CheckpointError, FileNotFoundError, TrainingDiverged, NoMLMHeadError, UnitBusy,
                   ValueError, IndexError, KeyError, PermissionError, OSError)


@dataclass
class Session:
    args: argparse.Namespace
    device: torch.device
    teacher: BertForMaskedLM
    tokenizer: object
    teacher_hash: str
    data: DataSpec

    def sentences(self, split: str) -> TokenizedSentences:
        fraction = getattr(self.args, "percentage_data", 1.0)
        ds = TokenizedSentences(load_sentences(self.data, split, fraction), self.tokenizer, self.args.seq_len,
                                mask_seed=self.args.seed)
        log.info("%s: %d sentences (%d truncated to --seq-len %d, %d without a maskable token skipped)", split,
                 len(ds), ds.truncated, self.args.seq_len, ds.skipped)
        return ds

    def loader(self, ds: TokenizedSentences, shuffle: bool, batch_size: int | None = None):
        return make_loader(ds, self.tokenizer, batch_size or self.args.batch_size, shuffle=shuffle,
                           seed=self.args.seed, num_workers=self.args.num_workers,
                           pin_memory=self.device.type == "cuda", num_replicas=runtime.world_size(),
                           rank=runtime.rank())

    def training_setup(self, ds: TokenizedSentences) -> dict[str, Any]:
        """What a resumed run must share with its resume point beyond the loop's own settings and the unit's metadata
        (which holds the teacher): the data (a hash of the tokenised training split) and the global batch size."""
        return {"data_hash": token_ids_hash(ds.ids), "global_batch_size": self.args.batch_size * runtime.world_size()}

    def global_batch(self, ds: TokenizedSentences) -> dict:
        """The first batch of ``ds`` as one process with the global batch size (--batch-size x processes) sees it,
        the same on every rank: for choices every rank must make alike (which heads to keep)."""
        loader, _ = make_loader(ds, self.tokenizer, self.args.batch_size * runtime.world_size(), shuffle=False,
                                seed=self.args.seed)
        return next(iter(loader))


def start(args: argparse.Namespace) -> Session:
    runtime.setup_logging(getattr(args, "verbose", False))
    device = runtime.select_device(args.device)
    runtime.init_distributed(device)
    runtime.seed_everything(args.seed)
    teacher, tok = load_teacher(args.teacher, device)
    log.info("teacher %s: %d layers, hidden %d, %d heads of %d, %s MLM head, %.1fM parameters", args.teacher,
             len(teacher.layers), teacher.config.hidden_size, teacher.config.num_attention_heads,
             teacher.config.head_dim, "with" if teacher.has_mlm_head else "WITHOUT", teacher.num_parameters() / 1e6)
    spec = DataSpec(dataset=args.dataset, data_dir=args.data_dir, split_ratio=tuple(args.split_ratio), seed=args.seed)
    return Session(args, device, teacher, tok, weights_hash(teacher), spec)


def teacher_config(name_or_path: str):
    """The teacher's Hugging Face config alone (for checking flags and naming outputs before loading weights)."""
    from transformers import AutoConfig

    from models.hf import resolve_checkpoint

    return AutoConfig.from_pretrained(str(resolve_checkpoint(name_or_path)))


@contextlib.contextmanager
def claim_units(unit_dirs: list[Path], what: str = "unit") -> Iterator[list[UnitLock]]:
    """Lock every unit folder this job will train (rank 0 only) for the duration of the ``with`` block, before any
    work: a second job for a unit stops here naming the holder. A holder that dies leaves a lock that the next job
    takes over (see ``utils.lock``)."""
    with contextlib.ExitStack() as stack:
        locks = []
        if int(os.environ.get("RANK", 0)) == 0:
            for d in unit_dirs:
                probe_writable(d)  # an unwritable or full output folder fails here, before any training
                locks.append(stack.enter_context(UnitLock(d, f"{what} '{d.name}' in '{d.parent}'")))
        yield locks


def _stop_before_training(signum, frame) -> None:
    name = signal.Signals(signum).name
    raise Stopped(f"stopped by {name} before training started (nothing to save yet)", STOP_SIGNALS[name])


def run_main(main: Callable[[argparse.Namespace], Path], parser: argparse.ArgumentParser,
             argv: list[str] | None = None) -> int:
    """Parse, run, and map failures to exit codes: 2 bad arguments (argparse), 1 expected errors, 143 stopped by
    SIGTERM / SIGUSR1 (after saving a resume point when training), 130 interrupted (SIGINT).

    The last line printed on success says where the results were written.
    """
    args = parser.parse_args(argv)
    runtime.setup_logging(getattr(args, "verbose", False))
    ok = False
    previous = {}
    if threading.current_thread() is threading.main_thread():  # the loop takes these over while it trains
        previous = {sig: signal.signal(sig, _stop_before_training) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        where = main(args)
        ok = True
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Stopped as e:
        print(str(e), file=sys.stderr)
        return e.code
    except EXPECTED_ERRORS as e:
        if getattr(args, "verbose", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        main_process = runtime.is_main_process()  # asked before the group is gone (then every rank says 0)
        if runtime.is_distributed():
            if ok:  # tear down together: a rank still in gloo while another destroys its group can abort
                runtime.barrier()
            torch.distributed.destroy_process_group()
    if main_process:
        print(f"results written to {where}")
    return 0


def teacher_cache(s: Session, ds: TokenizedSentences, names: list[str]):
    """The training split's teacher features, built once by rank 0 (others wait, then map the same files).

    On several machines without a shared --cache-dir, each machine's local rank 0 then builds its own copy before
    the other local ranks map it; with a shared folder they just find rank 0's files.
    """
    from .features import TeacherCache

    cache = TeacherCache(s.args.cache_dir, s.teacher, s.teacher_hash, ds.ids, str(s.args.teacher), s.args.seq_len)
    if runtime.is_main_process():
        cache.ensure(names, s.args.batch_size * 4, s.device)
    runtime.barrier()
    if not runtime.is_main_process() and runtime.local_rank() == 0:
        cache.ensure(names, s.args.batch_size * 4, s.device)
    runtime.barrier()
    if runtime.local_rank() != 0:
        cache.ensure(names, s.args.batch_size * 4, s.device)
    return cache


def sample_printer(s: Session, make_student: Callable[[], BertForMaskedLM], loader) -> Callable[[], str]:
    """--print_samples: true word, teacher's and partially retrained model's prediction for a few sentences."""
    from .evaluate import compare_models

    def samples() -> str:
        if not s.teacher.has_mlm_head:
            return "samples: the teacher has no masked-LM head; nothing to print"
        res = compare_models(s.teacher, make_student(), loader, s.tokenizer, s.device, max_batches=1)
        return "\n".join(f"GT: {r['true']:>15}  TEACHER: {r['teacher']:>15}  PRED: {r['student']:>15}  | {r['masked']}"
                         for r in res.rows[:8])
    return samples


def print_units(units, notes: dict[str, str], final: dict[str, float]) -> None:
    """Per-unit summary table after training."""
    if not runtime.is_main_process():
        return
    print("| unit | init | best val loss | last val loss |\n|---|---|---:|---:|")
    for u in units:
        print(f"| {u.name} | {notes.get(u.name, '')[:60]} | {u.best:.5g} | {final.get(u.name + '/loss', float('nan')):.5g} |")
