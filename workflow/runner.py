"""The runner: the one place that knows the stages, their order and their environments.

Each stage runs as ``<env python> -m workflow.core.stage STAGE RECIPE`` in its own environment;
the stage decides from its manifest whether it is up to date.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import ModuleType

from .config import Recipe
from .core import envs
from .core.errors import WorkflowError
from .core.secrets import redact


@dataclass(frozen=True)
class StageSpec:
    module: str
    env: str
    section: str  # the recipe section that enables it
    doc: str


STAGES: dict[str, StageSpec] = {
    "ingest": StageSpec("workflow.stages.ingest", envs.SERVE, "ingest", "read, validate and write the dataset in LLaMA-Factory form"),
    "model": StageSpec("workflow.stages.model", envs.TRAIN, "model", "build or mirror the base model"),
    "train": StageSpec("workflow.stages.train", envs.TRAIN, "train", "LoRA SFT with LLaMA-Factory inside Ray Train"),
    "evaluate": StageSpec("workflow.stages.evaluate", envs.SERVE, "evaluate", "batch inference with vLLM on Ray Data, metrics, report"),
    "serve": StageSpec("workflow.stages.serve", envs.SERVE, "serve", "OpenAI-compatible Ray Serve LLM app (smoke check in a run)"),
}
ORDER = list(STAGES)
# Commands that run one stage-like job outside the pipeline order.
JOBS: dict[str, StageSpec] = {
    "batch": StageSpec("workflow.stages.batch", envs.SERVE, "evaluate", "batch inference over any dataset"),
}


def stage_module(name: str) -> ModuleType:
    spec = STAGES.get(name) or JOBS.get(name)
    if spec is None:
        raise WorkflowError(f"unknown stage {name!r}; stages are {', '.join(ORDER)}")
    try:
        return importlib.import_module(spec.module)
    except ModuleNotFoundError as err:
        if err.name == spec.module:
            raise WorkflowError(f"the {name} stage is not built yet ({spec.module} does not exist)") from None
        raise


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
    cmd = [envs.python_for(spec.env), "-m", "workflow.core.stage", name, str(recipe.path)]
    if force:
        cmd.append("--force")
    if options:
        cmd += ["--options", json.dumps(options)]
    if debug:
        cmd.append("--debug")
    started = time.monotonic()
    code = _run_relaying_output(cmd, envs.stage_environment(spec.env))
    if code != 0:
        raise StageFailed(name, code)
    print(f"[{name}] finished in {time.monotonic() - started:.0f}s", flush=True)


def _relay(pipe, out) -> None:
    """Copy a child's output line by line (``\r`` ends a line too, for progress bars), secrets masked."""
    pending = b""
    for chunk in iter(lambda: os.read(pipe.fileno(), 65536), b""):
        pending += chunk
        *lines, pending = re.split(rb"(?<=[\r\n])", pending)
        for line in lines:
            out.write(redact(line.decode("utf-8", errors="replace")))
        out.flush()
    if pending:
        out.write(redact(pending.decode("utf-8", errors="replace")))
        out.flush()


def _run_relaying_output(cmd: list[str], env: dict[str, str]) -> int:
    """Run a stage process, relaying its stdout/stderr through this process.

    Relaying (rather than inheriting the file descriptors) lets notebooks show a stage's
    progress and keeps tokens and keys that a library prints out of the console.
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    threads = [threading.Thread(target=_relay, args=(proc.stdout, sys.stdout), daemon=True),
               threading.Thread(target=_relay, args=(proc.stderr, sys.stderr), daemon=True)]
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
    print(f"run {recipe.name}: {' -> '.join(chosen)}  (storage {recipe.run_uri})", flush=True)
    for name in chosen:
        run_stage(name, recipe, force=force, debug=debug, options=(options or {}).get(name))
    return chosen
