"""The console a person sees: a stage's own lines, the log's path, everything else in the log.

The ingest stage runs for real, through the CLI, with an interpreter wrapper standing in for
the libraries (a mock): it prints a library-style INFO line with a planted token on stdout and
a Ray-core-style error on stderr before it starts the stage's Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ingest_only_recipe

from workflow.core.console import MARK, console_line

TOKEN = "hf_plantedrunnertoken42"
LIBRARY_NOISE = "INFO 11-27 17:00:00 [loader.py:12] library line"
CORE_NOISE = "E1127 17:00:00 core_worker.cc:123: Actor with class name: 'PreemptionWatcher'"


@pytest.fixture
def noisy_cli(tmp_path):
    """Runs ``workflow`` with the noisy stage interpreter; returns (run, recipe path, run folder)."""
    wrapper = tmp_path / "noisy-python"
    wrapper.write_text(f'#!/bin/sh\necho "{LIBRARY_NOISE} token=$HF_TOKEN"\necho "{CORE_NOISE}" >&2\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    recipe = ingest_only_recipe(tmp_path, "quiet")
    env = {**os.environ, "WORKFLOW_SERVE_PYTHON": str(wrapper), "HF_TOKEN": TOKEN}
    env.pop("WORKFLOW_VERBOSE", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workflow", *args], capture_output=True, text=True, env=env)

    return run, recipe, tmp_path / "runs" / "quiet"


def test_console_shows_the_stage_lines_and_the_log_holds_everything(noisy_cli):
    run, recipe, run_dir = noisy_cli
    proc = run("run", str(recipe), "--stages", "ingest")
    assert proc.returncode == 0, proc.stderr
    log = run_dir / "logs" / "ingest.log"
    assert f"[ingest] log: {log}" in proc.stdout and "[ingest] done" in proc.stdout
    assert "library line" not in proc.stdout + proc.stderr and "core_worker" not in proc.stdout + proc.stderr
    assert MARK not in proc.stdout
    text = log.read_text()
    assert f"{LIBRARY_NOISE} token=***" in text and CORE_NOISE in text and "[ingest] done" in text
    assert TOKEN not in text and MARK not in text
    # The CLI writes the report page once the stages have run (the runner itself knows nothing of it).
    page = (run_dir / "report.html").read_text()
    assert "<b>ingest</b><br>dataset</td><td class=missing>" not in page
    assert "<b>model</b><br>base model</td><td class=missing>not run" in page


def test_verbose_streams_everything(noisy_cli):
    run, recipe, _ = noisy_cli
    proc = run("run", str(recipe), "--stages", "ingest", "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert f"{LIBRARY_NOISE} token=***" in proc.stdout and CORE_NOISE in proc.stderr and "[ingest] done" in proc.stdout


def test_a_failure_prints_one_error_line_and_the_log_tail(noisy_cli):
    run, recipe, run_dir = noisy_cli
    data = yaml.safe_load(recipe.read_text())
    data["ingest"]["source"] = str(recipe.parent / "missing.jsonl")
    recipe.write_text(yaml.safe_dump(data))
    proc = run("ingest", str(recipe))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {recipe.parent / 'missing.jsonl'}: file not found "
                                                "(check ingest.source and ingest.splits)"]
    log = run_dir / "logs" / "ingest.log"
    tail = proc.stdout.split(f"[ingest] failed; the last lines of its log ({log}):\n", 1)[1].splitlines()
    # The wrapper writes one line to stdout, one to stderr: two pipes, relayed by two threads, in either order.
    assert sorted(tail[:2]) == sorted([f"    {LIBRARY_NOISE} token=***", f"    {CORE_NOISE}"])
    assert tail[-1].startswith("    error: ") and "Traceback" not in proc.stdout


def test_workflow_lines_of_ray_workers_reach_the_console():
    """A Ray Train worker's line as the driver receives it: Ray's coloured prefix, the mark, a dedup count."""
    worker = f"\x1b[36m(RayTrainWorker pid=42, ip=10.0.0.2)\x1b[0m [training] step 3/9 loss 1.2{MARK} [repeated 2x]\n"
    assert console_line(worker) == "[training] step 3/9 loss 1.2 [repeated 2x]\n"
    engine = "\x1b[36m(MapWorker(MapBatches(vLLMEngineStageUDF)) pid=7)\x1b[0m warning: a patch not applied\n"
    assert console_line(engine) == "warning: a patch not applied\n"
    assert console_line("\x1b[36m(TrainController pid=9)\x1b[0m Failed to query Ray Train Controller actor state.\n") is None
    assert console_line("[INFO|2026-11-27 17:00:00] llamafactory: Version checking has been disabled\n") is None


def test_the_launcher_asks_for_make_setup_when_the_environments_are_missing(tmp_path):
    launcher = Path(__file__).resolve().parents[1] / "bin" / "workflow"
    proc = subprocess.run([str(launcher), "show", "x"], capture_output=True, text=True,
                          env={**os.environ, "WORKFLOW_VENVS": str(tmp_path)})
    assert proc.returncode == 2 and proc.stderr.startswith("error: run `make setup` first")
