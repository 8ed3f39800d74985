"""The serving Ray cluster: a cluster that outlives its launcher, and how it is ended.

``start_cluster`` runs ``ray start --head --block`` on loopback ports in a new session (its
own process group) and records it in a state dict that the serve stage keeps in a local state
file; ``connect`` joins it with token authentication. ``stop_cluster`` shuts Serve down
(applications, replicas, proxy) and then ends that one cluster by its process group, and then
any process still carrying the cluster's marker variable (Ray workers and vLLM's engine
processes can sit in other groups): never ``ray stop``, which would end every Ray cluster of
the user on the machine.

Ray and psutil are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..core.console import say
from ..core.errors import WorkflowError
from ..core.secrets import redact
from ..patches import ray_token_auth

# Set in the environment of every process of a serving cluster, to its address.
CLUSTER_MARKER = "WORKFLOW_SERVE_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_executable() -> str:
    return str(Path(sys.executable).parent / "ray")


def start_cluster(state_dir: Path, *, num_cpus: int, env_vars: dict[str, str],
                  withheld: tuple[str, ...] = ()) -> dict[str, Any]:
    """Start a one-node Ray cluster on loopback ports in its own process group; return its state.

    ``env_vars`` are added to the cluster's environment, which every worker (the Serve
    replicas) inherits: that is how AWS_ENDPOINT_URL and the API key reach them without
    appearing in any Ray config. ``withheld`` names variables of this process the cluster
    does not get.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    gcs_port = free_port()
    # Ray puts unix sockets under the temp dir; keep its path short (108-byte limit). A new folder of this
    # user's (mode 0700), under RAY_TMPDIR where set: never one that someone else could have made first.
    temp_dir = Path(tempfile.mkdtemp(prefix=f"wf-ray-{gcs_port}-", dir=os.environ.get("RAY_TMPDIR") or "/tmp"))
    log = open(state_dir / "ray-head.log", "w")  # noqa: SIM115 - the cluster writes to it after we exit
    cmd = [_ray_executable(), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--num-cpus={num_cpus}",
           "--include-dashboard=false", f"--temp-dir={temp_dir}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}"]
    state = {"address": f"127.0.0.1:{gcs_port}", "temp_dir": str(temp_dir), "log": str(state_dir / "ray-head.log")}
    # Token authentication, with Ray's per-user token (~/.ray/auth_token, made if missing);
    # CLUSTER_MARKER tags every process of this cluster (workers inherit the environment).
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM, `ray start` would first ask the GCS to drain
    # its node and wait up to 30 s for it to go idle, for replicas to move elsewhere; a one-node cluster
    # that is being ended has nowhere to move them (Serve has already been shut down by then).
    env = {**os.environ, **env_vars, "RAY_AUTH_MODE": "token", CLUSTER_MARKER: state["address"],
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", *withheld):
        env.pop(name, None)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state["pid"] = proc.pid
    # The GCS port opens before the node registers; `ray start` says when the node is up.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WorkflowError(f"the Ray head node exited at start (code {proc.returncode}); see {state['log']}")
        if "Ray runtime started" in Path(state["log"]).read_text(errors="replace"):
            return state
        time.sleep(1)
    stop_cluster(state)
    raise WorkflowError(f"the Ray head node did not start within 300 s; see {state['log']}")


def connect(state: dict[str, Any]) -> None:
    import ray

    if not ray.is_initialized():
        ray_token_auth.use_token_auth()  # Ray read RAY_AUTH_MODE when first imported: set, and re-read
        ray.init(address=state["address"], include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, namespace="workflow")


def cluster_alive(state: dict[str, Any]) -> bool:
    # When this process started the cluster, the head is its child: reap it once it has exited,
    # or the zombie keeps its process group "alive" through both waits of stop_cluster.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(state["pid"], os.WNOHANG)
    try:
        os.killpg(state["pid"], 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_cluster(state: dict[str, Any], *, timeout_s: float = 60) -> None:
    """Shut Serve down, then end the cluster's process group (only the one we started), then
    whatever of the cluster outlived the group."""
    known = cluster_processes(state["address"])
    if cluster_alive(state):
        try:
            connect(state)
            from ray import serve

            serve.shutdown()
        except Exception as err:  # noqa: BLE001 - a half-dead cluster is ended below anyway
            say(f"[serve] Serve shutdown: {type(err).__name__}: {redact(str(err))[:200]}")
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # SIGTERM to `ray start --block` alone first: it drains the node through the GCS and ends its
    # processes itself; a SIGTERM to the whole group also stops the GCS mid-drain, and the drain
    # request then waits out Ray's 30 s limit. Then the group, then SIGKILL.
    for sig, kill in ((signal.SIGTERM, os.kill), (signal.SIGTERM, os.killpg), (signal.SIGKILL, os.killpg)):
        if not cluster_alive(state):
            break
        with contextlib.suppress(ProcessLookupError):
            kill(state["pid"], sig)
        deadline = time.monotonic() + timeout_s / 3
        while cluster_alive(state) and time.monotonic() < deadline:
            time.sleep(0.5)
    _end_leftovers(known + cluster_processes(state["address"]), timeout_s=timeout_s)


def cluster_processes(address: str) -> list:
    """The cluster's processes (psutil.Process): those carrying its marker variable, and their
    descendants (a child may be started with an environment of its own)."""
    import psutil

    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(CLUSTER_MARKER) == address:
                found[proc.pid] = proc
                found.update((child.pid, child) for child in proc.children(recursive=True))
        except psutil.Error:  # gone, or another user's
            continue
    return list(found.values())


def _end_leftovers(procs: list, *, timeout_s: float) -> None:
    """End what outlived the process group. Ray puts its workers in groups of their own, and
    after the head's group is gone the Serve controller, the replicas and vLLM's engine core
    and CPU worker (the replica's children) keep running, holding the model's memory and cores."""
    import psutil

    left = list({p.pid: p for p in procs if p.is_running()}.values())  # is_running: False if the pid was reused
    if not left:
        return
    print(f"[serve] ending {len(left)} process(es) the cluster left behind: "
          f"{', '.join(sorted({_title(p) for p in left}))}")
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=timeout_s / 2)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def _title(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())[:60].strip() or proc.name()
    except psutil.Error:
        return str(proc.pid)
