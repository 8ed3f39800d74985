"""Batch inference throughput: the evaluate/batch stage's code path vs plain vLLM.

    .venvs/serve/bin/python bench/batch_throughput.py [--rows 1083] [--max-tokens 64]
        [--model DIR] [--modes vllm,stage,vllm,stage] [--out FILE.json]

Every mode answers the same rows (ViGGO test sentences with the recipe's instruction, as
chat messages; greedy; ``max_tokens`` new tokens) with the same model and engine settings,
each in a fresh process, one after the other:

- ``vllm``: plain ``vllm.LLM(...)`` then ``LLM.chat(all rows)``;
- ``stage``: ``workflow.inference`` (package) as the evaluate stage and ``workflow batch`` run it;
- ``bare``: ``ray.data.llm`` with its defaults (chat-template, tokenize and detokenize
  stages on, engine metrics exported to Prometheus), the "before" of the tuning;
- ``stages-off``: the stage's defaults except that engine metrics are still exported.
- ``stage-server-limits``: the stage with vLLM's scheduler limits pinned to those Ray's engine stage
  gave it before 530c5ee (128 sequences, 2,048 tokens a step); ``stage`` has ``vllm.LLM``'s on the CPU
  (256 / 4,096; ``stage-offline-limits`` in bench/results/batch_throughput-2026-11-28c-limits.json pinned them).
- ``vllm-bfloat16``, ``stage-bfloat16``: the engine in bfloat16 (the CPU recipe's dtype before 2026-11-28);
- ``vllm-stats``: plain vLLM with vLLM's per-step statistics on; ``stage-nostats``: the stage with them off.
- ``stage-spawn``: the stage with its engine's model worker spawned, as vLLM does in a Ray actor
  (``stage`` forks it: ``workflow.patches.vllm_cpu_placement``).

Whole job = from the launch of the mode's process to the last row: the Python start and every
import (``import vllm`` in plain vLLM's process too) included, as a user of either waits for it.
Total = from the first line of the mode (before ``ray.init`` / ``LLM()``, after the imports
of the script, of vLLM in the ``vllm`` mode) to the last row. Start-up excluded = from the
moment the engine began its first batch (Ray Data's block statistics of the engine operator;
for plain vLLM, when ``chat`` was called) to the last row. Prints a table and writes
``batch_throughput.json`` and ``batch_throughput.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import record  # noqa: E402  (bench/record.py, beside this script)

ENGINE_KWARGS = {"max_model_len": 512, "dtype": "float32", "enforce_eager": True}
CPU_PROCESSOR = {"placement_group_config": {"bundles": [{"CPU": 1}]},
                 "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}}


def load_rows(n: int) -> list[dict]:
    from workflow.config import load_recipe

    instruction = load_recipe(REPO / "recipes" / "viggo-cpu.yaml").ingest.instruction
    with open(REPO / "data" / "viggo" / "test.csv", newline="") as f:
        refs = [r["ref"] for r in csv.DictReader(f)]
    refs = (refs * (n // len(refs) + 1))[:n]
    return [{"instruction": instruction, "input": ref} for ref in refs]


def default_model() -> str:
    built = REPO / "runs" / "viggo-cpu" / "model" / "weights"
    if (built / "config.json").exists():
        return str(built)
    from workflow.config import TinyModelConfig
    from workflow.training.tiny_model import build_tiny_model

    out = Path("/tmp/workflow-bench-tiny-model")
    if not (out / "config.json").exists():
        build_tiny_model([REPO / "data" / "viggo" / "train.csv"], out, TinyModelConfig())
    return str(out)


def mode_vllm(args, engine_overrides: dict | None = None) -> dict:
    from vllm import LLM, SamplingParams

    from workflow.prompts import messages as prompts

    rows = load_rows(args.rows)
    t0 = time.time()
    llm = LLM(model=args.model, gpu_memory_utilization=0.3, **{**ENGINE_KWARGS, **(engine_overrides or {})})
    t1 = time.time()
    outs = llm.chat([prompts.row_messages(r) for r in rows], SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
                    use_tqdm=False)
    t2 = time.time()
    return {"rows": len(outs), "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "startup_s": t1 - t0, "steady_s": t2 - t1, "total_s": t2 - t0, "first_request": t1, "end": t2}


def mode_ray(args, processor_overrides: dict, num_cpus: int | None = None) -> dict:
    import ray

    from workflow.inference import io, processor

    rows = load_rows(args.rows)
    t0 = time.time()
    if num_cpus:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    processor.init_ray(engine=True)
    ds = io.from_rows(rows, args.batch_size)
    columns = ["instruction", "input"]
    config = {**CPU_PROCESSOR, "batch_size": args.batch_size, "engine_kwargs": dict(ENGINE_KWARGS),
              **processor_overrides}
    proc = processor.engine_processor(args.model, config, {"temperature": 0.0, "max_tokens": args.max_tokens},
                                      {}, columns)
    out = processor.run(ds, proc, columns)
    n = tokens = errors = 0
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        n += batch.num_rows
        tokens += sum(batch.column("num_generated_tokens").to_pylist())
        errors += sum(1 for e in batch.column("error").to_pylist() if e)
    t2 = time.time()
    first_request = engine_first_batch(out, t2)
    ray.shutdown()
    return {"rows": n, "generated_tokens": tokens, "errors": errors, "startup_s": first_request - t0,
            "steady_s": t2 - first_request, "total_s": t2 - t0, "first_request": first_request, "end": t2}


def engine_first_batch(out, now: float) -> float:
    """When the engine actor began its first batch (wall clock), from Ray Data's block statistics of the
    engine operator (``time.perf_counter``: the machine's monotonic clock, the same in every process here).
    Within 0.25 s of vLLM's ``arrival_time`` of the first request, which exists only with vLLM's per-step
    statistics on (``stage-nostats`` turns them off)."""
    starts, summaries = [], [out._get_stats_summary()]
    while summaries:  # the operators before the last one are in the summaries' parents
        summary = summaries.pop()
        summaries += summary.parents
        starts += [op.earliest_start_time for op in summary.operators_stats
                   if "vLLMEngineStage" in op.operator_name and op.earliest_start_time is not None]
    return now - (time.perf_counter() - min(starts)) if starts else float("nan")


BARE = {"chat_template_stage": True, "tokenize_stage": True, "detokenize_stage": True, "log_engine_metrics": True}
MODES = {
    "vllm": mode_vllm,
    "stage": lambda args: mode_ray(args, {}),
    # The steps from ray.data.llm's defaults to the stage's, one at a time.
    # Its three CPU stages are actor pools of 1 CPU each: with the 2 logical CPUs of this
    # machine the engine actor never gets scheduled, so it runs with 8 logical CPUs.
    "bare": lambda args: mode_ray(args, BARE, num_cpus=8),
    "stages-off": lambda args: mode_ray(args, {"log_engine_metrics": True}),
    # The scheduler limits vLLM gives an engine built without a usage context, as Ray's engine
    # stage builds it (128 sequences, 2,048 tokens a step); `stage` has vllm.LLM's on the CPU (256 / 4,096).
    "stage-server-limits": lambda args: mode_ray(args, {"engine_kwargs": {**ENGINE_KWARGS, "max_num_seqs": 128,
                                                                          "max_num_batched_tokens": 2048}}),
    # The engine dtype the CPU recipe had before 2026-11-28 (vLLM emulates it on a CPU without AVX512-BF16).
    "vllm-bfloat16": lambda args: mode_vllm(args, {"dtype": "bfloat16"}),
    "stage-bfloat16": lambda args: mode_ray(args, {"engine_kwargs": {**ENGINE_KWARGS, "dtype": "bfloat16"}}),
    # vLLM's per-step statistics on, as the stage's engine has them (vllm.LLM turns them off), and off in the stage.
    "vllm-stats": lambda args: mode_vllm(args, {"disable_log_stats": False}),
    "stage-nostats": lambda args: mode_ray(args, {"engine_kwargs": {**ENGINE_KWARGS, "disable_log_stats": True}}),
    # vLLM's start method in a Ray actor for the engine core's worker too (the plugin forks it).
    "stage-spawn": lambda args: mode_ray(args, {"runtime_env": {"env_vars": {
        **CPU_PROCESSOR["runtime_env"]["env_vars"], "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}}}),
}


def run_child(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--rows", str(args.rows), "--max-tokens", str(args.max_tokens),
           "--model", args.model, "--batch-size", str(args.batch_size)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    print(f"--- {mode}", flush=True)
    launched = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            # The whole job as its user waits for it: from the process's launch, imports included.
            result["job_startup_s"] = result.pop("first_request") - launched
            result["job_s"] = result.pop("end") - launched
            return result
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f"mode {mode} failed (exit {proc.returncode})")


def report(results: dict[str, dict], args, out: str | None) -> None:
    for r in results.values():
        r["rows_per_s_steady"] = r["rows"] / r["steady_s"]
        r["tokens_per_s_steady"] = r["generated_tokens"] / r["steady_s"]
        r["rows_per_s_total"] = r["rows"] / r["total_s"]
        r["tokens_per_s_total"] = r["generated_tokens"] / r["total_s"]
        r["rows_per_s_job"] = r["rows"] / r["job_s"]
    base = results.get("vllm")  # ratios are against the first plain-vLLM run
    print(f"\n{'':41}-- start-up excluded --  -- from LLM() / ray.init --  -- whole job, from launch --")
    print(f"{'mode':8} {'rows':>5} {'gen tok':>8} {'start s':>8} {'steady s':>9} {'rows/s':>8} {'x vllm':>7} "
          f"{'total s':>8} {'rows/s':>7} {'x vllm':>7} {'start s':>8} {'job s':>7} {'rows/s':>7} {'x vllm':>7}")
    for mode, r in results.items():
        def ratio(key, r=r):
            return r[key] / base[key] if base else float("nan")

        r["ratio_steady"], r["ratio_total"], r["ratio_job"] = (ratio("rows_per_s_steady"), ratio("rows_per_s_total"),
                                                               ratio("rows_per_s_job"))
        print(f"{mode:8} {r['rows']:5d} {r['generated_tokens']:8d} {r['startup_s']:8.1f} {r['steady_s']:9.1f} "
              f"{r['rows_per_s_steady']:8.1f} {r['ratio_steady']:7.2f} {r['total_s']:8.1f} "
              f"{r['rows_per_s_total']:7.1f} {r['ratio_total']:7.2f} {r['job_startup_s']:8.1f} {r['job_s']:7.1f} "
              f"{r['rows_per_s_job']:7.1f} {r['ratio_job']:7.2f}")
    pairs = list(zip([r for m, r in results.items() if m.split("#")[0] == "vllm"],
                     [r for m, r in results.items() if m.split("#")[0] == "stage"]))
    figures = {
        # Pair by pair: the n-th stage run against the n-th plain vLLM run (run one after the other).
        "steady_vs_vllm": record.median([s["rows_per_s_steady"] / v["rows_per_s_steady"] for v, s in pairs]),
        "job_vs_vllm": record.median([s["rows_per_s_job"] / v["rows_per_s_job"] for v, s in pairs]),
        "steady_vs_vllm_pairs": [round(s["rows_per_s_steady"] / v["rows_per_s_steady"], 3) for v, s in pairs],
        "job_vs_vllm_pairs": [round(s["rows_per_s_job"] / v["rows_per_s_job"], 3) for v, s in pairs],
        "rows_per_s_steady": {m: round(r["rows_per_s_steady"], 2) for m, r in results.items()},
        "job_s": {m: round(r["job_s"], 1) for m, r in results.items()},
        "rows": args.rows, "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }
    for key in ("steady_vs_vllm", "job_vs_vllm"):
        figures[key] = round(figures[key], 3) if figures[key] is not None else None
    record.write("batch_throughput", figures, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1083)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model")
    parser.add_argument("--modes", default="vllm,stage,vllm,stage",
                        help="run one after the other; a mode named twice runs twice (pairs: vllm then stage)")
    parser.add_argument("--out", help="result file (default bench/results/batch_throughput/<machine>.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(MODES[args.child](args)), flush=True)
        return
    args.model = args.model or default_model()
    results = {}
    for mode in args.modes.split(","):  # a mode named twice is run twice (to see the machine drift)
        key = mode if mode not in results else f"{mode}#{sum(k.split('#')[0] == mode for k in results) + 1}"
        results[key] = run_child(mode, args)
    report(results, args, args.out)


if __name__ == "__main__":
    main()
