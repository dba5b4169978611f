"""Outputs appear whole or not at all: staged beside their final path, renamed on success, removed on any error,
SIGINT or SIGTERM; made with the permissions the user's umask gives; their parent checked writable before work
starts."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from adapruner.errors import AdaPrunerError

T = TypeVar("T")
R = TypeVar("R")


def process_umask() -> int:
    """The umask, read from /proc (Linux) without changing it; elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool) -> int:
    """0o777 (directories) or 0o666 (files) less the process umask: what `mkdir`/`open` would have made."""
    return (0o777 if directory else 0o666) & ~process_umask()


def check_writable(path: str | Path, flag: str = "--out") -> None:
    """Refuse a `path` that could not be created: its nearest existing ancestor must be a writable directory."""
    ancestor = Path(path).expanduser().absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise AdaPrunerError(f"cannot write under {ancestor}: pass a {flag} in a directory you can write to")


def check_out_dir(out_dir: str | Path) -> Path:
    """Refuse an existing non-empty directory (nothing is ever overwritten) or one that cannot be created."""
    path = Path(out_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AdaPrunerError(f"output {path} already exists and is not empty: pass a new --out or remove it")
    check_writable(path)
    return path


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir` (which must not hold anything); rename it to `out_dir` on
    success, remove it on any error (SIGTERM included, see `terminate_as_exit`)."""
    target = check_out_dir(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        staging.chmod(umask_mode(directory=True))  # mkdtemp makes it private; the result is an ordinary directory
        yield staging
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; rename it over `path` on success, remove it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(umask_mode(directory=False))  # after the writer: mkstemp (and some writers) make files private
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
