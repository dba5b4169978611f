"""`adapruner dashboard OUT`: optuna-dashboard (`pip install 'adapruner[dashboard]'`) on a search's study storage,
on 127.0.0.1 only, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

from adapruner.errors import AdaPrunerError
from adapruner.searching.search_options import STUDY_FILE, search_record
from adapruner.searching.storage_urls import MASK
from adapruner.searching.study import open_storage

DEFAULT_PORT = 8080


def storage_of(out: Path, storage_url: str | None = None) -> str:
    """The storage URL of the search in `out`: `storage_url` where given, else its search.json's (the default SQLite
    file when none was named). search.json holds a URL without its password: such a storage must be passed again."""
    if not (out / "search.json").is_file():
        raise AdaPrunerError(f"{out} holds no search (no search.json): pass the --out of an `adapruner search`")
    if storage_url is not None:
        return storage_url
    root = out.parent.parent if out.parent.name == "studies" else out  # a second study's files live in OUT/studies/NAME
    recorded = search_record(out, "pass the --out of an `adapruner search`")["storage"]
    if recorded and MASK in recorded:  # written through `shown_url`
        raise AdaPrunerError(f"the search's storage {recorded!r} needs its password: pass --storage URL")
    return recorded or f"sqlite:///{(root / STUDY_FILE).resolve()}"


def check_port_free(port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a port in TIME_WAIT is free
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise AdaPrunerError(f"port {port} on 127.0.0.1 is busy: pass another --port") from None


def serve(out: Path, port: int = DEFAULT_PORT, storage_url: str | None = None) -> None:
    """Serve the dashboard of `out`'s study storage at http://127.0.0.1:PORT/ (prints the address) until stopped."""
    if importlib.util.find_spec("optuna_dashboard") is None:
        raise AdaPrunerError("the dashboard needs optuna-dashboard: pip install 'adapruner[dashboard]'")
    storage = open_storage(storage_of(out, storage_url))
    if not storage.get_all_studies():
        raise AdaPrunerError(f"the storage of {out} holds no study yet: run the search first")
    check_port_free(port)
    from optuna_dashboard import run_server

    print(f"optuna-dashboard for {out} at http://127.0.0.1:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        run_server(storage, host="127.0.0.1", port=port)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM through the CLI's handler: a clean stop
        print("dashboard stopped", flush=True)
