"""SIGINT and SIGTERM as exceptions that unwind (so staged outputs are removed), deferred where code is not safe
against an exception at any bytecode (optuna's trial bookkeeping), and remembered for the CLI's exit code."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_received: list[int] = []  # the SIGINT/SIGTERM this process received, if any
_pending: list[int] = []  # those received while deferred and not raised yet
_deferred = 0  # how many `interrupts_deferred` hold now (0 inside `interrupts_raised`); set by assignment only, which
# a signal handler cannot split (Python runs handlers at calls and jumps), so no signal leaves it half restored


def _interruption(signum: int) -> BaseException:
    return SystemExit(128 + signum) if signum == signal.SIGTERM else KeyboardInterrupt()


def terminate_as_exit() -> None:
    """Make SIGTERM raise SystemExit(143) like SIGINT raises KeyboardInterrupt, so staging folders are removed; both
    are recorded for `interrupted_by`. Inside `interrupts_deferred` they are recorded and raised later."""

    def stop(signum, _frame):
        _received.append(signum)
        if _deferred:
            _pending.append(signum)
            return
        raise _interruption(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def raise_pending(*_callback_args: object) -> None:
    """Raise the interruption of a signal deferred so far, if any (also an optuna callback: after each trial)."""
    if _pending:
        signum = _pending.pop(0)
        _pending.clear()
        raise _interruption(signum)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run code that is not safe against an exception at any bytecode — optuna's trial bookkeeping: a heartbeat
    thread started but not yet owned by its `with` is never stopped, and the interpreter waits for it forever at
    exit — with SIGINT/SIGTERM recorded instead of raised; they are raised inside `interrupts_raised`, by
    `raise_pending`, or on leaving the outermost. Where the body raises, that error goes out and the deferred signal
    is dropped (`interrupted_by` still names it)."""
    global _deferred
    outer = _deferred
    _deferred = outer + 1
    try:
        yield
    except BaseException:
        if not outer:
            _pending.clear()
        raise
    finally:
        _deferred = outer
    if not outer:
        raise_pending()


@contextmanager
def interrupts_raised() -> Iterator[None]:
    """Inside `interrupts_deferred`: our own work (a trial's objective), where a signal raises at once again."""
    global _deferred
    outer = _deferred
    _deferred = 0
    try:
        raise_pending()
        yield
    finally:
        _deferred = outer


def interruptible(objective: Callable[[T], R]) -> Callable[[T], R]:
    """`objective` run inside `interrupts_raised`."""

    def run(trial: T) -> R:
        with interrupts_raised():
            return objective(trial)

    return run


def interrupted_by() -> int | None:
    """The signal this process received, if any: code that catches only `Exception` (optuna's trial bookkeeping) can
    turn the interruption into another error on its way out, which is still an interruption."""
    return _received[0] if _received else None
