"""Multi-GPU scaling of the train stage: Ray Train + LLaMA-Factory over NCCL, 1, 2, 4 GPU workers.

For each worker count the train stage runs through the workflow CLI itself
(``python -m workflow.cli run RECIPE --stages ingest,model,train``: Ray Train's ``TorchTrainer``,
LLaMA-Factory's ``run_exp`` in every worker, NCCL, checkpoints reported to Ray Train) with the
``train.llamafactory`` keys of ``recipes/viggo-qwen2.5-7b-fast.yaml`` on the random
Qwen2.5-7B-shaped model of bench/train_throughput.py (built once), the first ``--rows`` ViGGO
rows, ``--epochs`` epochs, one checkpoint (at the end). Weak scaling: every worker keeps the
recipe's micro-batch, so N workers take N times the rows per optimizer step.

Measured per worker count:
- rows/s in steady state: from the stage's step lines (``[training] step S/T ... elapsed Es``),
  the steps after the first ``--skip`` fraction, rows per step = rows x epochs / T;
- each GPU's mean utilisation and peak memory while training (``nvidia-smi`` every second), and
  which process drove which GPU;
- scaling efficiency = rows/s at N / (N x rows/s at 1).

Usage, on a machine with N GPUs and the wheels of ../shared/docs/GPU.md on PYTHONPATH::

    WORKFLOW_TRAIN_PYTHON=python3 WORKFLOW_SERVE_PYTHON=python3 \\
        python3 bench/train_scaling.py --workers 1,2 [--rows 2400] [--epochs 1] [--out FILE.json]

Writes ``bench/results/train_scaling/<machine>.json`` (bench/record.py), after every worker count.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import record  # noqa: E402  (bench/record.py)
import yaml  # noqa: E402

FAST = REPO / "recipes" / "viggo-qwen2.5-7b-fast.yaml"
_STEP = re.compile(r"\[training\] step (\d+)/(\d+) .* elapsed ([\d.]+)s")


def recipe(name: str, *, storage: Path, data: Path, model: Path, workers: int, rows: int, epochs: float) -> dict:
    llamafactory = yaml.safe_load(FAST.read_text())["train"]["llamafactory"]
    llamafactory.update(max_samples=rows, num_train_epochs=epochs, save_steps=100_000, logging_steps=2)
    return {"name": name, "storage": str(storage), "model": {"source": str(model)},
            "ingest": {"source": str(data / "train.jsonl"), "split_ratios": {"train": 1.0}},
            "train": {"scaling_config": {"num_workers": workers, "use_gpu": True,
                                         "resources_per_worker": {"GPU": 1, "CPU": 6}},
                      "llamafactory": llamafactory}}


class GpuSampler:
    """``nvidia-smi`` once a second: per GPU, utilisation and memory used."""

    def __init__(self):
        self.samples: list[tuple[float, int, int, int]] = []  # (time, gpu, util %, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False)
            now = time.monotonic()
            for line in out.stdout.splitlines():
                gpu, util, mem = (int(x) for x in line.split(","))
                self.samples.append((now, gpu, util, mem))
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def during(self, start: float, end: float) -> dict[int, dict[str, float]]:
        found: dict[int, dict[str, float]] = {}
        for t, gpu, util, mem in self.samples:
            if start <= t <= end:
                g = found.setdefault(gpu, {"samples": 0, "util_sum": 0, "peak_mib": 0})
                g["samples"] += 1
                g["util_sum"] += util
                g["peak_mib"] = max(g["peak_mib"], mem)
        return {gpu: {"mean_util_pct": round(g["util_sum"] / g["samples"], 1), "peak_mib": g["peak_mib"]}
                for gpu, g in sorted(found.items())}


def compute_apps() -> list[str]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_bus_id,process_name,used_memory",
                          "--format=csv,noheader"], capture_output=True, text=True, check=False)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def run(workers: int, opts, data: Path, model: Path, sampler: GpuSampler) -> dict:
    name = f"scaling-{workers}"
    path = opts.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(name, storage=opts.work / "runs", data=data, model=model, workers=workers,
                                          rows=opts.rows, epochs=opts.epochs), sort_keys=False))
    cmd = [sys.executable, "-m", "workflow.cli", "run", str(path), "--stages", "ingest,model,train", "--force"]
    steps: list[tuple[int, int, float, float]] = []  # (step, total, elapsed, wall clock)
    apps: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(f"  [{workers}] {line.rstrip()}", flush=True)
        m = _STEP.search(line)
        if m:
            steps.append((int(m.group(1)), int(m.group(2)), float(m.group(3)), time.monotonic()))
            if len(steps) == 3:
                apps = compute_apps()
    code = proc.wait()
    if code != 0 or len(steps) < 3:
        return {"workers": workers, "failed": f"exit {code}, {len(steps)} step lines"}
    total = steps[-1][1]
    window = [s for s in steps if s[0] >= opts.skip * total]
    if len(window) < 2:
        window = steps[-2:]
    rows_per_step = opts.rows * opts.epochs / total
    seconds = window[-1][2] - window[0][2]
    rows_per_s = rows_per_step * (window[-1][0] - window[0][0]) / seconds
    return {"workers": workers, "steps": total, "rows_per_step": round(rows_per_step, 2),
            "window": [window[0][0], window[-1][0]], "window_s": round(seconds, 1),
            "rows_per_s": round(rows_per_s, 2), "gpus": sampler.during(window[0][3], window[-1][3]),
            "compute_apps": apps, "stage_wall_s": round(time.monotonic() - started, 1)}


def table(results: list[dict]) -> str:
    one = next((r["rows_per_s"] for r in results if r.get("workers") == 1 and "rows_per_s" in r), None)
    lines = ["| workers | rows/s | scaling efficiency | steps | mean GPU utilisation (%) | peak GPU memory (GiB) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['workers']} | failed: {r['failed']} | | | | |")
            continue
        eff = f"{r['rows_per_s'] / (r['workers'] * one):.1%}" if one else "-"
        utils = ", ".join(f"{g}: {v['mean_util_pct']:.0f}" for g, v in r["gpus"].items())
        mems = ", ".join(f"{g}: {v['peak_mib'] / 1024:.1f}" for g, v in r["gpus"].items())
        lines.append(f"| {r['workers']} | {r['rows_per_s']:.1f} | {eff} | {r['steps']} | {utils} | {mems} |")
    return "\n".join(lines)


def figures(results: list[dict], rows: int) -> dict:
    """rows/s and scaling efficiency (rows/s at N / (N x rows/s at 1)) keyed by worker count, GPU utilisation."""
    ok = [r for r in results if "failed" not in r]
    one = next((r["rows_per_s"] for r in ok if r["workers"] == 1), None)
    return {"rows_per_s": {str(r["workers"]): r["rows_per_s"] for r in ok},
            "efficiency": {str(r["workers"]): round(r["rows_per_s"] / (r["workers"] * one), 3)
                           for r in ok if one and r["workers"] > 1},
            "gpu_util_pct": {str(r["workers"]): [round(g["mean_util_pct"]) for g in r["gpus"].values()][:r["workers"]]
                             for r in ok},
            "failed": {str(r["workers"]): r["failed"] for r in results if "failed" in r}, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="result file (default bench/results/train_scaling/<machine>.json)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/train-scaling"), help="data, model, runs")
    parser.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2,4")
    parser.add_argument("--rows", type=int, default=2400)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--skip", type=float, default=0.2, help="fraction of the steps left out as warm-up")
    opts = parser.parse_args()

    from train_throughput import prepare

    opts.work.mkdir(parents=True, exist_ok=True)
    data, model = prepare(opts.work, opts.rows)
    sampler = GpuSampler()
    results = []
    try:
        for n in (int(x) for x in opts.workers.split(",")):
            results.append(run(n, opts, data, model, sampler))
            print(f"[bench] {results[-1]}", flush=True)
            record.write("train_scaling", figures(results, opts.rows), opts.out)  # after every worker count
    finally:
        sampler.stop()
    print(table(results), flush=True)
    return 0 if all("failed" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
