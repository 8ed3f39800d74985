"""workflow.core.ray_cluster: which Ray a stage joins, and which Python its workers run.

A stage on a cluster of several nodes started from the *other* environment (the train stage
on a serve-env cluster), the cluster contract check and local storage on such a cluster are
tested on the namespace cluster of tests/test_on_a_cluster.py.

Each test starts a real Ray head with ``ray start`` (as a user starts a cluster), from the
environment that is *not* the stage's, on loopback ports, in a session of its own, with
token authentication as Ray 2.60's ``ray start`` uses it; the head's process group is
ended afterwards (never ``ray stop``, which would end every cluster on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import INSTRUCTION, free_port
from netns_cluster import start_ray_node

from workflow.core import envs

pytestmark = pytest.mark.heavy  # each test starts a Ray head

REMEMBERED = Path("/tmp/ray/ray_current_cluster")  # where `ray start --head` records its address


@dataclass
class Head:
    address: str
    proc: subprocess.Popen
    log: Path


def start_node(env: str, args: list[str], log: Path, address: str) -> Head:
    """``ray start --block ARGS`` from ``env``'s Ray, in a session of its own, once it says it started."""
    ray = Path(envs.python_for(env)).parent / "ray"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = start_ray_node([str(ray), "start", "--block", "--disable-usage-stats", *args],
                          {**environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}, log,
                          stop=lambda started: stop_head(Head(address, started, log)))
    return Head(address, proc, log)


def start_head(env: str, tmp_path: Path, *, num_cpus: int, temp_dir: Path | None) -> Head:
    """``ray start --head`` from ``env``'s Ray; ``temp_dir`` None keeps Ray's default (it records itself)."""
    port = free_port()
    args = ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
            "--include-dashboard=false", f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}"]
    if temp_dir is not None:
        args.append(f"--temp-dir={temp_dir}")
    return start_node(env, args, tmp_path / f"head-{port}.log", f"127.0.0.1:{port}")


def stop_head(head: Head) -> None:
    """End a node: SIGTERM to ``ray start`` alone (it ends its processes; a SIGTERM to the whole group
    would stop the GCS while the node drains through it, which then waits out Ray's 30 s limit),
    then SIGKILL to whatever of its process group is left."""
    try:
        head.proc.send_signal(signal.SIGTERM)
        head.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.proc.wait(timeout=30)


def python(env: str, script: str, extra_env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in envs.stage_environment(env).items() if not k.startswith("RAY_")}
    return subprocess.run([envs.python_for(env), "-c", textwrap.dedent(script)], env={**environ, **extra_env},
                          capture_output=True, text=True, timeout=timeout, check=False)


GCS_ADDRESS = """
    import ray
    {init}
    print("GCS", ray.get_runtime_context().gcs_address)
    ray.shutdown()
"""


def gcs_port(init: str, extra_env: dict[str, str]) -> str:
    """The GCS port of the cluster a fresh serve-env process joins with ``init``.

    Ports, not addresses: Ray records and reports a head started on 127.0.0.1 under the
    machine's own IP too.
    """
    proc = python(envs.SERVE, GCS_ADDRESS.format(init=init), extra_env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GCS ")).rsplit(":", 1)[1]


def test_without_an_address_a_stage_starts_its_own_ray_not_the_one_ray_remembers(tmp_path):
    saved = REMEMBERED.read_text() if REMEMBERED.exists() else None
    ours = "from workflow.core.ray_cluster import init_ray; init_ray(log_to_driver=False)"
    try:
        head = start_head(envs.TRAIN, tmp_path, num_cpus=1, temp_dir=None)
        try:
            port = head.address.rsplit(":", 1)[1]
            assert REMEMBERED.read_text().strip().endswith(f":{port}")  # Ray remembers this cluster
            # A plain ray.init() joins it (another project's cluster, say)...
            assert gcs_port("ray.init()", {"RAY_AUTH_MODE": "token"}) == port
            # ...a stage does not.
            assert gcs_port(ours, {}) != port
        finally:
            stop_head(head)
        # The remembered cluster is gone (killed without `ray stop`): a stage still runs.
        assert REMEMBERED.read_text().strip().endswith(f":{port}")
        assert gcs_port(ours, {}) != port
    finally:
        if saved is None:
            REMEMBERED.unlink(missing_ok=True)
        else:
            REMEMBERED.write_text(saved)


def batch_on(head: Head, recipe: Path, source: Path, dest: Path) -> subprocess.CompletedProcess:
    """``workflow batch RECIPE --address <head>`` with token authentication, as a user runs it."""
    environ = {k: v for k, v in envs.stage_environment(envs.SERVE).items() if not k.startswith("RAY_")}
    return subprocess.run([envs.python_for(envs.SERVE), "-m", "workflow.cli", "batch", str(recipe), "--address",
                           head.address, "--input", str(source), "--output", str(dest)],
                          env={**environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=900,
                          check=False)


def test_batch_engine_runs_the_serve_environment_on_a_cluster_started_from_the_train_environment(
        make_run, tmp_path):
    """``workflow batch --address``: the cluster's default Python (the train env) has no vLLM."""
    recipe = make_run("batch-on-cluster", evaluate={"sampling_params": {"temperature": 0.0, "max_tokens": 8}})
    rows = [{"instruction": INSTRUCTION, "input": s} for s in ("Do you like Tetris?", "Portal 2 is great.")]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = start_head(envs.TRAIN, tmp_path, num_cpus=2, temp_dir=Path(f"/tmp/wf-ray-{free_port()}"))
    try:
        proc = batch_on(head, recipe, source, tmp_path / "out.jsonl")
    finally:
        stop_head(head)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 2 and all(r["generated_text"] and not r["error"] for r in out)


def test_a_cluster_whose_nodes_all_run_on_this_machine_may_serve_a_run_in_a_local_folder(tmp_path):
    """A workstation's `ray start --head`: the serve stage's check passes a run in a local folder (its replicas
    read the model and adapters where they are); a node at another address (TEST-NET-1, no machine's here) is
    another machine, as each node of the namespace cluster is (its own address and mounts)."""
    import shutil

    temp_dir = Path(f"/tmp/wf-ray-{free_port()}")  # short: Ray's socket paths must fit 107 bytes
    head = start_head(envs.SERVE, tmp_path, num_cpus=1, temp_dir=temp_dir)
    try:
        proc = python(envs.SERVE, f"""
            import types
            import ray
            from workflow.core import ray_cluster
            from workflow.stages.serve import _check_cluster_on_this_machine

            _check_cluster_on_this_machine(types.SimpleNamespace(run_uri="/runs/r"), "{head.address}")
            ray.init(address="{head.address}", log_to_driver=False)
            nodes = [n for n in ray.nodes() if n["Alive"]]
            ray.shutdown()
            print("NODES", [n["NodeManagerAddress"] for n in nodes])
            print("OFF", ray_cluster.nodes_off_this_machine(nodes + [{{"NodeManagerAddress": "192.0.2.7"}}]))
        """, {"RAY_AUTH_MODE": "token"}, timeout=300)
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("NODES ", "OFF ")))
    assert len(json.loads(lines["NODES"].replace("'", '"'))) == 1
    assert lines["OFF"] == "['192.0.2.7']"
