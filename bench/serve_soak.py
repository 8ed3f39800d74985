"""Sustained load on the workflow's serve app: failures, memory after warm-up, clean shutdown.

Starts the app the way the serve stage does (its own one-node Ray cluster on loopback, the
recipes' tuned Ray Serve LLM settings, an API key): ``--app direct`` (the default) as the CPU
recipe serves it, with direct streaming (vLLM's own app in the replica checks the key);
``--app tuned`` through the workflow's ingress; ``--app vllm`` is plain vLLM's OpenAI server
(same engine settings, key in ``VLLM_API_KEY``), the baseline for memory growth. It warms the app up, then drives it
with N concurrent closed-loop streaming chat clients for T seconds while sampling the
resident memory (RSS) of every process of the cluster. Then it shuts the app and the
cluster down and checks that none of their processes is left and the port is closed.

    .venvs/serve/bin/python bench/serve_soak.py --model DIR [--app direct|tuned|vllm] [--clients 32] [--duration 60]

Prints the figures and writes ``bench/results/serve_soak/<machine>.json`` (bench/record.py; ``--out`` to
override), the memory timeline beside it (``.raw.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import record  # noqa: E402
from serve_latency import DIRECT, MODEL_ID, TUNED, one_request, start_plain_vllm  # noqa: E402

from workflow.config import ServeConfig  # noqa: E402
from workflow.serving import app, client, cluster  # noqa: E402

API_KEY_ENV = "WORKFLOW_API_KEY"


def cluster_memory(address: str) -> dict[int, tuple[str, int]]:
    """pid -> (title, RSS bytes) of the cluster's processes (``cluster.cluster_processes``:
    those carrying its marker variable, and their descendants)."""
    import psutil

    procs = {}
    for proc in cluster.cluster_processes(address):
        try:
            title = (proc.cmdline() or [proc.name()])[0]
            rss = proc.memory_info().rss
        except psutil.Error:
            continue
        if rss > 0:
            procs[proc.pid] = (title, rss)
    return procs


async def soak(base_url: str, api_key: str, clients: int, duration: float, max_tokens: int, address: str,
               sample_every: float) -> dict:
    """Closed-loop streaming clients; per-interval requests/errors and the cluster's RSS."""
    import httpx

    url = f"{base_url}/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"}
    ttfts, errors, tokens, timeline = [], [], 0, []
    first_procs, last_procs = {}, {}
    done_in_interval = 0
    started = time.perf_counter()
    deadline = started + duration

    async def client_loop(client):
        nonlocal tokens, done_in_interval
        while time.perf_counter() < deadline:
            try:
                ttft, n = await one_request(client, url, max_tokens, headers)
                ttfts.append(ttft)
                tokens += n
                done_in_interval += 1
            except Exception as err:  # noqa: BLE001 - every failure is counted, not fatal
                errors.append(f"{type(err).__name__}: {err}"[:200])

    async def sampler():
        nonlocal done_in_interval
        while time.perf_counter() < deadline:
            await asyncio.sleep(sample_every)
            procs = await asyncio.to_thread(cluster_memory, address)
            first_procs.update({pid: v for pid, v in procs.items() if pid not in first_procs})
            last_procs.update(procs)
            timeline.append({"t_s": round(time.perf_counter() - started, 1),
                             "rss_mb": round(sum(rss for _, rss in procs.values()) / 2**20, 1),
                             "processes": len(procs), "requests": done_in_interval, "errors": len(errors)})
            done_in_interval = 0

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(sampler(), *(client_loop(client) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    ttfts.sort()

    def pct(p):
        return round(1000 * ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))], 1) if ttfts else None

    return {"clients": clients, "duration_s": round(elapsed, 1), "requests": len(ttfts), "failed": len(errors),
            "first_errors": errors[:5], "req_per_s": round(len(ttfts) / elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1), "ttft_p50_ms": pct(0.5), "ttft_p99_ms": pct(0.99),
            "timeline": timeline, "by_process": growth_by_process(first_procs, last_procs)}


def growth_by_process(first: dict, last: dict) -> list[dict]:
    """Each process's RSS when first and last sampled, the largest growth first."""
    rows = [{"pid": pid, "title": title, "rss_first_mb": round(first[pid][1] / 2**20, 1),
             "rss_last_mb": round(rss / 2**20, 1), "growth_mb": round((rss - first[pid][1]) / 2**20, 1)}
            for pid, (title, rss) in last.items()]
    return sorted(rows, key=lambda r: -r["growth_mb"])


def memory_growth(timeline: list[dict]) -> dict:
    """RSS at the start and end of the soak (mean of the first/last quarter of samples) and
    the least-squares slope in MB per minute."""
    rss = [s["rss_mb"] for s in timeline]
    ts = [s["t_s"] for s in timeline]
    q = max(1, len(rss) // 4)
    first, last = sum(rss[:q]) / q, sum(rss[-q:]) / q
    mean_t, mean_r = sum(ts) / len(ts), sum(rss) / len(rss)
    var = sum((t - mean_t) ** 2 for t in ts)
    slope = sum((t - mean_t) * (r - mean_r) for t, r in zip(ts, rss)) / var * 60 if var else 0.0
    return {"rss_first_quarter_mb": round(first, 1), "rss_last_quarter_mb": round(last, 1),
            "rss_growth_mb": round(last - first, 1), "rss_growth_pct": round(100 * (last - first) / first, 2),
            "rss_slope_mb_per_min": round(slope, 2), "rss_min_mb": min(rss), "rss_max_mb": max(rss)}


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def shutdown(stop, address: str, port: int) -> dict:
    """Stop the app (``stop()``); then wait for its processes to go and the port to close."""
    started = time.monotonic()
    stop()
    stopped_s = time.monotonic() - started
    deadline = time.monotonic() + 60
    while (left := cluster_memory(address)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return {"stop_s": round(stopped_s, 1), "all_gone_s": round(time.monotonic() - started, 1),
            "processes_left": sorted(title for title, _ in left.values()), "port_open_after": port_open(port)}


def start_ray_app(args, api_key: str, port: int):
    """The workflow's app on its own one-node cluster, as the serve stage starts it: (address, stop)."""
    cfg = ServeConfig(**(DIRECT if args.app == "direct" else TUNED), num_cpus=8)
    llm = app.build_llm_config(cfg, model_source=args.model, default_model_id=MODEL_ID, adapters_uri=None,
                                   lora_rank=None)
    # The key reaches the app as the serve stage passes it: the ingress gets its digest; with
    # direct streaming, vLLM's app in the replica gets it from the cluster's env.
    env_vars = app.direct_streaming_env(api_key) if cfg.direct_streaming else {}
    state = cluster.start_cluster(Path(tempfile.mkdtemp(prefix="bench-soak-")), num_cpus=cfg.num_cpus,
                                  env_vars=env_vars)
    try:
        cluster.connect(state)
        app.deploy(app.validate_llm_config(llm, "soak"), host="127.0.0.1", port=port,
                       ingress_cls_config=app.ingress_cls_config(api_key),
                       ingress_deployment_config=cfg.ingress_deployment_config, direct_streaming=cfg.direct_streaming)
    except BaseException:
        cluster.stop_cluster(state)
        raise
    return state["address"], lambda: cluster.stop_cluster(state)


def start_vllm_baseline(args, api_key: str, port: int):
    """Plain vLLM's server, the key in ``VLLM_API_KEY``: (address, stop)."""
    log = Path(tempfile.mkdtemp(prefix="bench-soak-vllm-")) / "vllm.log"
    return start_plain_vllm(args.model, port, log, {"VLLM_API_KEY": api_key})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (e.g. the tiny model of a CPU run)")
    parser.add_argument("--app", choices=("direct", "tuned", "vllm"), default="direct",
                        help="direct streaming (the CPU recipe's app), the workflow's ingress, or plain vLLM")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60, help="seconds of sustained load")
    parser.add_argument("--warmup", type=float, default=20, help="seconds of the same load before measuring")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--out", help="result file (default bench/results/serve_soak/<machine>.json, for --app direct "
                                      "only); the memory timeline goes beside it (<name>.raw.json)")
    args = parser.parse_args()
    if args.app != "direct" and not args.out:
        parser.error(f"--app {args.app} needs --out: bench/results/serve_soak/ holds the CPU recipe's app (direct)")

    api_key = os.environ.setdefault(API_KEY_ENV, "soak-" + os.urandom(12).hex())
    port = cluster.free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    result: dict = {"app": args.app, "model": args.model, "max_tokens": args.max_tokens,
                    "load_before": os.getloadavg()[0]}
    start = start_vllm_baseline if args.app == "vllm" else start_ray_app
    address, stop = start(args, api_key, port)
    try:
        client.wait_until_answering(base_url, MODEL_ID, api_key)
        print(f"[soak] warm-up: {args.clients} clients for {args.warmup:.0f} s", flush=True)
        warm = asyncio.run(soak(base_url, api_key, args.clients, args.warmup, args.max_tokens, address,
                                args.sample_every))
        result["warmup"] = {k: v for k, v in warm.items() if k != "timeline"}
        print(f"[soak] {args.clients} concurrent streaming clients for {args.duration:.0f} s", flush=True)
        result["soak"] = asyncio.run(soak(base_url, api_key, args.clients, args.duration, args.max_tokens, address,
                                          args.sample_every))
        result["memory"] = memory_growth(result["soak"]["timeline"])
    finally:
        print("[soak] shutting down", flush=True)
        result["shutdown"] = shutdown(stop, address, port)
    result["load_after"] = os.getloadavg()[0]

    s, m, d = result["soak"], result["memory"], result["shutdown"]
    figures = {"app": args.app, "clients": s["clients"], "seconds": s["duration_s"], "requests": s["requests"],
               "failed_requests": s["failed"], "req_per_s": s["req_per_s"], "ttft_p50_ms": s["ttft_p50_ms"],
               "ttft_p99_ms": s["ttft_p99_ms"], "rss_growth_pct": m["rss_growth_pct"],
               "rss_slope_mb_per_min": m["rss_slope_mb_per_min"], "stop_s": d["stop_s"],
               "processes_left": len(d["processes_left"]), "port_open_after": d["port_open_after"]}
    record.write("serve_soak", figures, args.out, raw={"timeline": s["timeline"], "by_process": s["by_process"]})
    print(f"[soak] {s['clients']} clients x {s['duration_s']} s: {s['requests']} requests, {s['failed']} failed, "
          f"{s['req_per_s']} req/s, {s['tokens_per_s']} tokens/s, TTFT p50 {s['ttft_p50_ms']} ms "
          f"p99 {s['ttft_p99_ms']} ms", flush=True)
    print(f"[soak] RSS after warm-up {m['rss_first_quarter_mb']} MB -> end {m['rss_last_quarter_mb']} MB "
          f"({m['rss_growth_mb']:+} MB, {m['rss_growth_pct']:+}%, slope {m['rss_slope_mb_per_min']:+} MB/min)",
          flush=True)
    for row in s["by_process"][:3]:
        print(f"[soak]   {row['growth_mb']:+} MB  {row['title'][:60]} (pid {row['pid']}: {row['rss_first_mb']} -> "
              f"{row['rss_last_mb']} MB)", flush=True)
    print(f"[soak] shutdown: {d['stop_s']} s, all processes gone after {d['all_gone_s']} s, left "
          f"{d['processes_left'] or 'none'}, port open after: {d['port_open_after']}", flush=True)
    clean = not d["processes_left"] and not d["port_open_after"]
    return 0 if s["failed"] == 0 and clean else 1


if __name__ == "__main__":
    sys.exit(main())
