"""Start-up shared by every script: logging, device, process group, seed, teacher, data; and the error wrapper
that turns expected failures into one clear line and a non-zero exit code."""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from models import BertForMaskedLM, NoMLMHeadError, TeacherError, load_teacher, weights_hash
from models.export import ExportError
from . import runtime, stops
from .checkpoint import CheckpointError, probe_writable, write_failure, write_probe
from .cli import UsageError
from .data import (DataError, DataSpec, TokenizedSentences, TokenWindows, load_sentences, make_loader, token_ids_hash,
                   tokenize_split)
from .lock import UnitBusy, UnitLock
from .sensitivity import PlanError
from .train import Stopped, TrainingDiverged

log = logging.getLogger("simplifying_transformers")


class OutputError(RuntimeError):
    """An output folder that cannot be written; the message names the flag and the folder."""


# What a user can cause: the project's own exceptions, raised with a message wherever a user mistake is possible,
# plus missing files and the operating system refusing a write. Anything else is a bug: traceback + a request to
# report it. (UsageError is mapped to exit code 2 separately.)
PROJECT_ERRORS = (DataError, CheckpointError, TeacherError, TrainingDiverged, NoMLMHeadError, OutputError, UnitBusy,
                  PlanError, ExportError)
OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
OS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.ENAMETOOLONG)
EXPECTED_ERRORS = PROJECT_ERRORS + OS_ERRORS
BUG_REPORT = ("this is a bug in simplifying-transformers, not a problem with your input: please report it with the "
              "command line and the traceback above")


def is_expected(e: BaseException) -> bool:
    """True for errors a user can cause and fix (printed as one line), False for bugs (printed with a traceback)."""
    if isinstance(e, EXPECTED_ERRORS):
        return True
    if isinstance(e, OSError) and e.errno in OS_ERRNOS:
        return True
    return isinstance(e, _out_of_memory())


def _out_of_memory() -> type:
    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # the former since torch 2.5


def error_line(e: BaseException) -> str:
    """The one line printed for an expected error."""
    if isinstance(e, _out_of_memory()):
        return "error: out of memory on the device; lower --batch-size or --seq-len"
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        what = write_failure(e, Path(e.filename).parent) if e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename \
            else e.strerror
        return f"error: {what}" + (f": '{e.filename}'" if e.filename else "")
    return "error: " + " ".join(str(e).split())


def close_progress_bars() -> None:
    """End any tqdm bar still drawn, so that what follows starts on its own line."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    drawn = False
    for bar in list(getattr(tqdm, "_instances", ())):
        drawn |= not bar.disable
        bar.close()
    if drawn:  # a bar that is not left on screen ends with a carriage return: end its line
        sys.stderr.write("\n")
    sys.stderr.flush()


@dataclass
class Session:
    args: argparse.Namespace
    device: torch.device
    teacher: BertForMaskedLM
    tokenizer: object
    teacher_hash: str
    data: DataSpec

    def sentences(self, split: str) -> TokenizedSentences | TokenWindows:
        fraction = getattr(self.args, "percentage_data", 1.0)
        ds = tokenize_split(load_sentences(self.data, split, fraction), self.tokenizer, self.args.seq_len,
                            self.teacher.TASK, mask_seed=self.args.seed)
        if isinstance(ds, TokenWindows):
            log.info("%s: %s", split, ds.describe())
        else:
            log.info("%s: %d sentences (%d truncated to --seq-len %d, %d without a maskable token skipped)", split,
                     len(ds), ds.truncated, self.args.seq_len, ds.skipped)
        return ds

    def loader(self, ds: TokenizedSentences, shuffle: bool, batch_size: int | None = None):
        loader, sampler = make_loader(ds, self.tokenizer, batch_size or self.args.batch_size, shuffle=shuffle,
                                      seed=self.args.seed, num_workers=self.args.num_workers,
                                      pin_memory=self.device.type == "cuda", num_replicas=runtime.world_size(),
                                      rank=runtime.rank())
        if shuffle and len(sampler) == 0:  # training: DDP drops batches smaller than the number of processes
            raise DataError(f"the training split ({len(ds)} sentences) yields no batch for {runtime.world_size()} "
                            "processes; use more text or fewer processes")
        return loader, sampler

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
    check_inputs(args)
    device = runtime.select_device(args.device)
    runtime.init_distributed(device)
    runtime.seed_everything(args.seed)
    teacher, tok = load_teacher(args.teacher, device)
    log.info("teacher %s: %s, %d layers, hidden %d, %d heads of %d, %s LM head, %.1fM parameters", args.teacher,
             teacher.config.family,
             len(teacher.layers), teacher.config.hidden_size, teacher.config.num_attention_heads,
             teacher.config.head_dim, "with" if teacher.has_mlm_head else "WITHOUT", teacher.num_parameters() / 1e6)
    spec = DataSpec(dataset=args.dataset, data_dir=args.data_dir, split_ratio=tuple(args.split_ratio), seed=args.seed)
    return Session(args, device, teacher, tok, weights_hash(teacher), spec)


def teacher_config(name_or_path: str):
    """The teacher's Hugging Face config alone (for checking flags and naming outputs before loading weights)."""
    from models.hf import read_hf_config

    return read_hf_config(name_or_path)


def check_seq_len(seq_len: int, name_or_path: str, flag: str) -> None:
    """--seq-len must fit the position embeddings of the model given by ``flag`` (UsageError: exit code 2)."""
    from models.hf import read_hf_config

    positions = read_hf_config(name_or_path).max_position_embeddings
    if seq_len > positions:
        raise UsageError(f"--seq-len {seq_len} is longer than {flag} '{name_or_path}' allows: its "
                         f"max_position_embeddings is {positions}; use --seq-len {positions} or less")


def check_output_dir(path: str | os.PathLike, flag: str = "--out", keep: bool = False) -> Path:
    """Fail before any work if results cannot be written to ``path``; removes the folders it created unless ``keep``.

    Under torchrun only rank 0 probes (it alone writes results; the process group may not exist yet), unless
    ``keep``: every process may write there (each machine's teacher cache), and nothing is removed under another.
    """
    d = Path(path)
    if not keep and int(os.environ.get("RANK", 0)) != 0:
        return d
    created = []
    try:
        if d.exists() and not d.is_dir():
            raise OutputError(f"{flag} '{d}' is an existing file; expected a folder (or a path to create one)")
        for parent in reversed([d, *d.parents]):
            if not parent.exists():
                parent.mkdir(exist_ok=keep)
                created.append(parent)
        write_probe(d)
    except OSError as e:
        raise OutputError(f"{flag} '{d}' is not writable: {write_failure(e, d)}") from None
    finally:
        for c in reversed(created if not keep else []):
            try:
                c.rmdir()
            except OSError:
                pass
    return d


def check_inputs(args: argparse.Namespace) -> None:
    """What can be checked before loading weights or data: teacher (and judge) folders complete, --seq-len within
    their position embeddings, the teacher cache folder writable; --cache-dir defaults to <--out>/cache."""
    from models.hf import check_teacher_files

    check_teacher_files(args.teacher)
    check_seq_len(args.seq_len, args.teacher, "--teacher")
    if getattr(args, "judge", None):
        check_teacher_files(args.judge, "judge")
        check_seq_len(args.seq_len, args.judge, "--judge")
    if hasattr(args, "cache_dir") and args.cache_dir is None:
        args.cache_dir = str(Path(args.out) / "cache")
    if getattr(args, "cache_teacher", False):
        check_output_dir(args.cache_dir, "--cache-dir", keep=True)


@contextlib.contextmanager
def claim_units(unit_dirs: list[Path], what: str = "unit") -> Iterator[list[UnitLock]]:
    """Lock every unit folder this job will train (rank 0 only) for the duration of the ``with`` block, before any
    work: a second job for a unit stops here naming the holder. A holder that dies leaves a lock that the next job
    takes over (see ``utils.lock``). A job that fails leaves no empty folder behind that it created."""
    created = sorted({p for d in unit_dirs for p in (Path(d), *Path(d).parents) if not p.exists()},
                     key=lambda p: len(p.parts), reverse=True)
    try:
        with contextlib.ExitStack() as stack:
            locks = []
            if int(os.environ.get("RANK", 0)) == 0:
                for d in unit_dirs:
                    probe_writable(d)  # an unwritable or full output folder fails here, before any training
                    locks.append(stack.enter_context(UnitLock(d, f"{what} '{d.name}' in '{d.parent}'")))
            yield locks
    except BaseException:
        for p in created:  # deepest first; a folder something was written to stays
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def run_main(main: Callable[[argparse.Namespace], Path], parser: argparse.ArgumentParser,
             argv: list[str] | None = None) -> int:
    """Parse, run, and map failures to exit codes: 2 bad arguments (argparse), 1 expected errors, 143 stopped by
    SIGTERM / SIGUSR1 (after saving a resume point when training), 130 interrupted (SIGINT).

    The last line printed on success says where the results were written. Signals: ``utils.stops`` (a script
    installs its handlers first thing, and they stay until it exits; here they are installed for the call).
    """
    args = parser.parse_args(argv)
    runtime.setup_logging(getattr(args, "verbose", False))
    ok = False
    previous = stops.install_stop_handlers()  # the training loop takes them over while it trains
    try:
        try:
            stops.enter_main()
            where = main(args)
        finally:
            stops.main_ended()
        ok = True
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return stops.leave_main(130)
    except Stopped as e:
        close_progress_bars()
        print(str(e), file=sys.stderr)
        return stops.leave_main(e.code)
    except UsageError as e:  # arguments valid one by one but not together, or not for this teacher: as argparse
        close_progress_bars()
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return stops.leave_main(2)
    except Exception as e:  # noqa: BLE001 - sorted into expected errors (one line) and bugs (traceback)
        close_progress_bars()
        if not is_expected(e):
            traceback.print_exc()
            print(f"error: {BUG_REPORT}", file=sys.stderr)
            return stops.leave_main(1)
        if getattr(args, "verbose", False):
            raise
        print(error_line(e), file=sys.stderr)
        return stops.leave_main(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        main_process = runtime.is_main_process()  # asked before the group is gone (then every rank says 0)
        if runtime.is_distributed():
            if ok:  # tear down together: a rank still in gloo while another destroys its group can abort
                runtime.barrier()
            torch.distributed.destroy_process_group()
    if main_process:
        print(f"results written to {where}", flush=True)
    return stops.leave_main(0)


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
