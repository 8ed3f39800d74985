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

Prints one line per event and a summary; writes JSON to ``--out``. Needs root (namespaces).

    .venvs/serve/bin/python bench/faults.py --out bench/results/faults/train-node-lost.json
"""

from __future__ import annotations

import argparse
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

from netns_cluster import leftovers, namespace_cluster  # noqa: E402
from test_storage_faults import StoppableS3  # noqa: E402

from workflow.core import envs  # noqa: E402

SCENARIOS = ("baseline", "train-node-lost", "train-node-lost-no-replacement", "evaluate-node-lost",
             "train-storage-outage", "train-storage-outage-long")
STORAGE_SCENARIOS = SCENARIOS[4:]  # one host: Ray started by the stage, the S3 server in this process
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
                          "engine_kwargs": {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True},
                          "placement_group_config": {"bundles": [{"CPU": 1}]},
                          "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Run:
    """``workflow run RECIPE --stages ingest,model,train`` from the driver's namespace; lines timestamped."""

    def __init__(self, env: dict, path: Path, stages: str = "ingest,model,train"):
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([envs.python_for(envs.SERVE), "-m", "workflow", "run", str(path), "--stages",
                                      stages], env=env, text=True,
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--kill-at", choices=("recorded", "reported"), default="recorded",
                        help="kill once Ray Train recorded the first checkpoint, or once rank 0 reported it")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "faults" / "train-node-lost.json"))
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "scenarios": {}}
    folder = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    started = time.monotonic()
    for name in (n for n in STORAGE_SCENARIOS if n in scenarios):
        print(f"[faults] {name}: the S3 server stopped while the train stage trains (one host)", flush=True)
        results["scenarios"][name] = train_storage_outage(folder, outage_s=None if name.endswith("-long")
                                                          else SHORT_OUTAGE_S)
    if not set(scenarios) - set(STORAGE_SCENARIOS):
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


def write_results(results: dict, out: str) -> int:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_summary(results)
    print(f"[faults] wrote {out}")
    return 0


def print_summary(results: dict) -> None:
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
