"""A throw-away PostgreSQL cluster on loopback for the storage tests: initdb + pg_ctl in a temporary directory.

The server binaries come from the system (`.ci/run` installs Debian's `postgresql` when `initdb` is missing). PostgreSQL
refuses to run as root, so under root the cluster belongs to the `postgres` system user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

USER = "adapruner"


def server_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def postgres_cluster():
    """Yield the URL prefix `postgresql://adapruner@127.0.0.1:PORT/` of a fresh cluster: no driver suffix, as users
    write it (SQLAlchemy 2.1 reads it with psycopg 3). Loopback connections are trusted: any password is accepted."""
    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError(
            "PostgreSQL's initdb is not installed: "
            "run .ci/run (it installs Debian's postgresql) or apt-get install postgresql"
        )
    root = Path(tempfile.mkdtemp(prefix="adapruner-pg-"))
    data, port = root / "data", _free_port()
    as_server_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_server_user:
        shutil.chown(root, "postgres")
    run = lambda *argv: subprocess.run([*as_server_user, *argv], check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--no-sync")
        run(
            str(binaries / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-w",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            "start",
        )
        try:
            yield f"postgresql://{USER}@127.0.0.1:{port}/"
        finally:
            run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(server: str, name: str) -> str:
    """A new empty database on the cluster; returns its URL."""
    from sqlalchemy import create_engine, text

    engine = create_engine(server + "postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server + name
