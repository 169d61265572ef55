"""Stops by signal in every phase of a script: one line, exit code 143 (SIGTERM / SIGUSR1) or 130 (SIGINT).

Every script calls ``install_stop_handlers()`` as its first statement, before its heavy imports, and the handlers stay
until the process exits; ``utils.cli.run.run_main`` installs them too (for scripts run in-process). What a signal
does depends on the phase:

- starting (imports, argument parsing): nothing is written yet; the line ``stopped by SIGTERM while starting (nothing
  to save yet)`` and the exit code, at once;
- running (inside the script's main, outside the training loop): ``Stopped`` (SIGINT: ``KeyboardInterrupt``) is
  raised where the program is; ``run_main`` prints its line. Everything written so far is complete (all writes are
  atomic), so nothing needs saving. The training loop takes the signals over while it trains
  (``utils.training.loop``: it saves a resume point first) and hands a signal that came after its last check back to
  these handlers;
- stopping (a stop is under way, its line not yet printed): SIGTERM / SIGUSR1 again change nothing; SIGINT again
  exits at once;
- leaving (the main has ended, ``run_main`` prints the outcome): the signal waits for that line; after a success
  ``run_main`` then returns the signal's code with a line saying that nothing was left to do;
- done (``run_main`` has returned): after a stop line or an error line the process exits at once with that code and
  no further line; after "results written", with the signal's code and a line saying that nothing was left to do.

Imports only the standard library, so that installing costs nothing before the heavy imports; defines ``Stopped``,
what the training loop raises too.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

# exit codes of a stop on each signal: 128 + SIGTERM for the scheduler's signals (what requeue logic expects),
# 130 Ctrl-C
STOP_SIGNALS = {"SIGTERM": 143, "SIGUSR1": 143, "SIGINT": 130}


class Stopped(BaseException):
    """The job was asked to stop (SIGTERM / SIGUSR1 from a scheduler, SIGINT from a user); ``code`` is the exit code.

    Not an ``Exception``: a stop is not an error, and no ``except Exception`` on its way may turn it into one."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class _State:
    """Where the process is (one per process: signal handlers are process-wide)."""

    phase = "starting"  # starting | running | leaving (main has ended, run_main reports) | done
    stopping: str | None = None  # the signal of a stop under way, until run_main has reported it
    late: str | None = None  # a signal that came while run_main was reporting
    code: int | None = None  # run_main's exit code, once done


_state = _State()


def _exit_now(code: int, line: str | None = None) -> None:
    try:
        if line:
            sys.stderr.write(line + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def handler(signum: int, frame) -> None:
    """The process's handler of SIGTERM, SIGUSR1 and SIGINT outside the training loop."""
    name = signal.Signals(signum).name
    code = STOP_SIGNALS.get(name, 143)
    if _state.phase == "starting":
        _exit_now(code, f"stopped by {name} while starting (nothing to save yet)")
    if _state.phase == "done":
        if _state.code == 0:
            _exit_now(code, f"stopped by {name} after the results were written: nothing was left to do")
        _exit_now(_state.code if _state.code is not None else code)
    if _state.phase == "leaving":  # run_main is printing the outcome: it acts on the signal once it has
        _state.late = _state.late or name
        return
    if _state.stopping:
        if name == "SIGINT":
            _exit_now(code, "interrupted again: stopping at once")
        return  # the stop under way ends the process with its line and code
    _state.stopping = name
    if name == "SIGINT":
        raise KeyboardInterrupt
    raise Stopped(f"stopped by {name} while not training: nothing to save (what was written so far is complete); "
                  "rerun the same command (with `resume`) to continue", code)


def install_stop_handlers() -> dict[int, object]:
    """Handle SIGTERM, SIGUSR1 and SIGINT with ``handler`` from now on; returns the handlers they had. Only from the
    main thread (elsewhere nothing is changed)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    return previous


def note_stop(name: str) -> None:
    """A stop is under way (the training loop raises ``Stopped`` after saving): further signals do not start another."""
    _state.stopping = _state.stopping or name


def enter_main() -> None:
    """run_main starts the script's main: from now on a signal raises where the program is."""
    _state.phase, _state.stopping, _state.late, _state.code = "running", None, None, None


def main_ended() -> None:
    """The script's main has returned or raised: run_main reports the outcome; a signal meanwhile waits for it."""
    _state.phase = "leaving"


def leave_main(code: int) -> int:
    """run_main has printed its last line and returns ``code``, or the stop code of a signal that came while it
    reported a success (with a line saying so). From now on a signal exits at once (see ``handler``)."""
    if _state.late and code == 0:
        print(f"stopped by {_state.late} after the results were written: nothing was left to do", file=sys.stderr)
        code = STOP_SIGNALS.get(_state.late, 143)
    _state.phase, _state.code = "done", code
    return code
