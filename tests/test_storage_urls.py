"""Storage URLs as users write them: plain `postgresql://` reaches the server through the driver the `postgres` extra
installs; a driver that is missing is named; a password never shows in output or in any file written."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from adapruner.errors import AdaPrunerError
from adapruner.searching.storage_urls import shown_url
from adapruner.searching.study import open_storage
from tests.helpers import one_error_line, run_cli, save_tiny_model, search_args, write_pool

PASSWORD = "pw-Zq81xK"  # a literal searched for in every output; the test server trusts loopback, so any password works


def with_password(url: str) -> str:
    """`postgresql://adapruner@host:port/db` → `postgresql://adapruner:PASSWORD@host:port/db`."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{PASSWORD}@{host}"


def files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.fixture
def postgres_db(postgres_server, tmp_path):
    from tests.pg_server import create_database

    return create_database(postgres_server, f"s_{abs(hash(str(tmp_path))) % 10**12}")


def test_plain_postgresql_url_reaches_the_server_with_psycopg3(postgres_db):
    assert postgres_db.startswith("postgresql://")
    storage = open_storage(with_password(postgres_db))
    assert storage.engine.dialect.driver == "psycopg"
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1) ** 2, n_trials=2)
    again = optuna.load_study(study_name="s", storage=open_storage(postgres_db.replace("://", "+psycopg2://")))
    assert [t.value for t in again.trials] == [t.value for t in study.trials]  # psycopg2 reads the same study


def test_a_search_on_a_url_with_a_password_leaves_no_trace_of_it(postgres_db, tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    write_pool(tmp_path / "a.txt", seed=1)
    url = with_password(postgres_db)
    code, out, err = run_cli(capsys, *search_args(tmp_path, tmp_path / "s", "--storage", url))
    assert code == 0, err
    assert PASSWORD not in out + err and files_holding(tmp_path, PASSWORD) == []
    assert shown_url(url) in (tmp_path / "s" / "search.json").read_text()  # recorded, masked
    code, _, err = run_cli(capsys, "dashboard", str(tmp_path / "s"), "--port", "1")
    assert code == 2 and one_error_line(err, "needs its password: pass --storage URL")


def test_an_unopenable_url_with_a_password_is_refused_without_it():
    refused = f"postgresql://adapruner:{PASSWORD}@127.0.0.1:1/nodb"  # nobody listens on port 1
    with pytest.raises(AdaPrunerError) as raised:
        open_storage(refused)
    assert "cannot open storage" in str(raised.value) and PASSWORD not in str(raised.value)
    assert "adapruner:***@" in str(raised.value)


def test_a_missing_driver_is_named_without_the_password(tmp_path, capsys):
    save_tiny_model(tmp_path / "model")
    write_pool(tmp_path / "a.txt", seed=1)
    url = f"mysql://user:{PASSWORD}@127.0.0.1/db"  # SQLAlchemy's default MySQL driver, mysqlclient, is not installed
    capsys.readouterr()  # the model's save progress
    code, out, err = run_cli(capsys, *search_args(tmp_path, tmp_path / "s", "--storage", url))
    assert code == 2 and one_error_line(err, "its database driver 'MySQLdb' is not installed")
    assert "mysql://user:***@127.0.0.1/db" in err and PASSWORD not in out + err
    assert files_holding(tmp_path, PASSWORD) == []


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://u:se%40cret@h:5/db", "postgresql://u:***@h:5/db"),
        ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),  # an unescaped @: libpq splits at the last
        ("postgresql://host/db?password=sekret&x=1", "postgresql://host/db?password=***&x=1"),
        ("postgresql://u@h/db?sslmode=a&sslpassword=zz", "postgresql://u@h/db?sslmode=a&sslpassword=***"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
        ("journal:/tmp/s.log", "journal:/tmp/s.log"),
    ],
)
def test_shown_url_masks_every_password_form(url, shown):
    assert shown_url(url) == shown
