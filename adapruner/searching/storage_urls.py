"""Storage URLs as they may be shown: passwords masked wherever a URL is printed or written, and the database
driver a URL needs named where it is missing."""

from __future__ import annotations

import re

MASK = "***"  # what a password is shown as (SQLAlchemy's rendering)
PASSWORD_PARAMS = re.compile(r"([?&](?:password|sslpassword)=)([^&#]*)")  # libpq also reads a password from these


def shown_url(url: str) -> str:
    """`url` as it may be printed or written anywhere: the password of its user part (everything between `user:` and
    the host's `@`, which may itself hold an unescaped `@`) and of its `password=` parameters shown as `***`."""
    if url.startswith("journal:"):
        return url
    userinfo = _userinfo(url)
    if ":" in userinfo:
        url = url.replace(f"//{userinfo}@", f"//{userinfo.split(':', 1)[0]}:{MASK}@", 1)
    return PASSWORD_PARAMS.sub(rf"\1{MASK}", url)


def _userinfo(url: str) -> str:
    """The `user:password` part of `url` (before the last `@` of its network location, as urllib splits it)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).netloc.rpartition("@")[0]
    except ValueError:
        return ""


def shown_options(values: dict) -> dict:
    """A settings dict (`asdict` of the options) as it may be written: every `storage` URL in it through `shown_url`."""
    shown = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = shown_options(value)
        elif key == "storage" and isinstance(value, str):
            value = shown_url(value)
        shown[key] = value
    return shown


def missing_driver(url: str) -> str | None:
    """The Python module the database driver of an RDB `url` needs where it is not installed, else None (SQLAlchemy
    2.1 reads a plain `postgresql://` with psycopg 3, `postgresql+psycopg2://` with psycopg2)."""
    from sqlalchemy.engine import make_url

    if url.startswith("journal:"):
        return None
    try:
        make_url(url).get_dialect().import_dbapi()
    except ModuleNotFoundError as exc:
        return exc.name
    except Exception:  # not a parseable URL or an unknown dialect: `open_storage` refuses it as it stands
        pass
    return None


def passwords(url: str) -> set[str]:
    """The passwords of `url` (its user part's, its `password=` parameters') as written and as decoded: an error
    message may quote either."""
    from urllib.parse import unquote

    written = [match[1] for match in PASSWORD_PARAMS.findall(url)]
    userinfo = _userinfo(url)
    if ":" in userinfo:
        written.append(userinfo.split(":", 1)[1])
    return {form for secret in written if secret for form in (secret, unquote(secret))}
