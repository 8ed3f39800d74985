"""Many adapters behind one endpoint: throughput and latency against the number of adapters served (issue 34).

From one trained LoRA adapter the bench makes N adapters of the same base (weights perturbed with a seeded noise,
so each answers differently; a rank above the trained one pads A and B with noise of the same scale and keeps
``lora_alpha / r``), for every N of ``--adapters`` (a separate set per N, so each N starts cold) and every rank of
``--ranks``. For each rank, side by side in one run, each server started once with every adapter in its folder:

- ``workflow``: the CPU recipe's app as the serve stage deploys it (``recipes/viggo-cpu.yaml``'s ``serve``
  section: direct streaming, one replica, the workflow's LLMServer loading adapters from the local folder on first
  request; its own one-node Ray cluster);
- ``vllm``: plain vLLM's OpenAI server with the same engine and LoRA settings (``--enable-lora --max-loras
  --max-cpu-loras --max-lora-rank``), adapters loaded on first request from the same kind of folder by vLLM's
  filesystem resolver (``VLLM_LORA_RESOLVER_CACHE_DIR``, runtime LoRA updating on).

Per N: ``--clients`` closed-loop streaming clients for ``--duration`` seconds (in a process of their own), each
request for an adapter drawn uniformly or by Zipf (s = 1.1, seeded), greedy, ``--max-tokens`` new tokens
(``ignore_eos``). Reported per server, rank and N: requests/s and generated tokens/s and their ratio to N = 1,
TTFT p50/p99, the cold load of an adapter (its first request's TTFT less the median TTFT of the requests for
adapters already served, p50/p99 over adapters), evictions of the engine's LRU of ``max_cpu_loras`` adapters as
the request order implies them (``evictions_lru_model``: a model, not a count the servers report), the workflow
app's own count of adapter loads and reloads after an eviction by Serve's multiplexing (``adapter_loads``,
``adapter_reloads``, from its ``/metrics``; None for plain vLLM, which counts none), the peak RSS
of the server's processes (Ray's included for the workflow app), and the app's requests/s over plain vLLM's.

    .venvs/serve/bin/python bench/serve_adapters.py --model DIR --adapter DIR [--adapters 1,8,64,256] \
        [--ranks 8,64] [--dist zipf] [--clients 32] [--duration 60]

Writes ``bench/results/serve_adapters/<machine>.json`` (bench/record.py; ``--out`` to override), every request's
row beside it (``.raw.json``, when under 1 MB) and a plot of requests/s and p99 TTFT against N (``.png``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import record  # noqa: E402
from serve_latency import PROMPT  # noqa: E402

from workflow.config import ServeConfig  # noqa: E402
from workflow.inference.adapters import supported_lora_rank  # noqa: E402
from workflow.patches import ray_serve_adapter_folders  # noqa: E402
from workflow.serving import app, client, cluster  # noqa: E402

RECIPE = BENCH.parent / "recipes" / "viggo-cpu.yaml"
ZIPF_S = 1.1
SERVERS = ("workflow", "vllm")


# ---------------------------------------------------------------- adapters

def make_adapters(source: Path, out: Path, names: list[str], rank: int, base_name: str) -> None:
    """``names`` adapters of rank ``rank`` in ``out``, each ``source``'s weights with noise seeded by its name."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(source / "adapter_model.safetensors"))
    config = json.loads((source / ray_serve_adapter_folders.ADAPTER_CONFIG).read_text())
    trained = int(config["r"])
    config.update(r=rank, lora_alpha=config["lora_alpha"] * rank / trained, base_model_name_or_path=base_name)
    for name in names:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        tensors = {}
        for key, w in weights.items():
            scale = float(w.std()) or 1e-3
            grown = list(w.shape)
            grown[0 if ".lora_A." in key else 1] = rank  # A: (r, in), B: (out, r)
            padded = (rng.standard_normal(grown) * scale).astype(w.dtype)
            padded[tuple(slice(0, n) for n in w.shape)] = w + rng.standard_normal(w.shape).astype(w.dtype) * scale
            tensors[key] = padded
        folder = out / name
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / ray_serve_adapter_folders.ADAPTER_CONFIG).write_text(json.dumps(config))  # last: complete


def adapter_names(n: int) -> list[str]:
    """A set of its own per N (each N starts with none of its adapters loaded)."""
    return [f"n{n}-a{i:03d}" for i in range(n)]


def weights_of(n: int, dist: str) -> list[float]:
    return [1.0] * n if dist == "uniform" else [1 / (i + 1) ** ZIPF_S for i in range(n)]


# ---------------------------------------------------------------- load

async def one_request(http, url: str, model: str, max_tokens: int) -> tuple[float, int]:
    """Time to first token and generated tokens of one streaming chat request for ``model``."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "min_tokens": max_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
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


async def load(base_url: str, models: list[str], weights: list[float], clients: int, duration: float,
               max_tokens: int, seed: int) -> dict:
    """Closed-loop clients, each request's model drawn by ``weights``: one row per request
    ``[start s, model index, ttft s or None, tokens, error or None]``."""
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)
    url = f"{base_url}/chat/completions"
    rng = random.Random(seed)
    rows: list[list] = []
    started = time.perf_counter()
    deadline = started + duration

    async def client_loop(http):
        while time.perf_counter() < deadline:
            index = rng.choices(range(len(models)), weights)[0]
            begun = time.perf_counter() - started
            try:
                ttft, tokens = await one_request(http, url, models[index], max_tokens)
                rows.append([round(begun, 4), index, round(ttft, 4), tokens, None])
            except Exception as err:  # noqa: BLE001 - every failure is counted, not fatal
                rows.append([round(begun, 4), index, None, 0, f"{type(err).__name__}: {err}"[:200]])
                await asyncio.sleep(0.1)  # a failing server answers at once: no busy loop

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
    return {"elapsed_s": time.perf_counter() - started, "rows": rows}


def run_load(address: str, load_args: list) -> tuple[dict, int]:
    """``load`` in a process of its own (a Ray driver's threads would share this one's GIL), sampling the summed
    RSS of the server's processes every second meanwhile: (its result, the peak RSS in bytes)."""
    with tempfile.NamedTemporaryFile("w+", suffix=".json") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--load", json.dumps(load_args), "--out", out.name])
        peak = 0
        while proc.poll() is None:
            peak = max(peak, server_rss(address))
            time.sleep(1)
        if proc.returncode != 0:
            raise RuntimeError(f"the load process exited {proc.returncode}")
        return json.loads(Path(out.name).read_text()), peak


def server_rss(address: str) -> int:
    import psutil

    total = 0
    for proc in cluster.cluster_processes(address):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def adapter_loads(root: str, models: list[str]) -> dict:
    """The workflow app's own count of adapter loads and reloads (after an eviction) of ``models``, from its
    per-adapter metrics (``<root>/metrics``, workflow/serving/metrics.py)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = set(models)
    found = {"adapter_loads": 0, "adapter_reloads": 0}
    text = httpx.get(f"{root}/metrics", timeout=60).raise_for_status().text
    for family in text_string_to_metric_families(text):
        key = {"workflow_adapter_loads": "adapter_loads", "workflow_adapter_reloads": "adapter_reloads"}.get(family.name)
        for sample in family.samples if key else ():
            if sample.name.endswith("_total") and sample.labels.get("model") in wanted:
                found[key] += int(sample.value)
    return found


# ---------------------------------------------------------------- servers

def start_workflow_app(args, folder: Path, rank: int, port: int):
    """The CPU recipe's serve section, its LoRA limits replaced by the bench's, deployed as the serve stage does
    (``workflow.serving``): its own one-node Ray cluster, the adapters folder as the replicas read a local one."""
    import yaml

    serve = yaml.safe_load(RECIPE.read_text())["serve"]
    llm = serve["llm_config"]
    llm.setdefault("lora_config", {})["max_num_adapters_per_replica"] = args.max_loras
    if args.max_cpu_loras:
        llm.setdefault("engine_kwargs", {})["max_cpu_loras"] = args.max_cpu_loras
    cfg = ServeConfig(direct_streaming=serve.get("direct_streaming", False), llm_config=llm, num_cpus=8)
    model_id = llm["model_loading_config"]["model_id"]
    config = app.build_llm_config(cfg, model_source=args.model, default_model_id=model_id,
                                  adapters_uri=ray_serve_adapter_folders.served_uri(str(folder)), lora_rank=rank)
    state = cluster.start_cluster(Path(tempfile.mkdtemp(prefix="bench-adapters-")), num_cpus=cfg.num_cpus,
                                  env_vars=app.direct_streaming_env(None) if cfg.direct_streaming else {})
    try:
        cluster.connect(state)
        app.deploy(app.validate_llm_config(config, "serve_adapters"), host="127.0.0.1", port=port,
                   ingress_cls_config=app.ingress_cls_config(None, cfg),
                   ingress_deployment_config=cfg.ingress_deployment_config, direct_streaming=cfg.direct_streaming)
    except BaseException:
        cluster.stop_cluster(state)
        raise
    return model_id, f"{model_id}:", state["address"], lambda: cluster.stop_cluster(state)


def start_plain_vllm(args, folder: Path, rank: int, port: int):
    """vLLM's OpenAI server with the recipe's engine settings and the same LoRA limits; adapters resolved from
    ``folder`` on first request (vLLM's filesystem resolver)."""
    import yaml

    llm = yaml.safe_load(RECIPE.read_text())["serve"]["llm_config"]
    model_id = llm["model_loading_config"]["model_id"]
    engine = llm.get("engine_kwargs", {})
    address = f"vllm-{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
           "--served-model-name", model_id, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", engine.get("dtype", "auto"), "--max-model-len", str(engine.get("max_model_len", 512)),
           "--disable-uvicorn-access-log", "--enable-lora", "--max-loras", str(args.max_loras),
           "--max-lora-rank", str(supported_lora_rank(rank))]
    cmd += ["--enforce-eager"] if engine.get("enforce_eager") else []
    cmd += ["--disable-log-stats"] if engine.get("disable_log_stats") else []
    cmd += ["--max-cpu-loras", str(args.max_cpu_loras)] if args.max_cpu_loras else []
    env = {**os.environ, **llm.get("runtime_env", {}).get("env_vars", {}), cluster.CLUSTER_MARKER: address,
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_LORA_RESOLVER_CACHE_DIR": str(folder)}
    log_path = folder.parent / "vllm.log"
    print(f"[bench] plain vLLM's log: {log_path}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    return model_id, "", address, stop


# ---------------------------------------------------------------- figures

def pct(values: list[float], p: float) -> float | None:
    values = sorted(values)
    return round(1000 * values[min(len(values) - 1, int(p * len(values)))], 1) if values else None


def lru_evictions(sequence: list[int], capacity: int) -> int:
    """Evictions an LRU cache of ``capacity`` entries makes on ``sequence``."""
    cache: dict[int, None] = {}
    evicted = 0
    for key in sequence:
        if key in cache:
            cache.pop(key)
        elif len(cache) >= capacity:
            cache.pop(next(iter(cache)))
            evicted += 1
        cache[key] = None
    return evicted


def summarize(rows: list[list], elapsed: float, capacity: int) -> dict:
    """One N's figures from its request rows (``load``'s)."""
    done = [r for r in rows if r[4] is None]
    ttfts = [r[2] for r in done]
    first: dict[int, list] = {}
    for r in sorted(done, key=lambda r: r[0]):
        first.setdefault(r[1], r)
    warm = [r[2] for r in done if first[r[1]] is not r]
    warm_median = statistics.median(warm) if warm else 0.0
    cold = [max(0.0, r[2] - warm_median) for r in first.values()]
    return {"requests": len(done), "failed": len(rows) - len(done),
            "first_errors": sorted({r[4] for r in rows if r[4]})[:3],
            "req_per_s": round(len(done) / elapsed, 2), "tokens_per_s": round(sum(r[3] for r in done) / elapsed, 1),
            "ttft_p50_ms": pct(ttfts, 0.5), "ttft_p99_ms": pct(ttfts, 0.99),
            "adapters_served": len(first), "cold_load_p50_ms": pct(cold, 0.5), "cold_load_p99_ms": pct(cold, 0.99),
            "evictions_lru_model": lru_evictions([r[1] for r in sorted(rows, key=lambda r: r[0])], capacity)}


def figures(results: dict, args) -> dict:
    """The quoted figures, each ``{"<server>@r<rank>": {"<N>": value}}``; ratios to the same server's N = 1 (where
    N = 1 ran) and the app's requests/s over plain vLLM's at each rank and N."""
    out: dict = {"dist": args.dist, "clients": args.clients, "duration_s": args.duration,
                 "max_tokens": args.max_tokens, "adapters": args.adapters, "ranks": args.ranks,
                 "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras}
    keys = ("req_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "cold_load_p50_ms", "cold_load_p99_ms",
            "adapters_served", "evictions_lru_model", "adapter_loads", "adapter_reloads", "peak_rss_mb", "failed")
    for key in keys:
        out[key] = {series: {n: row[key] for n, row in by_n.items()} for series, by_n in results.items()}
    for key in ("req_per_s", "tokens_per_s", "ttft_p99_ms"):
        out[f"{key}_vs_n1"] = {series: {n: round(row[key] / by_n["1"][key], 2) for n, row in by_n.items()}
                               for series, by_n in results.items() if "1" in by_n and by_n["1"][key]}
    out["failed_requests"] = sum(row["failed"] for by_n in results.values() for row in by_n.values())
    out["app_vs_vllm_req_per_s"] = {
        f"r{rank}": {n: round(row["req_per_s"] / results[f"vllm@r{rank}"][n]["req_per_s"], 2)
                     for n, row in results.get(f"workflow@r{rank}", {}).items()
                     if results.get(f"vllm@r{rank}", {}).get(n, {}).get("req_per_s")}
        for rank in args.ranks}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, p99) = plt.subplots(1, 2, figsize=(10, 4))
    for series, by_n in results.items():
        ns = [int(n) for n in by_n]
        tput.plot(ns, [by_n[n]["req_per_s"] for n in by_n], marker="o", label=series)
        p99.plot(ns, [by_n[n]["ttft_p99_ms"] for n in by_n], marker="o", label=series)
    for ax, label in ((tput, "requests/s"), (p99, "TTFT p99 (ms)")):
        ax.set_xscale("log", base=2)
        ns = sorted({int(n) for by_n in results.values() for n in by_n})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("adapters (N)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    tput.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"[bench] wrote {path}", flush=True)


# ---------------------------------------------------------------- main

def measure_server(server: str, args, rank: int, folder: Path, results: dict, raw: dict) -> None:
    port = cluster.free_port()
    start = start_workflow_app if server == "workflow" else start_plain_vllm
    base_model, prefix, address, stop = start(args, folder, rank, port)
    base_url = f"http://127.0.0.1:{port}/v1"
    series = f"{server}@r{rank}"
    try:
        client.wait_until_answering(base_url, base_model, None)
        for n in args.adapters:
            names = [prefix + name for name in adapter_names(n)]
            print(f"[bench] {series}, N={n}: {args.clients} clients for {args.duration:.0f} s ({args.dist})",
                  flush=True)
            load_args = [base_url, names, weights_of(n, args.dist), args.clients, args.duration, args.max_tokens,
                         args.seed + n]
            measured, peak = run_load(address, load_args)
            row = summarize(measured["rows"], measured["elapsed_s"], args.max_cpu_loras or args.max_loras)
            row["peak_rss_mb"] = round(peak / 2**20, 1)
            row.update(adapter_loads(base_url.removesuffix("/v1"), names) if server == "workflow"
                       else {"adapter_loads": None, "adapter_reloads": None})
            print(f"[bench] {series} N={n}: {json.dumps(row)}", flush=True)
            results.setdefault(series, {})[str(n)] = row
            raw.setdefault(series, {})[str(n)] = measured["rows"]
    finally:
        stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="base model folder (e.g. the tiny model of a CPU run)")
    parser.add_argument("--adapter", help="a trained LoRA adapter of that model, the source of the bench's adapters")
    parser.add_argument("--adapters", default="1,8,64,256", help="comma-separated adapter counts N")
    parser.add_argument("--ranks", default="8,64", help="comma-separated LoRA ranks")
    parser.add_argument("--dist", choices=("zipf", "uniform"), default="zipf",
                        help=f"how each request's adapter is drawn (Zipf: s = {ZIPF_S})")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60, help="seconds of load per N")
    parser.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request (ignore_eos)")
    parser.add_argument("--max-loras", type=int, default=None,
                        help="adapters in one engine step (vLLM max_loras = Ray max_num_adapters_per_replica; "
                             "default: the CPU recipe's)")
    parser.add_argument("--max-cpu-loras", type=int, default=None,
                        help="adapters vLLM keeps in host memory (its LRU); default vLLM's (= max_loras)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: workflow, vllm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the adapters and plain vLLM's log (printed)")
    parser.add_argument("--out", help="result file (default bench/results/serve_adapters/<machine>.json); the request "
                                      "rows (.raw.json) and the plot (.png) go beside it")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: one load, JSON arguments of load()
    args = parser.parse_args()
    if args.load:
        Path(args.out).write_text(json.dumps(asyncio.run(load(*json.loads(args.load)))))
        return 0
    if not args.model or not args.adapter:
        parser.error("--model and --adapter are required")
    import yaml

    recipe_lora = yaml.safe_load(RECIPE.read_text())["serve"]["llm_config"].get("lora_config", {})
    args.max_loras = args.max_loras or recipe_lora.get("max_num_adapters_per_replica", 16)
    args.adapters = [int(n) for n in args.adapters.split(",")]
    args.ranks = [int(r) for r in args.ranks.split(",")]
    servers = args.servers.split(",")
    if unknown := set(servers) - set(SERVERS):
        parser.error(f"--servers: unknown {sorted(unknown)}; choose from {', '.join(SERVERS)}")

    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    results: dict = {}
    raw: dict = {}
    try:
        for rank in args.ranks:
            names = [name for n in args.adapters for name in adapter_names(n)]
            folder = work / f"r{rank}" / "adapters"
            # vLLM's filesystem resolver serves an adapter only if its base_model_name_or_path is the --model given.
            make_adapters(Path(args.adapter), folder, names, rank, base_name=args.model)
            for server in servers:
                measure_server(server, args, rank, folder, results, raw)
    finally:
        if args.keep:
            print(f"[bench] adapters and logs kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{'series':14} {'N':>4} {'req/s':>7} {'x N=1':>6} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'cold p50':>8} {'cold p99':>8} {'evict':>6} {'RSS MB':>8} {'failed':>6}")
    for series, by_n in results.items():
        for n, r in by_n.items():
            ratio = r["req_per_s"] / by_n["1"]["req_per_s"] if "1" in by_n and by_n["1"]["req_per_s"] else 0
            print(f"{series:14} {n:>4} {r['req_per_s']:>7} {ratio:>6.2f} {r['tokens_per_s']:>8} "
                  f"{r['ttft_p50_ms']!s:>8} {r['ttft_p99_ms']!s:>8} {r['cold_load_p50_ms']!s:>8} "
                  f"{r['cold_load_p99_ms']!s:>8} {r['evictions_lru_model']:>6} {r['peak_rss_mb']:>8} "
                  f"{r['failed']:>6}")
    path = record.write("serve_adapters", figures(results, args), args.out, raw={"rows": raw})
    plot(results, path.with_suffix(".png"))
    return 0 if all(r["failed"] == 0 for by_n in results.values() for r in by_n.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
