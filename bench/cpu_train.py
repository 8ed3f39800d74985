"""The CPU demo's LoRA training step through the train stage, with its speed-ups on and off.

For each variant (environment switches of ``workflow/patches/``, recipe keys) the train stage itself runs
(``workflow train RECIPE --force``: Ray Train, 2 gloo workers of 1 CPU, LLaMA-Factory) on the
CPU recipe's data and pre-trained tiny base from an existing run (``--run``, e.g. the
``runs/viggo-cpu`` folder that ``make demo`` leaves), ``recipes/viggo-cpu.yaml``'s
``train.llamafactory`` keys except ``max_steps`` (``--steps``), ``logging_steps: 1`` and no
checkpoint before the end. One variant after the other, in rounds (``--rounds``), on an otherwise
idle machine.

Measured per variant: the median time of an optimizer step after the first ``--skip`` steps,
from the stage's own step lines (``[training] step S/T ... elapsed Es``), and the loss of every
step (the variants compute the same sums, so the losses must agree to rounding).

    .venvs/serve/bin/python bench/cpu_train.py --run runs/viggo-cpu

Writes ``bench/results/cpu_train/<machine>.json`` (bench/record.py; ``--out`` to override): each
variant's median step and the speed-up of the last variant over the first; every step's loss and time
beside it (``.raw.json``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "viggo-cpu.yaml"
_STEP = re.compile(r"\[training\] step (\d+)/(\d+) loss ([\d.]+) .* elapsed ([\d.]+)s")
# name: (environment, train.llamafactory keys over the recipe's)
VARIANTS = {
    # the recipe before 2026-11-28: gradient checkpointing (LLaMA-Factory's default), PEFT's forward, every logit
    "before": ({"WORKFLOW_FUSED_LORA": "0", "WORKFLOW_LABELLED_LOGITS": "0"}, {"disable_gradient_checkpointing": False}),
    "no-recompute": ({"WORKFLOW_FUSED_LORA": "0", "WORKFLOW_LABELLED_LOGITS": "0"}, {}),
    "fast-lora": ({"WORKFLOW_LABELLED_LOGITS": "0"}, {}),  # + the LoRA fast path and groups
    "all": ({}, {}),  # + logits at labelled positions only: the train stage's defaults
}


def recipe(storage: Path, steps: int, keys: dict) -> dict:
    found = yaml.safe_load(RECIPE.read_text())
    found["storage"] = str(storage)
    found["ingest"]["source"] = str(REPO / "data" / "viggo")
    found["train"]["llamafactory"].update(max_steps=steps, logging_steps=1, save_steps=100_000, **keys)
    found["train"]["llamafactory"].pop("num_train_epochs", None)
    return found


def run_variant(path: Path, env: dict[str, str]) -> dict:
    started = time.monotonic()
    proc = subprocess.run([str(REPO / "bin" / "workflow"), "train", str(path), "--force"], capture_output=True,
                          text=True, env={**os.environ, **env}, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: the train stage failed ({env}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    steps = [(int(m[1]), float(m[3]), float(m[4])) for m in _STEP.finditer(proc.stdout)]
    return {"steps": steps, "stage_s": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run folder of the CPU recipe with ingest/ and model/")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--skip", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", help="result file (default bench/results/cpu_train/<machine>.json)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-cpu-train-") as tmp:
        storage = Path(tmp)
        run = storage / "viggo-cpu"
        for stage in ("ingest", "model"):
            shutil.copytree(Path(args.run) / stage, run / stage)
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                env, keys = VARIANTS[v]
                path = storage / f"recipe-{v}.yaml"
                path.write_text(yaml.safe_dump(recipe(storage, args.steps, keys)))
                found = run_variant(path, env)
                times = [b[2] - a[2] for a, b in zip(found["steps"], found["steps"][1:]) if a[0] >= args.skip]
                found["median_step_s"] = round(statistics.median(times), 3)
                results[v].append(found)
                print(f"round {r + 1} {v:10s} median step {found['median_step_s']:.3f} s, stage {found['stage_s']} s, "
                      f"loss at step {found['steps'][-1][0]}: {found['steps'][-1][1]:.4f}", flush=True)
    base = statistics.median(x["median_step_s"] for x in results[variants[0]])
    print(f"\n| variant | median step s | x {variants[0]} | losses agree with {variants[0]}'s |")
    print("|---|---|---|---|")
    for v in variants:
        step = statistics.median(x["median_step_s"] for x in results[v])
        agree = all(abs(a[1] - b[1]) <= 1e-3 for x, y in zip(results[v], results[variants[0]])
                    for a, b in zip(x["steps"], y["steps"]))
        print(f"| {v} | {step:.3f} | {base / step:.2f} | {'yes' if agree else 'no'} |")
    steps = {v: statistics.median(x["median_step_s"] for x in results[v]) for v in variants}
    figures = {"step_s": steps, "speedup": round(steps[variants[0]] / steps[variants[-1]], 2),
               "loss_at_last_step": {v: results[v][-1]["steps"][-1][1] for v in variants},
               "steps": args.steps, "skip": args.skip, "rounds": args.rounds,
               "load_avg_1m": round(os.getloadavg()[0], 1)}
    record.write("cpu_train", figures, args.out,
                 raw={"variants": {v: {"env": VARIANTS[v][0], "llamafactory": VARIANTS[v][1]} for v in variants},
                      "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
