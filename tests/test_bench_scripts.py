"""The serve environment's bench scripts start (``--help``): no test runs them, so a moved import breaks them silently."""

import subprocess
import sys
from pathlib import Path

import pytest

from workflow.core import envs

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", ["serve_latency.py", "serve_soak.py", "batch_throughput.py", "train_scaling.py",
                                    "faults.py"])
def test_bench_script_starts(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], env=envs.stage_environment(envs.SERVE),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
