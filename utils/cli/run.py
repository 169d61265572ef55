"""How a script runs: parse, call the library, and turn what it raises into exit codes and one line a user can act
on (the flags named in place of the library's field names).

Exit codes: 0 success (the last line says where the results are), 1 an expected error (one line ``error: ...``; a bug
shows its traceback and asks for a report), 2 a bad argument or settings that do not fit together or this teacher
(argparse's usage and one line), 143 stopped by SIGTERM or SIGUSR1 (after saving a resume point when training), 130
interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterator

import torch

from models import NoMLMHeadError, TeacherError, kinds
from models.export import ExportError
from models.staging import FULL_DISK_ERRNOS, causes, disk_full
from .. import runtime, stops
from ..data.text import DataError
from ..evaluation.harness import HarnessError
from ..errors import SettingError
from ..planning.planner import PlanError
from ..stops import Stopped
from ..storage.checkpoint import CheckpointError, OutputError, write_failure
from ..storage.lock import UnitBusy
from ..training.loop import TrainingDiverged

# What a user can cause: the project's own exceptions, raised with a message wherever a user mistake is possible,
# plus missing files and the operating system refusing a write. Anything else is a bug: traceback + a request to
# report it. (SettingError is mapped to exit code 2 separately.)
PROJECT_ERRORS = (DataError, CheckpointError, TeacherError, TrainingDiverged, NoMLMHeadError, OutputError, UnitBusy,
                  PlanError, ExportError, HarnessError)
OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
OS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.ENAMETOOLONG)
EXPECTED_ERRORS = PROJECT_ERRORS + OS_ERRORS
BUG_REPORT = ("this is a bug in simplifying-transformers, not a problem with your input: please report it with the "
              "command line and the traceback above")

# the flag of each setting the library's messages name (`field`), spelled as the messages have always spelled it
FLAGS = {
    "teacher": "--teacher", "judge": "--judge", "data_dir": "--data-dir", "seq_len": "--seq-len",
    "batch_size": "--batch-size", "device": "--device", "out": "--out", "run_name": "--run-name",
    "cache_dir": "--cache-dir", "resume": "--resume", "force": "--force", "force_config": "--force-config",
    "lr": "--lr", "init": "--init", "loss_on": "--loss-on", "mask_inputs": "--mask-inputs",
    "relation_heads": "--relation-heads", "num_heads": "--block_heads", "head_dim": "--block_d_k",
    "ffn_dim": "--ffn-dim", "start_from": "--model_checkpoint",
    "kl_weight": "--kl-weight", "mlm_weight": "--mlm-weight", "hidden_weight": "--hidden-weight",
    "hf_dir": "--export-hf", "onnx_file": "--export-onnx", "gguf_file": "--export-gguf", "gguf_type": "--gguf-type",
    "hf_layout": "--hf-layout", "map": "--map", "layers": "--layers",
    "target_speedup": "--target-speedup", "target_params": "--target-params", "cost": "--cost",
    "options": "--options", "heads_set": "--heads-set", "attention": "--attention", "drop_layers": "--drop-layers",
    "drop_every_second": "--drop-every-second", "teacher_device_map": "--teacher-device-map",
    "plan_only": "--plan-only", "target_kv_cache": "--target-kv-cache", "retime_rounds": "--retime-rounds",
    "speed_margin": "--speed-margin", "latency_threads": "--latency-threads", "runtime": "--runtime",
    "tasks": "--lm-eval", "task_dir": "--lm-eval-include",
    "split_by": "--split-by", "train_texts": "--train-text", "data_weight": "--data-weight",
    "chat": "--chat-prompts",
    "texts": "--eval-text", "teacher_topk": "--teacher-topk",
}
_FIELD = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def flag_of(field: str) -> str | None:
    """The flag of a setting: the table above, or an attention kind's own flag (``models.kinds``)."""
    kind_flags = {k.flag.field: k.flag.name for k in kinds.KINDS.values() if k.flag is not None}
    return FLAGS.get(field) or kind_flags.get(field)


def flag_names(text: str) -> str:
    """``text`` with every setting it names (`field`) replaced by its flag; a field without a flag stays as it is."""
    return _FIELD.sub(lambda m: flag_of(m.group(1)) or m.group(0), text)


@contextlib.contextmanager
def flags_in_errors() -> Iterator[None]:
    """Exceptions (and stops) leaving the block name flags where the library named fields (message and traceback
    alike)."""
    try:
        yield
    except BaseException as e:
        if len(e.args) == 1 and isinstance(e.args[0], str):
            e.args = (flag_names(e.args[0]),)
        raise


class _FlagNames(logging.Filter):
    """Log lines name flags where the library named fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "`" in text:
            record.msg, record.args = flag_names(text), None
        return True


def setup_logging(verbose: bool = False) -> None:
    """The library's logging setup, with flags in place of field names."""
    runtime.setup_logging(verbose)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_FlagNames())


def is_expected(e: BaseException) -> bool:
    """True for errors a user can cause and fix (printed as one line), False for bugs (printed with a traceback)."""
    if isinstance(e, EXPECTED_ERRORS):
        return True
    if isinstance(e, OSError) and e.errno in OS_ERRNOS:
        return True
    return isinstance(e, _out_of_memory()) or disk_full(e)  # the latter: in a library's words, or wrapped


def _out_of_memory() -> type:
    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # the former since torch 2.5


def error_line(e: BaseException) -> str:
    """The one line printed for an expected error."""
    if isinstance(e, _out_of_memory()):
        return "error: out of memory on the device; lower --batch-size or --seq-len"
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        what = write_failure(e, Path(e.filename).parent) if e.errno in FULL_DISK_ERRNOS and e.filename \
            else e.strerror
        return f"error: {what}" + (f": '{e.filename}'" if e.filename else "")
    if disk_full(e) and not isinstance(e, PROJECT_ERRORS):  # a project error says it in its own message
        return _full_disk_line(e)
    return "error: " + " ".join(str(e).split())


def _full_disk_line(e: BaseException) -> str:
    """A full disk that a library reported in its own words, or wrapped in another exception: "No space left on
    device" and the file, where an error of the chain names it, else what the library said."""
    named = next((c for c in causes(e) if isinstance(c, OSError) and c.filename and c.errno in FULL_DISK_ERRNOS),
                 None)
    if named is not None:
        return f"error: {write_failure(named, Path(named.filename).parent)}: '{named.filename}'"
    return f"error: No space left on device ({type(e).__name__}: {' '.join(str(e).split())})"


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


def run_main(main: Callable[[argparse.Namespace], Path], parser: argparse.ArgumentParser,
             argv: list[str] | None = None) -> int:
    """Parse, run, and map failures to exit codes (see the module's docstring).

    The last line printed on success says where the results were written. Signals: ``utils.stops`` (a script
    installs its handlers first thing, and they stay until it exits; here they are installed for the call).
    """
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    ok = False
    previous = stops.install_stop_handlers()  # the training loop takes them over while it trains
    try:
        try:
            stops.enter_main()
            with flags_in_errors():
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
    except SettingError as e:  # settings valid one by one but not together, or not for this teacher: as argparse
        close_progress_bars()
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return stops.leave_main(2)
    except Exception as e:  # noqa: BLE001 - sorted into expected errors (one line) and bugs (traceback)
        return stops.leave_main(_failed(e, verbose=getattr(args, "verbose", False)))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        main_process = runtime.is_main_process()  # asked before the group is gone (then every rank says 0)
        if runtime.is_distributed():
            # free what still holds the group (a DDP wrapper in a reference cycle, pending work) while the
            # interpreter is whole: freed during its shutdown instead, gloo's threads can abort the process (-6)
            gc.collect()
            if ok:  # tear down together: a rank still in gloo while another destroys its group can abort
                runtime.barrier()
            torch.distributed.destroy_process_group()
            gc.collect()
    if main_process:
        print(f"results written to {where}", flush=True)
    return stops.leave_main(0)


def _failed(e: Exception, verbose: bool) -> int:
    """An error from a script's main: one line for what a user can fix, the traceback for a bug; exit code 1."""
    close_progress_bars()
    if not is_expected(e):
        traceback.print_exc()
        print(f"error: {BUG_REPORT}", file=sys.stderr)
        return 1
    if verbose:
        raise
    print(error_line(e), file=sys.stderr)
    return 1
