"""The one exception type users see for bad input: its message is a single line naming the problem."""

from __future__ import annotations


class TqedgeError(ValueError):
    """Bad input (file, option, bundle, budget). ``str(err)`` is one line that names the problem.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
