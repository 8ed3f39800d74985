"""Faults on a Ray cluster of several nodes: a worker node lost while the train stage trains.

The cluster is tests/netns_cluster.py's (a head with no CPUs and worker nodes of 1 CPU each,
each in its own network and mount namespace, storage on a moto S3 server on the bridge): 2
train workers, one per node, so a lost node leaves too few CPUs for the worker group. Runs,
one after the other, ``workflow run --stages ingest,model,train`` of a tiny recipe (ViGGO rows,
the tiny random base, LoRA, ``max_steps`` 24, a checkpoint every 4 steps, seed 42):

- ``baseline``: uninterrupted.
- ``train-node-lost``: once Ray Train has recorded the first checkpoint (its snapshot in
  storage names it; a checkpoint a worker reported is recorded when the controller next polls
  the workers, every 2 s), every process of one worker node is killed at once (SIGKILL); a
  replacement node starts (as an autoscaler would). Ray Train restarts the worker group
  (``failure_config.max_failures: 1``) from the latest recorded checkpoint; the run must finish
  with the baseline's step count. ``--kill-at reported`` kills as soon as rank 0 says the
  checkpoint is uploaded instead.
- ``train-node-lost-no-replacement``: the same kill, no new node; with
  ``failure_config.controller_failure_limit: 1`` and ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``
  30, the run must fail in one line after about 2 × 30 s.

``--scenarios evaluate-node-lost``: the recipe with an ``evaluate`` section (1,000 test rows, base and
adapter, batches of 16) is trained, then evaluated; 2 s after the vLLM engine actor has started,
every process of its node is killed, none added; the JSON counts the prediction
rows per variant (or says what was written).

``--scenarios train-storage-outage,train-storage-outage-long`` (one host, no namespaces; Ray
started by the stage): the S3 server (moto, stopped and started in this process, its buckets
kept) is stopped once Ray Train recorded the first checkpoint, for 15 s, or until the run ends
(``WORKFLOW_STORAGE_RETRY_SECONDS`` 20), after which the same run is run again.

Prints one line per event and a summary; writes ``bench/results/faults/<machine>.json`` (bench/record.py;
``--out`` to override): per scenario ``rows_lost``, ``recovery_s``, ``failed_requests``, and every event
beside it (``.raw.json``, when under 1 MB). Needs root (namespaces).

    .venvs/serve/bin/python bench/faults.py --scenarios baseline,train-node-lost,train-node-lost-no-replacement
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "core"))
sys.path.insert(0, str(REPO))

import record  # noqa: E402  (bench/record.py, beside this script)
from netns_cluster import leftovers, namespace_cluster  # noqa: E402
from test_storage_faults import StoppableS3  # noqa: E402

from workflow.core import envs  # noqa: E402

SCENARIOS = ("baseline", "train-node-lost", "train-node-lost-no-replacement", "evaluate-node-lost",
             "train-storage-outage", "train-storage-outage-long", "serve-node-lost", "head-restart")
STORAGE_SCENARIOS = SCENARIOS[4:6]  # one host: Ray started by the stage, the S3 server in this process
SERVE_SCENARIOS = SCENARIOS[6:]  # a cluster of nodes of 4 CPUs; the head keeps the GCS's state with --gcs-storage
SHORT_OUTAGE_S = 15
DEFAULT_SCENARIOS = SCENARIOS[:3]
EVAL_ROWS = 1000  # ~2,000 prompts: the tiny model answers 80 in under a second
# From the GCS's actor table: the IP of the node of the first live vLLM engine actor (an actor is
# ALIVE once its __init__, the engine's start, has returned).
WHERE_THE_ENGINE_RUNS = """
import time, ray
from ray._private import state
ray.init(log_to_driver=False, logging_level="ERROR")
while True:
    ips = [a["Address"]["IPAddress"] for a in state.actors().values()
           if a["State"] == "ALIVE" and "vLLMEngineStageUDF" in a["ActorClassName"]]
    if ips:
        print("ENGINE", ips[0], flush=True)
        break
    time.sleep(0.5)
"""
CHECKPOINT_LINE = re.compile(r"\[training\] checkpoint at step (\d+) is in storage")
STEPS, SAVE_EVERY = 24, 4
START_TIMEOUT_S = "30"


def recipe(name: str, storage_uri: str, folder: Path, failure_config: dict, evaluate: bool = False) -> Path:
    data = {
        "name": name, "storage": storage_uri, "model": {"source": "tiny"},
        "ingest": {"source": str(REPO / "data" / "viggo"), "splits": {"train": "train.csv", "test": "test.csv"},
                   "columns": {"input": "ref", "output": "mr"}, "instruction": "Parse the sentence.",
                   "max_samples": {"train": 64, "test": 8}},
        "train": {
            "scaling_config": {"num_workers": 2, "resources_per_worker": {"CPU": 1}, "placement_strategy": "SPREAD"},
            "failure_config": failure_config,
            "llamafactory": {
                "stage": "sft", "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "template": "qwen",
                "cutoff_len": 512, "max_samples": 64, "per_device_train_batch_size": 4, "learning_rate": 5.0e-3,
                "max_steps": STEPS, "logging_steps": 1, "save_steps": SAVE_EVERY, "use_cpu": True,
                "ddp_backend": "gloo", "preprocessing_num_workers": 1, "seed": 42},
        },
    }
    if evaluate:  # the CPU recipe's engine settings, small batches so that the kill lands mid-stage
        data["ingest"]["max_samples"]["test"] = EVAL_ROWS
        data["evaluate"] = {
            "split": "test", "task": "viggo", "parity": None, "sampling_params": {"temperature": 0.0, "max_tokens": 48},
            "processor": {"batch_size": 16, "concurrency": 1,
                          "engine_kwargs": {"max_model_len": 512, "dtype": "float32", "enforce_eager": True},
                          "placement_group_config": {"bundles": [{"CPU": 1}]},
                          "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Run:
    """``workflow run RECIPE --stages ingest,model,train`` from the driver's namespace; lines timestamped."""

    def __init__(self, env: dict, path: Path, stages: str = "ingest,model,train", extra: tuple[str, ...] = ()):
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([envs.python_for(envs.SERVE), "-m", "workflow", "run", str(path), "--stages",
                                      stages, *extra], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))
            print(f"  {self.lines[-1][0]:7.1f}s {line.rstrip()}", flush=True)

    def wait_for(self, pattern: re.Pattern, timeout: float = 900) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in self.lines:
                if pattern.search(line):
                    return at
            if self.proc.poll() is not None:
                raise RuntimeError(f"the run ended before {pattern.pattern!r}")
            time.sleep(0.2)
        raise TimeoutError(pattern.pattern)

    def finish(self, timeout: float = 1800) -> dict:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.5)  # the reader thread's last lines
        return {"exit_code": code, "seconds": round(time.monotonic() - self.started, 1),
                "errors": [line for _, line in self.lines if line.startswith("error:")],
                "lines": [f"{at:.1f}s {line}" for at, line in self.lines]}


def s3_client(cluster):
    import boto3

    return boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name=cluster.aws_env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=cluster.aws_env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=cluster.aws_env["AWS_SECRET_ACCESS_KEY"])


def train_manifest(cluster, bucket: str, name: str) -> dict | None:
    try:
        body = s3_client(cluster).get_object(Bucket=bucket, Key=f"runs/{name}/train/manifest.json")["Body"].read()
    except Exception:  # noqa: BLE001 - no manifest: the stage did not finish
        return None
    return json.loads(body)


def adapter_tensors(cluster, bucket: str, name: str) -> dict:
    from safetensors.numpy import load

    s3 = s3_client(cluster)
    prefix = f"runs/{name}/train/adapters/{name}/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    key = next(k for k in keys if k.endswith("adapter_model.safetensors"))
    return load(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).getvalue())


def compare_adapters(a: dict, b: dict) -> dict:
    import numpy as np

    diffs = {name: float(np.max(np.abs(a[name].astype(np.float64) - b[name].astype(np.float64)))) for name in a}
    scale = max(float(np.max(np.abs(t.astype(np.float64)))) for t in a.values())
    return {"tensors": len(a), "same_names": sorted(a) == sorted(b), "identical": all(d == 0 for d in diffs.values()),
            "max_abs_diff": max(diffs.values()), "max_abs_value": scale}


def recorded_step(cluster, bucket: str, name: str) -> int:
    """The step of the latest checkpoint in Ray Train's snapshot (what a restart resumes from); 0 if none."""
    s3 = s3_client(cluster)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"runs/{name}/train/checkpoints/").get("Contents", [])
    keys = [o["Key"] for o in listed if o["Key"].endswith("/checkpoint_manager_snapshot.json")]
    if not keys:
        return 0
    try:
        latest = json.loads(s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read()).get("latest_checkpoint_result")
    except ValueError:  # caught mid-write
        return 0
    match = re.search(r"checkpoint-(\d+)$", (latest or {}).get("checkpoint_dir_name", ""))
    return int(match.group(1)) if match else 0


def node_lost(cluster, bucket: str, folder: Path, *, replace: bool, kill_at: str) -> dict:
    name = "lost" if replace else "lost-alone"
    failure = {"max_failures": 1} if replace else {"max_failures": 1, "controller_failure_limit": 1}
    run = Run(cluster.driver_env(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=START_TIMEOUT_S),
              recipe(name, f"s3://{bucket}/runs", folder, failure))
    first = run.wait_for(CHECKPOINT_LINE)
    step = int(CHECKPOINT_LINE.search(next(line for _, line in run.lines if CHECKPOINT_LINE.search(line))).group(1))
    if kill_at == "recorded":
        while (step := recorded_step(cluster, bucket, name)) == 0:
            if run.proc.poll() is not None:
                raise RuntimeError("the run ended before Ray Train recorded a checkpoint")
            time.sleep(0.2)
        print(f"[faults] {time.monotonic() - run.started:.1f}s: Ray Train recorded the checkpoint of step {step}",
              flush=True)
    victim = cluster.nodes[-1]
    killed = time.monotonic() - run.started
    cluster.kill_node(victim)
    print(f"[faults] {killed:.1f}s: killed every process of node {victim.name} ({victim.ip}) after the checkpoint "
          f"of step {step} (seen at {first:.1f}s)", flush=True)
    out = {"kill_at": kill_at, "checkpoint_step_before_kill": step, "first_reported_at_s": round(first, 1), "killed_at_s": round(killed, 1), "killed_node": victim.ip}
    if replace:
        node = cluster.add_node(f"r{len(cluster.nodes) + 2}", cpus=1)
        joined = time.monotonic() - run.started
        print(f"[faults] {joined:.1f}s: replacement node {node.name} ({node.ip}) is in the cluster", flush=True)
        out["replacement_joined_at_s"] = round(joined, 1)
    result = run.finish()
    resumed = [at for at, line in run.lines if "resuming from step" in line]
    out.update(result)
    out["resumed_at_s"] = resumed[0] if resumed else None
    out["failed_at_s"] = result["seconds"] if result["exit_code"] else None
    out["manifest"] = train_manifest(cluster, bucket, name)
    return out


def engine_node(cluster):
    """The worker node of the evaluate stage's vLLM engine actor, once the engine has started."""
    proc = subprocess.run([envs.python_for(envs.SERVE), "-c", WHERE_THE_ENGINE_RUNS], env=cluster.driver_env(),
                          capture_output=True, text=True, timeout=900, check=False)
    ip = next(line for line in proc.stdout.splitlines() if line.startswith("ENGINE "))[7:]
    return next(node for node in cluster.nodes if node.ip == ip)


def evaluate_node_lost(cluster, bucket: str, folder: Path) -> dict:
    """Train (uninterrupted), then evaluate; the engine actor's node is killed at the first progress line."""
    import pyarrow.parquet as pq

    path = recipe("eval", f"s3://{bucket}/runs", folder, {"max_failures": 1}, evaluate=True)
    trained = Run(cluster.driver_env(), path).finish()
    assert trained["exit_code"] == 0, trained["lines"][-20:]
    run = Run(cluster.driver_env(), path, stages="evaluate")
    victim = engine_node(cluster)
    time.sleep(2)  # batches are in the engine
    killed = time.monotonic() - run.started
    cluster.kill_node(victim)
    print(f"[faults] {killed:.1f}s: killed every process of node {victim.name} ({victim.ip}), the engine's", flush=True)
    try:
        result = run.finish(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(run.proc.pid, signal.SIGKILL)  # the runner, its stage process and their children
        result = {**run.finish(), "timed_out_after_s": 300}
    out = {"killed_at_s": round(killed, 1), "killed_node": victim.ip, **result}
    s3 = s3_client(cluster)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/eval/evaluate/").get("Contents", [])]
    out["files_written"] = sorted(k.rsplit("/", 1)[1] for k in keys)
    if "runs/eval/evaluate/predictions.parquet" in keys:
        body = s3.get_object(Bucket=bucket, Key="runs/eval/evaluate/predictions.parquet")["Body"].read()
        table = pq.read_table(io.BytesIO(body)).to_pylist()
        per_variant: dict = {}
        for row in table:
            per_variant.setdefault(row["variant"], []).append(row["row_id"])
        out["rows"] = {v: {"rows": len(ids), "distinct": len(set(ids)), "missing": EVAL_ROWS - len(set(ids))}
                       for v, ids in per_variant.items()}
    return out


def train_storage_outage(folder: Path, *, outage_s: float | None) -> dict:
    """The S3 server stopped once Ray Train recorded the first checkpoint, for ``outage_s`` seconds (None: until
    the run has ended, with ``WORKFLOW_STORAGE_RETRY_SECONDS`` 20); a failed run is run again once it is back."""
    from types import SimpleNamespace

    server = StoppableS3()
    server.start()
    aws = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
           "AWS_DEFAULT_REGION": "us-east-1"}
    store = SimpleNamespace(s3_endpoint=server.url, aws_env=aws)
    bucket = f"outage-{server.port}"
    s3_client(store).create_bucket(Bucket=bucket)
    env = {**envs.stage_environment(envs.SERVE), **aws, "AWS_ENDPOINT_URL": server.url}
    env.pop("RAY_ADDRESS", None)
    if outage_s is None:
        env["WORKFLOW_STORAGE_RETRY_SECONDS"] = "20"
    name = "outage" if outage_s else "outage-long"
    path = recipe(name, f"s3://{bucket}/runs", folder, {"max_failures": 1})
    try:
        run = Run(env, path)
        run.wait_for(CHECKPOINT_LINE)
        while (step := recorded_step(store, bucket, name)) == 0:
            if run.proc.poll() is not None:
                raise RuntimeError("the run ended before Ray Train recorded a checkpoint")
            time.sleep(0.2)
        stopped = time.monotonic() - run.started
        server.stop()
        print(f"[faults] {stopped:.1f}s: S3 server stopped after Ray Train recorded the checkpoint of step {step}"
              f" ({'for ' + str(outage_s) + ' s' if outage_s else 'until the run ends'})", flush=True)
        if outage_s:
            threading.Timer(outage_s, server.start).start()
        out = {"outage_s": outage_s, "stopped_at_s": round(stopped, 1), "checkpoint_step_before_outage": step,
               **run.finish()}
        if outage_s is None:
            server.start()
            print("[faults] S3 server started again; the same run again", flush=True)
            out["manifest_after_failure"] = train_manifest(store, bucket, name)
            out["rerun"] = Run(env, path).finish()
        out["manifest"] = train_manifest(store, bucket, name)
        return out
    finally:
        server.stop()

# ---------------------------------------------------------------- serving

SERVE_RUN = "serve-faults"
SERVE_KEY_ENV, SERVE_KEY = "WORKFLOW_API_KEY", "faults-bench-key-0123456789"  # a test key, not a secret
CLIENTS = 6  # streaming clients, each one request after another, base and adapter in turn
CLIENT_READ_TIMEOUT_S = 180  # no byte for this long ends a request as a timeout: a hang shows as one (longer
CLIENT_MAX_S = 240  # than a replica's restart, so that a request's own end shows); no request lasts longer
AFTER_RECOVERY_S = 20  # the load goes on this long once both models answered again
RECOVERY_LIMIT_S = 480  # after the fault, at most
# Every second: the app's status in Serve and the live LLMServer replicas (id, node IP, pid), from the GCS.
SERVE_MONITOR = """
import json, sys, time, ray
from ray import serve
from ray._private import state
ray.init(log_to_driver=False, logging_level="ERROR")
while True:
    try:
        app = serve.status().applications.get(sys.argv[1])
        alive = [a for a in state.actors().values() if a["State"] == "ALIVE"]
        replicas = [[a["ActorID"][:12], a["Address"]["IPAddress"], a["Pid"]] for a in alive
                    if "LLMServer" in a["ActorClassName"]]
        ingress = sorted(a["Address"]["IPAddress"] for a in alive
                         if a["ActorClassName"].startswith("ServeReplica") and "Ingress" in a["ActorClassName"])
        proxies = sorted(a["Address"]["IPAddress"] for a in alive if a["ActorClassName"] == "ProxyActor")
        nodes = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
        print("STATE", json.dumps({"app": app.status if app else None, "replicas": replicas, "ingress": ingress,
                                   "proxies": proxies, "nodes": nodes}), flush=True)
    except Exception as error:  # the GCS away: say so, try again
        print("STATE", json.dumps({"error": f"{type(error).__name__}: {str(error)[:160]}"}), flush=True)
    time.sleep(1)
"""


def serve_recipe(cluster, bucket: str, folder: Path) -> Path:
    """The CPU recipe shrunk as tests/test_on_a_cluster.py shrinks it (8 pre-training and 8 LoRA steps), its
    ``direct_streaming: true`` kept, an API key, no parity reference (serving faults, not answers)."""
    from conftest import CI_OVERRIDES, VIGGO, _merge, free_port
    from test_on_a_cluster import CLUSTER_OVERRIDES

    data = _merge(_merge(yaml.safe_load((REPO / "recipes" / "viggo-cpu.yaml").read_text()), CI_OVERRIDES),
                  CLUSTER_OVERRIDES)
    data.update(name=SERVE_RUN, storage=f"s3://{bucket}/runs")
    data["ingest"]["source"] = str(VIGGO)
    data["evaluate"]["parity"] = None
    data["serve"].update(port=free_port(), api_key_env=SERVE_KEY_ENV)
    path = folder / f"{SERVE_RUN}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def deploy_serve_run(cluster, bucket: str, folder: Path) -> dict:
    """``workflow run --stages ingest,model,train,serve --detach`` onto the cluster; the endpoint it wrote."""
    run = Run(cluster.driver_env(**{SERVE_KEY_ENV: SERVE_KEY}), serve_recipe(cluster, bucket, folder),
              stages="ingest,model,train,serve", extra=("--detach",))
    result = run.finish(timeout=2400)
    if result["exit_code"] != 0:
        raise RuntimeError(f"the serve run failed: {result['errors'] or result['lines'][-5:]}")
    body = s3_client(cluster).get_object(Bucket=bucket, Key=f"runs/{SERVE_RUN}/serve/endpoint.json")["Body"].read()
    return {"endpoint": json.loads(body), "run_seconds": result["seconds"],
            "serve_lines": [line for line in result["lines"] if "[serve]" in line]}


class Monitor:
    """SERVE_MONITOR in a driver process, started again when it ends or has said nothing for 10 s (a driver
    connected to a GCS that went away neither prints nor exits)."""

    def __init__(self, cluster, app: str, t0: float):
        self.cluster, self.app, self.t0 = cluster, app, t0
        self.states: list[tuple[float, dict]] = []
        self.stopped = threading.Event()
        self.proc = None
        self.heard = time.monotonic()
        threading.Thread(target=self._loop, daemon=True).start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            if line.startswith("STATE "):
                self.heard = time.monotonic()
                state = json.loads(line[6:])
                if not self.states or self.states[-1][1] != state:
                    print(f"  {time.monotonic() - self.t0:7.1f}s [monitor] {json.dumps(state)}", flush=True)
                self.states.append((time.monotonic() - self.t0, state))

    def _loop(self) -> None:
        while not self.stopped.is_set():
            self.heard = started = time.monotonic()
            self.proc = proc = subprocess.Popen([envs.python_for(envs.SERVE), "-c", SERVE_MONITOR, self.app],
                                                env=self.cluster.driver_env(), text=True, stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL, start_new_session=True)
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()
            # ray.init takes a while on a loaded machine: 30 s for the first line, 10 s between lines
            while proc.poll() is None and not self.stopped.is_set() and \
                    time.monotonic() - self.heard < (10 if self.heard > started else 30):
                time.sleep(0.5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if not self.stopped.is_set():
                state = {"error": "no answer from the cluster (monitor restarted)"}
                if not self.states or self.states[-1][1] != state:
                    print(f"  {time.monotonic() - self.t0:7.1f}s [monitor] {json.dumps(state)}", flush=True)
                self.states.append((time.monotonic() - self.t0, state))

    def latest(self) -> dict:
        """The last state the cluster answered with."""
        return next((state for _, state in reversed(self.states) if "error" not in state), {})

    def stop(self) -> None:
        self.stopped.set()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def first(self, predicate, after: float) -> float | None:
        return next((round(at, 1) for at, state in self.states if at >= after and predicate(state)), None)


def stream_once(url: str, model: str, prompt: str) -> dict:
    """One streaming chat completion, bounded: how it ended (ok, http N, error in stream, timeout, error)."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 32,
            "temperature": 0.0, "stream": True}
    chunks, outcome, detail = 0, None, ""
    started = time.monotonic()
    try:
        with httpx.stream("POST", f"{url}/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {SERVE_KEY}"},
                          timeout=httpx.Timeout(CLIENT_READ_TIMEOUT_S, connect=10)) as resp:
            if resp.status_code != 200:
                outcome, detail = f"http {resp.status_code}", resp.read().decode(errors="replace")[:200]
            else:
                for line in resp.iter_lines():
                    if time.monotonic() - started > CLIENT_MAX_S:
                        outcome = "timeout (whole request)"
                        break
                    if line == "data: [DONE]":
                        outcome = "ok"
                        break
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            outcome, detail = "error in stream", json.dumps(event["error"])[:200]
                            break
                        chunks += 1
                outcome = outcome or "stream ended without [DONE]"
    except httpx.TimeoutException as error:
        outcome, detail = f"timeout ({type(error).__name__})", str(error)[:200]
    except (httpx.HTTPError, ValueError) as error:
        outcome, detail = f"error {type(error).__name__}", str(error)[:200]
    return {"outcome": outcome, "chunks": chunks, "detail": detail}


class Load:
    """Streaming clients per URL, each one request after another (base and adapter in turn), all recorded."""

    def __init__(self, urls: dict[str, str], models: list[str], clients: int, t0: float, prompt: str):
        self.t0, self.prompt = t0, prompt
        self.records: list[dict] = []
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(where, url, models, i), daemon=True)
                        for where, url in urls.items() for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self, where: str, url: str, models: list[str], index: int) -> None:
        n = index
        while not self.stopped.is_set():
            model = models[n % len(models)]
            n += 1
            start = time.monotonic() - self.t0
            result = stream_once(url, model, self.prompt)
            end = time.monotonic() - self.t0
            self.records.append({"via": where, "client": index, "model": model, "start": round(start, 2),
                                 "end": round(end, 2), **result})
            if result["outcome"] != "ok":
                print(f"  {end:7.1f}s [client {where}/{index}] {model}: {result['outcome']} after "
                      f"{end - start:.1f}s, {result['chunks']} chunks {result['detail'][:120]}", flush=True)
                time.sleep(0.5)  # a refused connection does not become a busy loop

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=CLIENT_MAX_S + 30)

    def ok_again(self, model: str, after: float, via: str | None = None) -> float | None:
        """When the first request started after ``after`` for ``model`` ended ok."""
        ends = [r["end"] for r in self.records if r["model"] == model and r["start"] >= after and
                r["outcome"] == "ok" and (via is None or r["via"] == via)]
        return min(ends) if ends else None


def summarize_requests(records: list[dict], fault_at: float, recovered_at: float | None) -> dict:
    """Requests by phase (before the fault, in flight at it, during the outage, after recovery) and outcome."""
    def count(rows):
        out: dict = {}
        for r in rows:
            out[r["outcome"]] = out.get(r["outcome"], 0) + 1
        return out

    in_flight = [r for r in records if r["start"] < fault_at <= r["end"]]
    after = recovered_at if recovered_at is not None else float("inf")
    return {
        "before": count(r for r in records if r["end"] < fault_at),
        "in_flight_at_fault": count(in_flight),
        "in_flight_durations_s": sorted(round(r["end"] - fault_at, 1) for r in in_flight),
        "started_during_outage": count(r for r in records if fault_at <= r["start"] < after),
        "started_after_recovery": count(r for r in records if r["start"] >= after),
        "longest_request_s": max((round(r["end"] - r["start"], 1) for r in records), default=None),
        "total": len(records)}


def replica_node(cluster, monitor: Monitor, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replicas = monitor.latest().get("replicas") or []
        if len(replicas) == 1:
            ip = replicas[0][1]
            return next(node for node in cluster.nodes if node.ip == ip), replicas[0]
        time.sleep(0.5)
    raise TimeoutError(f"no single live LLMServer replica: {monitor.latest()}")


def warm_until_both_answer(load: Load, models: list[str], t0: float, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(load.ok_again(m, 0) is not None for m in models):
            return time.monotonic() - t0
        time.sleep(0.5)
    raise TimeoutError(f"the app does not answer both {models}")


def serve_node_lost(cluster, deployed: dict, prompt: str) -> dict:
    """Under load, every process of the LLMServer replica's node killed; the other worker node has room."""
    endpoint = deployed["endpoint"]
    base, adapter = endpoint["model_ids"][0], endpoint["model_ids"][1]
    t0 = time.monotonic()
    monitor = Monitor(cluster, endpoint["app"], t0)
    load = None
    try:
        victim, replica = replica_node(cluster, monitor)
        print(f"[faults] {time.monotonic() - t0:.1f}s: the LLMServer replica {replica} is on {victim.name} "
              f"({victim.ip}); {CLIENTS} streaming clients on {endpoint['base_url']}", flush=True)
        load = Load({"head": endpoint["base_url"]}, [base, adapter], CLIENTS, t0, prompt)
        warm = warm_until_both_answer(load, [base, adapter], t0)
        time.sleep(10)  # steady load, the adapter loaded
        killed = time.monotonic() - t0
        cluster.kill_node(victim)
        print(f"[faults] {killed:.1f}s: killed every process of node {victim.name} ({victim.ip}), the replica's "
              f"(both models answered since {warm:.1f}s)", flush=True)
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        while time.monotonic() < deadline:
            back = [load.ok_again(m, killed) for m in (base, adapter)]
            if None not in back and time.monotonic() - t0 > max(back) + AFTER_RECOVERY_S:
                break
            time.sleep(1)
        load.stop()
        base_back, adapter_back = (load.ok_again(m, killed) for m in (base, adapter))
        new = [r for r in monitor.latest().get("replicas") or []]
        out = {"killed_node": victim.ip, "replica_before": replica, "replica_after": new,
               "killed_at_s": round(killed, 1), "clients": CLIENTS, "client_read_timeout_s": CLIENT_READ_TIMEOUT_S,
               "node_dead_in_gcs_at_s": monitor.first(lambda s: s.get("nodes") and victim.ip not in s["nodes"],
                                                       killed),
               "replica_alive_elsewhere_at_s": monitor.first(
                   lambda s: any(r[1] != victim.ip for r in s.get("replicas") or []), killed),
               "app_running_again_at_s": monitor.first(lambda s: s.get("app") == "RUNNING" and any(
                   r[1] != victim.ip for r in s.get("replicas") or []), killed),
               "base_ok_again_at_s": base_back, "adapter_ok_again_at_s": adapter_back,
               "recovery_s": round(max(base_back, adapter_back) - killed, 1) if base_back and adapter_back else None,
               "requests": summarize_requests(load.records, killed, max(base_back, adapter_back)
                                              if base_back and adapter_back else None),
               "records": load.records, "monitor": [[round(at, 1), state] for at, state in monitor.states]}
        return out
    finally:
        if load is not None:
            load.stop()
        monitor.stop()


def head_restart(cluster, deployed: dict, prompt: str, down_s: float, limit_s: float) -> dict:
    """Under load (clients on the head's proxy and on the replica node's), every process of the head killed;
    after ``down_s`` seconds the head starts again with the same address and GCS storage."""
    endpoint = deployed["endpoint"]
    base, adapter = endpoint["model_ids"][0], endpoint["model_ids"][1]
    port = endpoint["base_url"].rsplit(":", 1)[1].split("/")[0]
    t0 = time.monotonic()
    monitor = Monitor(cluster, endpoint["app"], t0)
    load = None
    try:
        node, replica = replica_node(cluster, monitor)
        urls = {"head": endpoint["base_url"], "replica-node": f"http://{node.ip}:{port}/v1"}
        print(f"[faults] {time.monotonic() - t0:.1f}s: the LLMServer replica {replica} is on {node.name} ({node.ip});"
              f" {CLIENTS // 2} streaming clients on each of {urls}", flush=True)
        load = Load(urls, [base, adapter], CLIENTS // 2, t0, prompt)
        warm = warm_until_both_answer(load, [base, adapter], t0)
        time.sleep(10)
        killed = time.monotonic() - t0
        cluster.kill_head()
        print(f"[faults] {killed:.1f}s: killed every process of the head ({cluster.address}: GCS, raylet, Serve's "
              f"controller and proxy there; answering since {warm:.1f}s)", flush=True)
        time.sleep(down_s)
        restarting = time.monotonic() - t0
        print(f"[faults] {restarting:.1f}s: starting the head again", flush=True)
        head_error = None
        try:
            cluster.start_head()
        except BaseException as error:  # pytest.fail: Failed is a BaseException
            head_error = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"[faults] the head did not start again: {head_error}", flush=True)
        head_up = time.monotonic() - t0
        if head_error is None:
            print(f"[faults] {head_up:.1f}s: the head's `ray start` says the runtime started", flush=True)
        deadline = time.monotonic() + (limit_s if head_error is None else 100)  # long enough for the raylets' 60 s
        while time.monotonic() < deadline:
            back = [load.ok_again(m, head_up, via="head") for m in (base, adapter)]
            if None not in back and time.monotonic() - t0 > max(back) + AFTER_RECOVERY_S:
                break
            time.sleep(1)
        load.stop()
        back = {f"{kind}_via_{via}": load.ok_again(model, head_up, via=via)
                for kind, model in (("base", base), ("adapter", adapter)) for via in urls}
        via_replica_during = [r for r in load.records if r["via"] == "replica-node" and killed <= r["start"] < head_up]
        via_head_during = [r for r in load.records if r["via"] == "head" and killed <= r["start"] < head_up]
        replicas_after = monitor.latest().get("replicas") or []
        seen_after = sorted({tuple(r) for at, state in monitor.states if at >= head_up
                             for r in state.get("replicas") or []})
        out = {"gcs_storage": cluster.head_env.get("RAY_gcs_storage", "memory"), "replica_node": node.ip,
               "replica_before": replica, "replica_after": replicas_after,
               "same_replica_process": bool(replicas_after) and [replicas_after[0][0], replicas_after[0][2]] ==
               [replica[0], replica[2]],
               "killed_at_s": round(killed, 1), "head_restarted_at_s": round(restarting, 1),
               "head_up_at_s": round(head_up, 1), "head_start_error": head_error, "clients": CLIENTS,
               "ok_again_at_s": back,
               "while_head_down": {
                   "via_replica_node": {"requests": len(via_replica_during),
                                        "ok": sum(r["outcome"] == "ok" for r in via_replica_during),
                                        "outcomes": summarize_requests(via_replica_during, killed, None)[
                                            "started_during_outage"]},
                   "via_head": {"requests": len(via_head_during),
                                "ok": sum(r["outcome"] == "ok" for r in via_head_during)}},
               "nodes_alive_after": monitor.latest().get("nodes"),
               "replicas_seen_after_restart": [list(r) for r in seen_after],
               "cluster_answers_again_at_s": monitor.first(lambda s: "error" not in s, head_up),
               "app_running_again_at_s": monitor.first(lambda s: s.get("app") == "RUNNING", head_up),
               "requests_head": summarize_requests([r for r in load.records if r["via"] == "head"], killed, None),
               "requests_replica_node": summarize_requests([r for r in load.records if r["via"] == "replica-node"],
                                                           killed, None),
               "records": load.records, "monitor": [[round(at, 1), state] for at, state in monitor.states]}
        return out
    finally:
        if load is not None:
            load.stop()
        monitor.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--kill-at", choices=("recorded", "reported"), default="recorded",
                        help="kill once Ray Train recorded the first checkpoint, or once rank 0 reported it")
    parser.add_argument("--gcs-storage", choices=("rocksdb", "memory"), default="rocksdb",
                        help="the head's GCS storage in the serve scenarios: rocksdb (Ray's embedded store on the "
                             "head's disk: GCS fault tolerance without Redis) or memory (Ray's default)")
    parser.add_argument("--head-down-s", type=float, default=10, help="head-restart: seconds the head stays down")
    parser.add_argument("--out", help="result file (default bench/results/faults/<machine>.json); every event "
                                      "recorded goes beside it (<name>.raw.json, when under 1 MB)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # a `kill` tears the cluster down too (a background job ignores ^C)
    scenarios = args.scenarios.split(",")
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "scenarios": {}}
    folder = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    started = time.monotonic()
    for name in (n for n in STORAGE_SCENARIOS if n in scenarios):
        print(f"[faults] {name}: the S3 server stopped while the train stage trains (one host)", flush=True)
        results["scenarios"][name] = train_storage_outage(folder, outage_s=None if name.endswith("-long")
                                                          else SHORT_OUTAGE_S)
    if set(scenarios) & set(SERVE_SCENARIOS):
        results["serve"] = serve_scenarios(folder, scenarios, args)
        results["left_after_teardown"] = results["serve"].pop("left_after_teardown")
    if not set(scenarios) - set(STORAGE_SCENARIOS) - set(SERVE_SCENARIOS):
        return write_results(results, args.out)
    with namespace_cluster(folder, workers=2, worker_cpus=1) as cluster:
        print(f"[faults] cluster up in {time.monotonic() - started:.0f}s: head {cluster.address}, "
              f"nodes {[n.ip for n in cluster.nodes]}", flush=True)
        bucket = cluster.make_bucket("faults").removeprefix("s3://")
        if "baseline" in scenarios:
            print("[faults] baseline: uninterrupted", flush=True)
            run = Run(cluster.driver_env(), recipe("baseline", f"s3://{bucket}/runs", folder, {"max_failures": 1}))
            results["scenarios"]["baseline"] = {**run.finish(), "manifest": train_manifest(cluster, bucket, "baseline")}
        if "train-node-lost" in scenarios:
            print("[faults] train-node-lost: a worker node killed after the first checkpoint, a replacement added",
                  flush=True)
            results["scenarios"]["train-node-lost"] = node_lost(cluster, bucket, folder, replace=True,
                                                                    kill_at=args.kill_at)
            if "baseline" in scenarios:
                results["adapter_vs_baseline"] = compare_adapters(adapter_tensors(cluster, bucket, "baseline"),
                                                                  adapter_tensors(cluster, bucket, "lost"))
        if "train-node-lost-no-replacement" in scenarios:
            print("[faults] train-node-lost-no-replacement: a worker node killed, none added", flush=True)
            results["scenarios"]["train-node-lost-no-replacement"] = node_lost(cluster, bucket, folder,
                                                                                   replace=False, kill_at=args.kill_at)
        if "evaluate-node-lost" in scenarios:
            print("[faults] evaluate-node-lost: the engine actor's node killed mid-stage, none added", flush=True)
            results["scenarios"]["evaluate-node-lost"] = evaluate_node_lost(cluster, bucket, folder)
        cluster_id, temp_dir = cluster.id, cluster.temp_dir
    results["left_after_teardown"] = leftovers(cluster_id, temp_dir)
    return write_results(results, args.out)


def serve_scenarios(folder: Path, scenarios: list[str], args) -> dict:
    """The serve run deployed once onto a cluster of 2 worker nodes of 4 CPUs; then each serve scenario."""
    from conftest import INSTRUCTION

    head_env = ({"RAY_gcs_storage": "rocksdb", "RAY_gcs_storage_path": str(folder / "gcs-storage")}
                if args.gcs_storage == "rocksdb" else {})
    prompt = f"{INSTRUCTION}\n\nDo you like Tetris?"
    started = time.monotonic()
    out: dict = {"gcs_storage": args.gcs_storage}
    with namespace_cluster(folder, workers=2, worker_cpus=4, head_env=head_env) as cluster:
        print(f"[faults] cluster up in {time.monotonic() - started:.0f}s: head {cluster.address} (GCS storage "
              f"{args.gcs_storage}), nodes {[n.ip for n in cluster.nodes]}", flush=True)
        bucket = cluster.make_bucket("serve-faults").removeprefix("s3://")
        print("[faults] the serve run: ingest, model, train, serve --detach onto the cluster", flush=True)
        deployed = deploy_serve_run(cluster, bucket, folder)
        out["deploy"] = deployed
        print(f"[faults] deployed in {deployed['run_seconds']}s: {deployed['endpoint']}", flush=True)
        if "serve-node-lost" in scenarios:
            print("[faults] serve-node-lost: the LLMServer replica's node killed under load, none added", flush=True)
            out["serve-node-lost"] = serve_node_lost(cluster, deployed, prompt)
        if "head-restart" in scenarios:
            print(f"[faults] head-restart: the head killed under load, started again {args.head_down_s:.0f}s later",
                  flush=True)
            out["head-restart"] = head_restart(cluster, deployed, prompt, args.head_down_s,
                                               RECOVERY_LIMIT_S if args.gcs_storage == "rocksdb" else 150)
        cluster_id, temp_dir = cluster.id, cluster.temp_dir
    out["left_after_teardown"] = leftovers(cluster_id, temp_dir)
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def write_results(results: dict, out: str | None) -> int:
    print_summary(results)
    record.write("faults", scenario_figures(results), out, raw=results)
    return 0


def request_failures(requests: dict) -> tuple[int, int]:
    """(failed, refused): requests that ended in an error, apart from refused connections (clients retry those)."""
    failed = refused = 0
    for phase in ("before", "in_flight_at_fault", "started_during_outage", "started_after_recovery"):
        for outcome, n in (requests.get(phase) or {}).items():
            if outcome == "error ConnectError":
                refused += n
            elif outcome != "ok":
                failed += n
    return failed, refused


def scenario_figures(results: dict) -> dict:
    """Per scenario ``rows_lost``, ``recovery_s`` (fault to working again) and ``failed_requests``; None where a
    figure does not apply (training has no requests: it redoes steps, ``steps_redone``)."""
    figures: dict = {}
    for name, r in results["scenarios"].items():
        if name == "baseline":
            continue
        fault_at = r.get("killed_at_s", r.get("stopped_at_s"))
        out = {"rows_lost": None, "recovery_s": None, "failed_requests": None, "exit_code": r["exit_code"]}
        if name == "evaluate-node-lost":
            out["rows_lost"] = sum(v["missing"] for v in (r.get("rows") or {}).values())
        summary = (r.get("manifest") or {}).get("summary", {})
        if r.get("resumed_at_s") is not None and fault_at is not None:
            out["recovery_s"] = round(r["resumed_at_s"] - fault_at, 1)
        before = r.get("checkpoint_step_before_kill", r.get("checkpoint_step_before_outage"))
        if summary.get("resumed_from_step") is not None and before is not None:
            out["steps_redone"] = before - summary["resumed_from_step"]
        if r["exit_code"] != 0 and fault_at is not None:
            out["failed_after_s"] = round((r.get("failed_at_s") or r["seconds"]) - fault_at, 1)
        figures[name] = out
    serve = results.get("serve") or {}
    if "serve-node-lost" in serve:
        r = serve["serve-node-lost"]
        failed, refused = request_failures(r["requests"])
        figures["serve-node-lost"] = {"rows_lost": None, "recovery_s": r["recovery_s"], "failed_requests": failed,
                                      "refused_connections": refused, "requests": r["requests"]["total"]}
    if "head-restart" in serve:
        r = serve["head-restart"]
        counts = [request_failures(r[k]) for k in ("requests_head", "requests_replica_node")]
        back = [t for t in r["ok_again_at_s"].values() if t is not None]
        recovered = len(back) == len(r["ok_again_at_s"])
        figures["head-restart"] = {"rows_lost": None,
                                   "recovery_s": round(max(back) - r["killed_at_s"], 1) if recovered else None,
                                   "failed_requests": sum(f for f, _ in counts),
                                   "refused_connections": sum(n for _, n in counts),
                                   "requests": r["requests_head"]["total"] + r["requests_replica_node"]["total"]}
    return figures


def print_summary(results: dict) -> None:
    serve = results.get("serve") or {}
    if "serve-node-lost" in serve:
        r = serve["serve-node-lost"]
        print(f"[faults] serve-node-lost: killed {r['killed_node']} at {r['killed_at_s']}s; node dead in the GCS at "
              f"{r['node_dead_in_gcs_at_s']}s, replica alive elsewhere at {r['replica_alive_elsewhere_at_s']}s, app "
              f"RUNNING at {r['app_running_again_at_s']}s; base ok again at {r['base_ok_again_at_s']}s, adapter at "
              f"{r['adapter_ok_again_at_s']}s: recovery {r['recovery_s']}s; replica {r['replica_before']} -> "
              f"{r['replica_after']}")
        print(f"[faults]   requests: {json.dumps({k: v for k, v in r['requests'].items()})}")
    if "head-restart" in serve:
        r = serve["head-restart"]
        print(f"[faults] head-restart ({r['gcs_storage']}): killed at {r['killed_at_s']}s, started again at "
              f"{r['head_restarted_at_s']}s, up at {r['head_up_at_s']}s ({r['head_start_error'] or 'ok'}); ok again "
              f"at {r['ok_again_at_s']}; app RUNNING at {r['app_running_again_at_s']}s; same replica process "
              f"{r['same_replica_process']}; nodes after {r['nodes_alive_after']}")
        print(f"[faults]   while the head was down: {json.dumps(r['while_head_down'])}")
        print(f"[faults]   requests via the head: {json.dumps(r['requests_head'])}")
        print(f"[faults]   requests via the replica's node: {json.dumps(r['requests_replica_node'])}")
    for name, r in results["scenarios"].items():
        if name == "evaluate-node-lost":
            print(f"[faults] {name}: exit {r['exit_code']} in {r['seconds']}s, killed at {r['killed_at_s']}s; "
                  f"rows {r.get('rows')}; files {r['files_written']}; errors {r['errors']}")
            continue
        summary = (r.get("manifest") or {}).get("summary", {})
        print(f"[faults] {name}: exit {r['exit_code']} in {r['seconds']}s; global_step {summary.get('global_step')}, "
              f"resumed_from_step {summary.get('resumed_from_step')}, final_loss {summary.get('final_loss')}; "
              f"errors {r['errors']}")
        if r.get("rerun"):
            rerun = r["rerun"]
            print(f"[faults]   rerun: exit {rerun['exit_code']} in {rerun['seconds']}s; "
                  f"{[line for line in rerun['lines'] if '[train] ' in line and 'steps' in line]}")
        for key in ("killed_at_s", "replacement_joined_at_s", "resumed_at_s", "failed_at_s", "stopped_at_s"):
            if r.get(key) is not None:
                print(f"[faults]   {key}: {r[key]}")
    if "adapter_vs_baseline" in results:
        print(f"[faults] adapter vs baseline: {results['adapter_vs_baseline']}")
    if "left_after_teardown" in results:
        print(f"[faults] left after teardown: {results['left_after_teardown'] or 'nothing'}")


if __name__ == "__main__":
    sys.exit(main())
