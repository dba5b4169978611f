"""Outputs appear whole or not at all: staged beside their final path, renamed on success, removed on any error,
SIGINT or SIGTERM; made with the permissions the user's umask gives; their parent checked writable before work
starts."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapruner.errors import AdaPrunerError


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
    success, remove it on any error (SIGTERM included, see `interrupts.terminate_as_exit`)."""
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
