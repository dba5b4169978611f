"""The one exception type users see: a one-line message that names the fix."""


class AdaPrunerError(ValueError):
    """Bad input. The CLI prints `error: <message>` and exits with code 2."""
