"""The runner: runs the stages (``workflow.stages`` lists them) in order, each in its environment.

Each stage runs as ``<env python> -m workflow.stages STAGE RECIPE`` in its own environment;
the stage decides from its manifest whether it is up to date. The runner writes all the stage's
output to ``<run>/logs/<stage>.log`` and shows on the console only the workflow's own lines
(``workflow/core/console.py``), unless ``--verbose`` / ``WORKFLOW_VERBOSE=1`` (or ``--debug``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .config import Recipe
from .core import envs, manifest, storage
from .core.console import console_line, unmarked
from .core.errors import WorkflowError
from .core.secrets import redact
from .core.stage import cache_dir
from .preflight import check_before_run
from .stages import JOBS, ORDER, STAGES

VERBOSE_ENV = "WORKFLOW_VERBOSE"  # "1": the console shows everything the stages print
TAIL_LINES = 20  # of the log, shown when a stage fails


def select_stages(recipe: Recipe, stages: list[str] | None = None, from_stage: str | None = None) -> list[str]:
    for name in (stages or []) + ([from_stage] if from_stage else []):
        if name not in STAGES:
            raise WorkflowError(f"unknown stage {name!r}; stages are {', '.join(ORDER)}")
    chosen = [s for s in ORDER if (stages is None or s in stages)]
    if from_stage:
        chosen = [s for s in chosen if ORDER.index(s) >= ORDER.index(from_stage)]
    return [s for s in chosen if getattr(recipe, STAGES[s].section) is not None]


def run_stage(name: str, recipe: Recipe, *, force: bool = False, options: dict | None = None, debug: bool = False,
              job: bool = False) -> None:
    """Run one stage (or job) in its environment; raise if it fails."""
    spec = (JOBS if job else STAGES)[name]
    cmd = [envs.python_for(spec.env), "-m", "workflow.stages", name, str(recipe.path)]
    if force:
        cmd.append("--force")
    if options:
        cmd += ["--options", json.dumps(options)]
    if debug:
        cmd.append("--debug")
    verbose = debug or os.environ.get(VERBOSE_ENV) == "1"
    log = stage_log(recipe, name)
    published = f" (copied to {log.uri} when the stage succeeds)" if log.uri else ""
    print(f"[{name}] log: {log.path}{published}", flush=True)
    started = time.monotonic()
    with open(log.path, "a", encoding="utf-8") as log_file:
        log_file.write(f"==== {manifest.now()} {name} {recipe.path}\n")
        log_file.flush()
        this_run = log_file.tell()
        code = _run_relaying_output(cmd, envs.stage_environment(spec.env), log=log_file, quiet=not verbose)
    if code != 0:
        print(f"[{name}] failed; its log: {log.path}" if verbose else
              f"[{name}] failed; the last lines of its log ({log.path}):\n{_tail(log.path, this_run)}", flush=True)
        raise StageFailed(name, code)
    if log.uri:
        try:
            storage.write_bytes(log.uri, log.path.read_bytes())
        except WorkflowError as err:
            print(f"warning: the {name} log stays at {log.path}: {err}", file=sys.stderr, flush=True)
    print(f"[{name}] finished in {time.monotonic() - started:.0f}s", flush=True)


@dataclass(frozen=True)
class StageLog:
    path: Path  # where the runner writes it as the stage runs
    uri: str | None  # for a run in a bucket: where it is published when the stage succeeds


def stage_log(recipe: Recipe, name: str) -> StageLog:
    """``<run>/logs/<name>.log``; for a run in a bucket, a local copy under the run's cache folder."""
    uri = storage.join(recipe.run_uri, "logs", f"{name}.log")
    log = (StageLog(storage.local_path(uri), None) if storage.is_local(uri)
           else StageLog(cache_dir(recipe.name) / "logs" / f"{name}.log", uri))
    log.path.parent.mkdir(parents=True, exist_ok=True)
    return log


def _tail(path: Path, start: int) -> str:
    """The last lines the log got from ``start`` on (a progress bar's last state where ``\r`` rewrote
    a line), indented."""
    with open(path, "rb") as f:
        f.seek(max(start, f.seek(0, os.SEEK_END) - 65536))
        text = f.read().decode("utf-8", errors="replace")
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(f"    {line}" for line in lines[-TAIL_LINES:])


def _relay(pipe, out: TextIO, log: TextIO | None, log_lock: threading.Lock, quiet: bool) -> None:
    """Copy a child's output line by line (``\r`` ends a line too, for progress bars), secrets masked:
    all of it to ``log``, to ``out`` all of it or (``quiet``) the workflow's own lines."""
    pending = b""
    for chunk in iter(lambda: os.read(pipe.fileno(), 65536), b""):
        pending += chunk
        *lines, pending = re.split(rb"(?<=[\r\n])", pending)
        for line in lines:
            _relay_line(redact(line.decode("utf-8", errors="replace")), out, log, log_lock, quiet)
        out.flush()
    if pending:
        _relay_line(redact(pending.decode("utf-8", errors="replace")), out, log, log_lock, quiet)
        out.flush()
    if log is not None:
        with log_lock:
            log.flush()


def _relay_line(text: str, out: TextIO, log: TextIO | None, log_lock: threading.Lock, quiet: bool) -> None:
    if log is not None:
        with log_lock:
            log.write(unmarked(text))
    shown = console_line(text) if quiet else unmarked(text)
    if shown is not None:
        out.write(shown)


def _run_relaying_output(cmd: list[str], env: dict[str, str], *, log: TextIO | None = None,
                         quiet: bool = False) -> int:
    """Run a stage process, relaying its stdout/stderr through this process (see ``_relay``).

    Relaying (rather than inheriting the file descriptors) lets notebooks show a stage's
    progress and keeps tokens and keys that a library prints out of the console and the log.
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log_lock = threading.Lock()
    threads = [threading.Thread(target=_relay, args=(proc.stdout, sys.stdout, log, log_lock, quiet), daemon=True),
               threading.Thread(target=_relay, args=(proc.stderr, sys.stderr, log, log_lock, quiet), daemon=True)]
    for t in threads:
        t.start()
    restore = _forward_sigterm(proc)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
    finally:
        restore()
    for t in threads:
        t.join()
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def _forward_sigterm(proc: subprocess.Popen):
    """While ``proc`` runs, a SIGTERM to the runner goes to the stage too; returns the undo.

    Otherwise ``kill RUNNER`` (or a scheduler's stop) ends the runner alone and leaves the
    stage, its Ray cluster and its workers running. The stage stops its Ray cluster on
    SIGTERM (``ray.init`` installs that handler); the runner then reports the failed stage.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    return lambda: signal.signal(signal.SIGTERM, previous)


class StageFailed(Exception):
    """A stage process exited non-zero; it has already printed why."""

    def __init__(self, stage: str, code: int):
        super().__init__(f"stage {stage} failed (exit {code})")
        self.stage, self.code = stage, code


def run_pipeline(recipe: Recipe, *, stages: list[str] | None = None, from_stage: str | None = None,
                 force: bool = False, debug: bool = False, options: dict[str, dict] | None = None) -> list[str]:
    chosen = select_stages(recipe, stages, from_stage)
    if not chosen:
        raise WorkflowError(f"{recipe.path}: no stage to run (the recipe has no section for the stages asked for)")
    # Every failure knowable before the first stage (workflow/preflight.py).
    check_before_run(recipe, chosen, (options or {}).get("serve"))
    print(f"run {recipe.name}: {' -> '.join(chosen)}  (storage {recipe.run_uri})", flush=True)
    for name in chosen:
        run_stage(name, recipe, force=force, debug=debug, options=(options or {}).get(name))
    return chosen
