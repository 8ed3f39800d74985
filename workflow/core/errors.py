"""The one exception type users see.

Every failure a user can fix (bad recipe, bad rows, missing model, unreachable storage)
is raised as :class:`WorkflowError` with a one-line message that names the file or field
and says what to do. The CLI prints it without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations


class WorkflowError(Exception):
    """A user-facing error: ``str(err)`` is one line that says what is wrong and how to fix it."""

    def __init__(self, message: str, *, hint: str | None = None):
        text = " ".join(message.split())
        if hint:
            text = f"{text} ({' '.join(hint.split())})"
        super().__init__(text)
