"""`adapruner dashboard OUT`: optuna-dashboard on the study, answering on loopback; clean stop; one-line errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from adapruner.cli import main
from tests.helpers import one_error_line, save_tiny_model, search_args, wait_for, write_pool

pytest.importorskip("optuna_dashboard")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_dashboard_lists_the_study_and_stops_cleanly(tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    write_pool(tmp_path / "a.txt", seed=1)
    out = tmp_path / "s"
    assert main(search_args(tmp_path, out)) == 0
    port = free_port()

    def listed_studies():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                return json.loads(response.read())
        except OSError:  # not listening yet
            return None

    server = subprocess.Popen(
        [sys.executable, "-m", "adapruner.cli", "dashboard", str(out), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    try:
        studies = wait_for(listed_studies, 60, f"the dashboard to answer on port {port}", interval=0.3)
        assert [s["study_name"] for s in studies["study_summaries"]] == ["adapruner"]
    finally:
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr[-2000:]
    assert f"http://127.0.0.1:{port}/" in stdout and "dashboard stopped" in stdout

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        capsys.readouterr()
        assert main(["dashboard", str(out), "--port", str(taken)]) == 2
        assert one_error_line(capsys.readouterr().err, f"port {taken} on 127.0.0.1 is busy: pass another --port")
    assert main(["dashboard", str(tmp_path)]) == 2
    assert one_error_line(capsys.readouterr().err, "holds no search (no search.json)")
