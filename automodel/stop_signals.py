"""Ctrl-C (SIGINT) and SIGTERM: the pieces the launcher, the ranks' rendezvous and the engine share.

What each does with a stop signal is in automodel/engine/preemption.py (a rank) and automodel/launch/local.py
(the launcher). Common to all: automodel takes over only a signal whose handler is still Python's default (a
caller's own handler, or submitit's inside a SLURM job, stays), the process says one line, and it ends with
exit code 128+signal (130 for SIGINT, 143 for SIGTERM), as a shell reports a process a signal ended.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(SystemExit):
    """The process ends because it was asked to: its one line has been said. The exit code is 128+signal
    unless `code` says otherwise."""

    def __init__(self, signum: int, code: int | None = None):
        super().__init__(128 + signum if code is None else code)
        self.signum = signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


def say(line: str) -> None:
    """`automodel: <line>` on stderr. Safe inside a signal handler: os.write, not the buffered stream that the
    interrupted code may be in the middle of."""
    os.write(2, f"automodel: {line}\n".encode())


def _is_default(signum: int) -> bool:
    """Python's own handling, or automodel's `at_once` (an outer part of the same process, e.g. the CLI's)."""
    current = signal.getsignal(signum)
    if getattr(current, "automodel_at_once", False):
        return True
    return current is signal.default_int_handler if signum == signal.SIGINT else current == signal.SIG_DFL


def take(signals, handler) -> dict:
    """Install `handler` for each of `signals` whose handler is still Python's default; the handlers replaced,
    for `give_back`. Outside the main thread (where Python cannot install handlers) nothing is taken."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in signals if _is_default(s)}


def quiet_exit() -> None:
    """Once a stop is under way: another stop signal during the interpreter's own exit (which puts Python's
    default actions back, after atexit) is ignored, so the process ends with its code instead of dying by it."""
    if not _QUIET[0]:
        _QUIET[0] = True
        atexit.register(lambda: [signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS])


_QUIET = [False]


def give_back(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)
    previous.clear()


@contextlib.contextmanager
def at_once(what: str):
    """While `what` runs (e.g. "waiting for the other ranks to join"), a stop signal ends the process at once
    with one line."""

    def stop(signum, frame):
        quiet_exit()
        if os.environ.get("RANK", "0") == "0":  # the ranks of a torchrun all get it: one of them says it
            say(f"stopped by {name(signum)} while {what}; nothing was trained or saved")
        raise Stopped(signum)

    stop.automodel_at_once = True  # an inner part may take the signals over, and gives them back after
    previous = take(STOP_SIGNALS, stop)
    try:
        yield
    finally:
        give_back(previous)


_RUNS_ENDED = [0]  # runs of this process that have ended (their own handling has given the signals back)


def run_ended() -> None:
    """A run (or a launcher's ranks) has ended in this process: what is left is the process's own exit."""
    _RUNS_ENDED[0] += 1
    quiet_exit()


@contextlib.contextmanager
def around_the_cli():
    """The CLI's own start-up (imports, config, Hydra) and wind-down, outside a run's handling: a stop signal ends
    the process at once in one line, exit 128+signal, instead of a KeyboardInterrupt traceback (SIGINT) or a
    silent death (SIGTERM). A run inside takes the signals over and gives them back (`take` sees this handler as
    the default). For `automodel.cli.main`: `with stop_signals.around_the_cli(): _main(argv)`."""

    def stop(signum, frame):
        quiet_exit()
        speak = os.environ.get("RANK", "0") == "0" and not os.environ.get("AUTOMODEL_ERROR_DIR")
        if _RUNS_ENDED[0]:  # its work is done and said: end now, without unwinding what is left of the exit
            if speak:
                say(f"stopped by {name(signum)} after the run had ended")
            os._exit(128 + signum)
        if speak:  # under automodel's launcher the launcher speaks
            say(f"stopped by {name(signum)} while starting, before the run began; nothing was trained or saved")
        # at once: an exception raised here lands in whatever is starting (an import), where library code may
        # swallow it and carry on half-imported (a run that then failed with a traceback, seen in scripts/chaos.py)
        os._exit(128 + signum)

    stop.automodel_at_once = True
    previous = take(STOP_SIGNALS, stop)
    try:
        yield
    finally:
        give_back(previous)
