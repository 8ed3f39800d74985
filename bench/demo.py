"""`make demo`, timed: the whole pipeline of a recipe on fresh storage, each stage's seconds, the adapter's metrics.

    .venvs/serve/bin/python bench/demo.py [--recipe recipes/viggo-cpu.yaml] [--storage DIR] [--stages ...]

Runs ``workflow run RECIPE`` (what ``make demo`` runs) in the serve environment with
``WORKFLOW_STORAGE`` set to a fresh temporary folder (``--storage`` to choose one; a recipe with
a fixed ``storage`` keeps it), so every stage runs. Measured: the wall seconds of the whole
command (the runner's start included, as ``time make demo`` measures it, without ``make setup``'s
up-to-date check), each stage's seconds as the runner prints them (``[stage] finished in Ns``),
and from the evaluate stage's manifest each adapter's metrics and its parity with training.
Writes ``bench/results/demo/<machine>.json`` (bench/record.py; ``--out`` to override).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import record  # noqa: E402  (bench/record.py: this script's folder is on the path)

from workflow.core import envs  # noqa: E402

_FINISHED = re.compile(r"^\[(\w+)\] finished in (\d+)s\s*$")
_PARITY = re.compile(r"^(\d+/\d+) rows identical")
CONSTRAINED = "+constrained"  # the evaluate stage's suffix of a constrained variant


def run_pipeline(recipe: Path, stages: str | None, env: dict[str, str]) -> tuple[float, str, int]:
    """``workflow run``, its output passed through: (wall seconds, the output, exit code)."""
    cmd = [envs.python_for(envs.SERVE), "-m", "workflow", "run", str(recipe), *(["--stages", stages] if stages else [])]
    started = time.monotonic()
    lines = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
    return round(time.monotonic() - started, 1), "".join(lines), proc.returncode


def stage_seconds(output: str) -> dict[str, int]:
    """Each stage's seconds, from the runner's ``[stage] finished in Ns`` lines (a stage that was up to date
    prints none)."""
    return {m[1]: int(m[2]) for m in map(_FINISHED.match, output.splitlines()) if m}


def adapter_results(run_uri: str) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """From the run's evaluate manifest: each adapter's (unconstrained) metrics and its parity ("16/16")."""
    from workflow.core import manifest

    found = manifest.read(f"{run_uri}/evaluate")
    if found is None:
        return {}, {}
    summary = found["summary"]
    metrics = {name: values for name, values in summary.get("metrics", {}).items()
               if name != "base" and not name.endswith(CONSTRAINED)}
    parity = {name: m[1] for name, text in (summary.get("parity") or {}).items() if (m := _PARITY.match(text))}
    return metrics, parity


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "viggo-cpu.yaml"))
    parser.add_argument("--storage", help="WORKFLOW_STORAGE for the run (default: a fresh temporary folder)")
    parser.add_argument("--stages", help="passed to workflow run (default: every stage)")
    parser.add_argument("--out", help="result file (default bench/results/demo/<machine>.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        storage = args.storage or tmp
        env = {**envs.stage_environment(envs.SERVE), "WORKFLOW_STORAGE": storage}
        seconds, output, code = run_pipeline(Path(args.recipe), args.stages, env)
        if code != 0:
            raise SystemExit(f"error: workflow run {args.recipe} failed (exit {code}); nothing recorded")
        os.environ["WORKFLOW_STORAGE"] = storage  # the recipe's ${WORKFLOW_STORAGE} as the run saw it
        from workflow.config import load_recipe

        metrics, parity = adapter_results(load_recipe(args.recipe).run_uri)
    first = next(iter(metrics), None)
    figures = {"seconds": seconds, "stage_seconds": stage_seconds(output), "adapter": first,
               "adapter_metrics": metrics.get(first, {}), "parity": parity.get(first),
               "recipe": os.path.relpath(args.recipe, REPO), "cpus": os.cpu_count(),
               "load_avg_1m": round(os.getloadavg()[0], 1)}
    print(f"[demo] {seconds:.0f} s; stages {figures['stage_seconds']}; {first}: {figures['adapter_metrics']}, parity "
          f"{figures['parity']}", flush=True)
    record.write("demo", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
