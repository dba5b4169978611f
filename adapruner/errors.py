"""The one exception type users see: a one-line message that names the fix."""


class AdaPrunerError(ValueError):
    """Bad input. The CLI prints `error: <message>` and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): the reason in a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
