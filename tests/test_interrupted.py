"""Interrupted runs: the runner stopped mid-training and mid-evaluation, then run again.

- Training: SIGKILL to the runner's whole process group (the runner, the stage process and
  the Ray head it started; a lost machine or ``kill -9 -PGID``). The rerun resumes from the
  latest checkpoint in storage and finishes the planned steps.
- Evaluation: SIGTERM to the runner process alone (``kill PID``, a scheduler's stop). The
  runner passes it on, so the stage and its vLLM engine stop too. The rerun writes exactly
  one prediction per input row: none missing, none twice.

Either way the interrupted stage never looks complete (no manifest), and no process of the
interrupted run is left behind: every process it started, Ray workers included, inherits
a marker variable that the test looks for in ``/proc/*/environ``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import CPU_EVALUATE, RUN_MARKER, checkpoint_so_far, run_workflow, wait_until_marked_gone

from workflow.config import load_recipe
from workflow.core import envs, manifest


class Runner:
    """``workflow ARGS`` in its own process group, its output collected line by line."""

    def __init__(self, *args: str):
        self.marker = uuid.uuid4().hex
        env = {**envs.stage_environment(envs.SERVE), RUN_MARKER: self.marker}
        self.proc = subprocess.Popen([envs.python_for(envs.SERVE), "-m", "workflow", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_for(self, what, timeout: float = 900) -> None:
        """Until ``what()`` is true; fails if the runner ends first."""
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None, f"the run ended before the interruption:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, self.output[-3000:]
            time.sleep(0.2)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until_all_gone(self, timeout: float = 90) -> None:
        wait_until_marked_gone(self.marker, timeout)


@pytest.mark.train_env
def test_runner_killed_during_training_resumes_from_the_latest_checkpoint(train_recipe):
    path = train_recipe("interrupted-train",
                        llamafactory={"max_steps": 12, "save_steps": 2, "per_device_train_batch_size": 8})
    recipe = load_recipe(path)
    checkpoints = Path(recipe.run_uri) / "train" / "checkpoints"

    def checkpoint_step() -> int:
        return checkpoint_so_far(checkpoints, "interrupted-train")[1]

    runner = Runner("run", str(path), "--stages", "ingest,model,train")
    try:
        runner.wait_for(lambda: checkpoint_step() >= 2)
    finally:
        os.killpg(runner.proc.pid, signal.SIGKILL)
        runner.proc.wait()
    runner.wait_until_all_gone()
    killed_at = checkpoint_step()
    assert 2 <= killed_at < 12
    assert manifest.read(recipe.run_uri + "/train") is None
    assert "[training] step" in runner.output  # it was training, not starting up

    proc = run_workflow("run", str(path), "--stages", "ingest,model,train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[ingest] up to date" in proc.stdout and "[model] up to date" in proc.stdout
    assert f"resuming from step {killed_at}" in proc.stdout
    summary = manifest.read(recipe.run_uri + "/train")["summary"]
    assert summary["resumed_from_step"] == killed_at and summary["global_step"] == 12


ROWS = 48


def test_runner_stopped_during_evaluation_rerun_has_one_row_per_input_row(make_run):
    import pyarrow.parquet as pq

    processor = {**CPU_EVALUATE["processor"], "batch_size": 8}
    path = make_run("interrupted-eval", rows=ROWS,
                    evaluate={"processor": processor, "sampling_params": {"temperature": 0.0, "max_tokens": 48}})
    out = path.parent / "runs" / "interrupted-eval" / "evaluate"

    runner = Runner("run", str(path), "--stages", "evaluate")
    progress = re.compile(rf"\[evaluate\] \d+/{ROWS} rows")
    try:
        runner.wait_for(lambda: progress.search(runner.output))
        os.kill(runner.proc.pid, signal.SIGTERM)  # the runner alone; it must take the stage down with it
        code = runner.proc.wait(timeout=120)
    finally:
        if runner.proc.poll() is None:
            os.killpg(runner.proc.pid, signal.SIGKILL)
    runner.wait_until_all_gone()
    assert code != 0 and "[run] stopped: stage evaluate failed" in runner.output, runner.output[-2000:]
    assert not (out / "manifest.json").exists() and not (out / "predictions.parquet").exists()

    proc = run_workflow("run", str(path), "--stages", "evaluate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out / "predictions.parquet").to_pandas()
    assert sorted(table["row_id"]) == list(range(ROWS))  # each input row once: none missing, none twice
    assert set(table["variant"]) == {"base"}
    assert manifest.read(str(out))["summary"]["rows"] == ROWS
