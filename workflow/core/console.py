"""The workflow's own console lines, told apart from everything the libraries print.

The runner (``workflow/runner.py``) starts each stage as a child process and shows on the
console only the lines the workflow marks (``say``) and its ``error:`` / ``warning:`` lines;
everything goes to the stage's log file. The mark is a control character that terminals
do not display, at the end of each line: it survives Ray's forwarding of a worker's output
to the driver, which puts ``(ActorName pid=N)`` in front and may append
``[repeated Nx across cluster]``, so a Ray Train worker's step lines reach the console too.
"""

from __future__ import annotations

import re

MARK = "\x02"  # ASCII STX: not whitespace to str.strip/splitlines, unlike \x1c-\x1f
# Ray's prefix on a worker's forwarded line, coloured even into a pipe: "\x1b[36m(RayTrainWorker pid=12, ip=..)\x1b[0m ".
_RAY_PREFIX = re.compile(r"^(?:\x1b\[[\d;]*m)?\(.*? pid=\d+(?:, ip=[^)]*)?\)(?:\x1b\[[\d;]*m)? ")
_ERROR_OR_WARNING = re.compile(r"^(?:error|warning): ")


def say(text: str) -> None:
    """Print a line (or lines) of the workflow's own progress for the console."""
    print("\n".join(line + MARK for line in text.split("\n")), flush=True)


def unmarked(line: str) -> str:
    return line.replace(MARK, "")


def console_line(line: str) -> str | None:
    """What of a stage's output line the quiet console shows (without Ray's prefix), or None."""
    text = _RAY_PREFIX.sub("", line, count=1)
    if MARK in text or _ERROR_OR_WARNING.match(text):
        return unmarked(text)
    return None

