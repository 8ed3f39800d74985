"""A Ray cluster of several nodes on this one machine, each worker node a host of its own.

``namespace_cluster(tmp_path)`` starts, as a user starts a cluster, a head with ``ray start
--head`` in the root network namespace (0 CPUs: the driver's machine) and worker nodes with
``ray start --address``, each in its own network namespace (its own IP on a Linux bridge) and
its own mount namespace: a tmpfs over ``/tmp`` and one over the home folder, so nothing the
driver writes there (``/tmp/workflow-cache``, ``~/.cache``, the Hugging Face cache) is seen on
a worker node, as on a real cluster. Needs root, ``ip`` (iproute2) and ``unshare``.

What a worker node keeps of this machine: every path outside ``/tmp`` and the home folder (the
repository and the environments under ``.venvs``), and, bound back into its empty home, the
environments' base interpreters when they live there (pyenv and uv install them under
``~/.pyenv`` or ``~/.local``). Environments or a repository under ``/tmp`` would be hidden:
the helper skips the test then. Ray's token (``~/.ray/auth_token``, which ``ray start --head``
writes with ``RAY_AUTH_MODE=token``) is copied into each node's own home, as a user copies it
to each host; it never travels in an environment variable or a command line.

An S3-compatible server (moto) listens on the bridge, so every node reaches it, and every node
gets ``aws_env`` pointing at it. Teardown always runs: it ends every process in each worker
node's namespace and the head's process group (never ``ray stop``, which ends every cluster on
the machine), then deletes the namespaces, interfaces and the bridge. Names start with
``wfc<pid><letter>``; leftovers of a run whose process is gone are removed at the next start.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port

from workflow.core import envs

PREFIX = "wfc"  # bridge wfc<pid><l>b, veths wfc<pid><l>h<k> / n<k>, namespaces wfc<pid><l>-<node>
MARKER = "WORKFLOW_NETNS_CLUSTER"  # set in every node's environment: finds a node's processes
# Ray gives a starting node's raylet 30 s to register (ray/_private/node.py); a loaded 2-core
# machine can miss that, and `ray start` then exits: such a start is tried again.
STARTUP_TIMED_OUT = "timed out during startup"
_live: set[str] = set()  # ids of this process's clusters that are up


@dataclass
class Node:
    """One Ray node: the head (``netns`` None, root namespace) or a worker node."""

    name: str
    ip: str
    netns: str | None
    cpus: int
    proc: subprocess.Popen | None
    log: Path
    index: int = 1  # last byte of the IP; names the node's veth pair


@dataclass
class NamespaceCluster:
    id: str
    subnet: str  # "198.18.X": nodes are <subnet>.1 (head, bridge), .2, .3, ...
    address: str
    head: Node
    temp_dir: Path  # the head's --temp-dir
    s3_endpoint: str
    aws_env: dict[str, str]
    node_env: dict[str, str]  # every node's environment
    tmp_path: Path
    nodes: list[Node] = field(default_factory=list)  # the worker nodes
    _next_index: int = 2
    head_argv: list[str] = field(default_factory=list)  # the head's `ray start`, for start_head
    head_env: dict[str, str] = field(default_factory=dict)  # the head's environment (node_env + head_env)

    def make_bucket(self, name: str) -> str:
        """Create a bucket on the cluster's S3 server; returns ``s3://name``."""
        import boto3

        boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=self.aws_env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=self.aws_env["AWS_SECRET_ACCESS_KEY"],
                     region_name=self.aws_env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)
        return f"s3://{name}"

    def driver_env(self, **extra: str) -> dict[str, str]:
        """Environment for a driver in the root namespace: the serve env's, ``RAY_ADDRESS``, token auth, ``aws_env``."""
        environ = {k: v for k, v in envs.stage_environment(envs.SERVE).items() if not k.startswith("RAY_")}
        return {**environ, **self.aws_env, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", **extra}

    def add_node(self, name: str, *, hide: list[str] | tuple[str, ...] = (), cpus: int = 4) -> Node:
        """Start one more worker node; ``hide`` paths are covered by an empty tmpfs on it (e.g. an environment)."""
        node = self._start_node(name, hide, cpus)
        self.wait_for_nodes()
        return node

    def _start_node(self, name: str, hide: list[str] | tuple[str, ...], cpus: int) -> Node:
        index, self._next_index = self._next_index, self._next_index + 1
        node = Node(name, f"{self.subnet}.{index}", f"{self.id}-{name}", cpus, None,
                    self.tmp_path / f"node-{name}.log", index)
        host_veth, ns_veth = f"{self.id}h{index}", f"{self.id}n{index}"
        _ip("netns", "add", node.netns)
        self.nodes.append(node)  # from here on, teardown knows it
        _ip("link", "add", host_veth, "type", "veth", "peer", "name", ns_veth)
        _ip("link", "set", host_veth, "master", f"{self.id}b")
        _ip("link", "set", host_veth, "up")
        _ip("link", "set", ns_veth, "netns", node.netns)
        for args in (("addr", "add", f"{node.ip}/24", "dev", ns_veth), ("link", "set", ns_veth, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", node.netns, "ip", *args)
        ray = Path(envs.python_for(envs.SERVE)).parent / "ray"
        start = [str(ray), "start", "--block", "--disable-usage-stats", f"--address={self.address}",
                 f"--node-ip-address={node.ip}", f"--num-cpus={cpus}"]
        script = _node_script(start, hide)
        argv = ["ip", "netns", "exec", node.netns, "unshare", "--mount", "--propagation", "private",
                "bash", "-c", script]
        node.proc = start_ray_node(argv, self.node_env, node.log, stop=lambda _: _kill_netns(node.netns))
        return node

    def remove_node(self, node: Node) -> None:
        """End a worker node: every process in its namespace, then the namespace and its veth pair."""
        _remove_node(self, node)
        self.nodes.remove(node)
        self.wait_for_nodes()

    def kill_node(self, node: Node) -> None:
        """Lose a worker node at once, as a host that goes away: SIGKILL to every process in its namespace
        together (raylet, object store, workers; no drain), then its namespace and veth pair removed. The head
        learns of it when its health checks of the node fail."""
        while pids := _netns_pids(node.netns):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        _remove_node(self, node)
        self.nodes.remove(node)

    def kill_head(self) -> None:
        """Lose the head at once: SIGKILL to every process of this cluster in the root network namespace
        (``ray start``, GCS, raylet, the workers there: Serve's controller and proxy), none in a worker node's."""
        root = os.readlink("/proc/self/ns/net")
        while pids := [p for p in _marked_pids(self.id) if _net_ns(p) == root]:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        if self.head.proc is not None:
            self.head.proc.wait(timeout=30)

    def start_head(self) -> None:
        """Start the head again as it was started (same address, ports, temp dir, environment), as a
        supervisor restarts it; returns once its ``ray start`` says the runtime started.

        ``<temp_dir>/ray_current_cluster`` is removed first: the worker nodes' raylets, in this machine's
        process table with ``--gcs-address=<the head>``, would make ``ray start --head`` refuse the address
        as "already running" (on hosts of their own they are not seen)."""
        (self.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        self.head.log = self.tmp_path / f"node-head-{time.strftime('%H%M%S')}.log"
        self.head.proc = start_ray_node(self.head_argv, self.head_env, self.head.log, stop=_kill_group)

    def run_in(self, node: Node, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """``argv`` in ``node``'s network namespace (this machine's files): a client on another host."""
        return subprocess.run(["ip", "netns", "exec", node.netns, *argv], **kwargs)

    def wait_for_nodes(self, timeout: float = 180) -> None:
        """Until the head counts the head and every worker node alive (and no more)."""
        want = 1 + len(self.nodes)
        script = textwrap.dedent("""
            import sys, time, ray
            ray.init(log_to_driver=False, logging_level="ERROR")
            want, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
            while (alive := sum(n["Alive"] for n in ray.nodes())) != want and time.monotonic() < deadline:
                time.sleep(0.5)
            print("ALIVE", alive)
        """)
        proc = subprocess.run([envs.python_for(envs.SERVE), "-c", script, str(want), str(timeout)],
                              env=self.driver_env(), capture_output=True, text=True, timeout=timeout + 120)
        alive = [line for line in proc.stdout.splitlines() if line.startswith("ALIVE ")]
        if proc.returncode != 0 or alive != [f"ALIVE {want}"]:
            pytest.fail(f"the cluster has not {want} nodes alive: {alive} {proc.stderr[-2000:]}")


@contextlib.contextmanager
def namespace_cluster(tmp_path: Path, *, workers: int = 2, worker_cpus: int = 4,
                      env: dict[str, str] | None = None,
                      head_env: dict[str, str] | None = None) -> Iterator[NamespaceCluster]:
    """A head (0 CPUs) and ``workers`` worker nodes of ``worker_cpus`` CPUs each; removed on exit, whatever happens.

    ``env`` is added to every node's environment (after ``os.environ`` without ``RAY_*``
    variables, and ``aws_env``); ``head_env`` to the head's only (e.g. the GCS's storage backend:
    ``RAY_gcs_storage``, ``RAY_gcs_storage_path``).
    """
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("a cluster of namespaces needs root, ip and unshare")
    under_tmp = [p for p in _needed_paths() if p == Path("/tmp") or Path("/tmp") in p.parents]
    if under_tmp:
        pytest.skip(f"{under_tmp[0]} is under /tmp, which a worker node's own /tmp hides")
    _remove_stale()
    cluster_id = f"{PREFIX}{os.getpid()}{_free_letter()}"
    _live.add(cluster_id)
    subnet = _free_subnet()
    bridge_ip = f"{subnet}.1"
    head_port = free_port()
    temp_dir = Path(f"/tmp/wf-ray-{head_port}")
    aws_env = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
               "AWS_DEFAULT_REGION": "us-east-1"}
    node_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    head = Node("head", bridge_ip, None, 0, None, tmp_path / "node-head.log")
    cluster = NamespaceCluster(cluster_id, subnet, f"{bridge_ip}:{head_port}", head, temp_dir, "", aws_env,
                               node_env, tmp_path)
    moto = None
    try:
        _ip("link", "add", f"{cluster_id}b", "type", "bridge")
        _ip("addr", "add", f"{bridge_ip}/24", "dev", f"{cluster_id}b")
        _ip("link", "set", f"{cluster_id}b", "up")
        from moto.server import ThreadedMotoServer

        s3_port = free_port()
        moto = ThreadedMotoServer(ip_address=bridge_ip, port=s3_port, verbose=False)
        moto.start()
        cluster.s3_endpoint = aws_env["AWS_ENDPOINT_URL"] = f"http://{bridge_ip}:{s3_port}"
        node_env.update(aws_env)
        node_env.update(env or {})
        node_env.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", MARKER: cluster_id})
        ray = Path(envs.python_for(envs.SERVE)).parent / "ray"
        if not (Path.home() / ".ray" / "auth_token").exists():  # `ray start --head` reads it, never writes it
            subprocess.run([str(ray), "get-auth-token", "--generate"], env=node_env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True, timeout=120)
        ports = ("node-manager", "object-manager", "ray-client-server", "metrics-export", "dashboard-agent-listen",
                 "dashboard-agent-grpc", "runtime-env-agent")
        argv = [str(ray), "start", "--head", "--block", "--disable-usage-stats", f"--node-ip-address={bridge_ip}",
                f"--port={head_port}", "--num-cpus=0", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                *(f"--{name}-port={free_port()}" for name in ports)]
        cluster.head_argv, cluster.head_env = argv, {**node_env, **(head_env or {})}
        head.proc = start_ray_node(argv, cluster.head_env, head.log, stop=_kill_group)
        for i in range(workers):
            cluster._start_node(f"w{i + 1}", (), worker_cpus)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        steps = [lambda node=node: _remove_node(cluster, node) for node in cluster.nodes]
        steps += [lambda: head.proc and _kill_group(head.proc), lambda: _kill_marked(cluster_id),
                  lambda: moto and moto.stop(), lambda: _remove_leftovers(cluster_id)]
        errors = []
        for step in steps:  # each step runs, whatever the one before did
            try:
                step()
            except Exception as error:
                errors.append(error)
        shutil.rmtree(temp_dir, ignore_errors=True)
        _live.discard(cluster_id)
        if errors:
            raise errors[0]


def leftovers(cluster_id: str, temp_dir: Path | None = None) -> list[str]:
    """What is left of a cluster: namespaces, interfaces, mounts and processes (empty after teardown)."""
    found = [f"netns {n}" for n in _netns_names() if n.startswith(cluster_id)]
    found += [f"link {n}" for n in _link_names() if n.startswith(cluster_id)]
    found += [f"mount {line}" for line in Path("/proc/self/mounts").read_text().splitlines() if cluster_id in line]
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:  # not a process, or gone already
            continue
        if f"{MARKER}={cluster_id}".encode() in environ or (temp_dir and str(temp_dir).encode() in cmdline):
            found.append(f"process {proc.name}: {cmdline[:150]!r}")
    return found


# ---------------------------------------------------------------- starting

def _node_script(start: list[str], hide: list[str] | tuple[str, ...]) -> str:
    """The shell lines a worker node runs in its own mount namespace before ``exec ray start``.

    A tmpfs over ``/tmp``; the real home bound aside, a tmpfs over the home, the paths the
    environments need bound back from the real one, Ray's token copied; then ``hide``.
    """
    home = Path.home()
    keep = sorted({p.relative_to(home) for p in _needed_paths() if home in p.parents})
    keep = [p for p in keep if not any(q in p.parents for q in keep)]
    q = shlex.quote
    lines = ["set -e", "mount -t tmpfs tmpfs /tmp", "mkdir /tmp/.host-home", f"mount --bind {q(str(home))} /tmp/.host-home",
             f"mount -t tmpfs tmpfs {q(str(home))}"]
    for rel in keep:
        lines += [f"mkdir -p {q(str(home / rel))}", f"mount --bind {q(f'/tmp/.host-home/{rel}')} {q(str(home / rel))}"]
    lines += [f"mkdir -p {q(str(home / '.ray'))}",
              f"install -m 600 /tmp/.host-home/.ray/auth_token {q(str(home / '.ray' / 'auth_token'))}",
              "umount /tmp/.host-home", "rmdir /tmp/.host-home"]
    lines += [f"mount -t tmpfs tmpfs {q(str(path))}" for path in hide]
    lines.append("exec " + shlex.join(start))
    return "\n".join(lines)


def _needed_paths() -> list[Path]:
    """The repository, each environment and its base interpreter's prefix (what a node's Python needs)."""
    paths = [envs.REPO_ROOT]
    for env in (envs.SERVE, envs.TRAIN):
        try:
            python = Path(envs.python_for(env))
        except Exception:  # an environment that is not there is not needed
            continue
        paths += [python.parent.parent.absolute(), python.resolve().parents[1]]
    return paths


def start_ray_node(argv: list[str], environ: dict[str, str], log: Path, stop) -> subprocess.Popen:
    """``argv`` (a ``ray start --block``) in a session of its own, once its log says it started; up to 3 tries
    (``stop(proc)`` ends a start that failed). Also the start of tests/core/test_ray_cluster.py's nodes."""
    for _ in range(3):
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=environ, start_new_session=True)
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                if STARTUP_TIMED_OUT in log.read_text(errors="replace"):
                    break
                pytest.fail(f"the Ray node did not start ({log}): {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        else:
            return proc
    pytest.fail(f"the Ray node did not start in 3 tries ({log}): {log.read_text(errors='replace')[-2000:]}")


# ---------------------------------------------------------------- ending

def _remove_node(cluster: NamespaceCluster, node: Node) -> None:
    if node.proc is not None:
        _end(node.proc)
    _kill_netns(node.netns)
    if f"{cluster.id}h{node.index}" in _link_names():
        _ip("link", "del", f"{cluster.id}h{node.index}")
    if node.netns in _netns_names():
        _ip("netns", "del", node.netns)


def _end(proc: subprocess.Popen, timeout: float = 40) -> None:
    """SIGTERM one process and wait for it; SIGKILL after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def _kill_netns(netns: str) -> None:
    """SIGTERM every process in a network namespace, SIGKILL what is left after 20 s; until none is left."""
    deadline = time.monotonic() + 20
    sig = signal.SIGTERM
    while pids := _netns_pids(netns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(0.3)
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        if time.monotonic() > deadline + 60:
            raise RuntimeError(f"processes in {netns} do not end: {pids}")


def _kill_group(proc: subprocess.Popen) -> None:
    """End a node's process group (started with ``start_new_session``): its ``ray start`` first, then the rest.

    ``ray start --block`` ends its node on SIGTERM, after asking the GCS to drain it. A SIGTERM
    to the whole group would end the GCS too, and the head's drain request would wait out its
    30 s timeout (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``).
    """
    _end(proc)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue


def _kill_marked(cluster_id: str) -> None:
    """SIGKILL what is left of a cluster's processes (Ray may start workers in process groups of their own)."""
    deadline = time.monotonic() + 60
    while pids := [int(p.split()[1].rstrip(":")) for p in leftovers(cluster_id) if p.startswith("process ")]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {cluster_id} do not end: {pids}")


def _marked_pids(cluster_id: str) -> list[int]:
    return [int(p.split()[1].rstrip(":")) for p in leftovers(cluster_id) if p.startswith("process ")]


def _net_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:  # gone already
        return None


def _remove_leftovers(cluster_id: str) -> None:
    """Everything named for ``cluster_id``: namespaces (their processes first), interfaces."""
    for netns in _netns_names():
        if netns.startswith(cluster_id):
            _kill_netns(netns)
            _ip("netns", "del", netns, check=False)
    _kill_marked(cluster_id)
    for link in _link_names():
        if link.startswith(cluster_id):
            _ip("link", "del", link, check=False)


def _remove_stale() -> None:
    """Leftovers of clusters whose process is gone (a crashed run), or of this process's ended ones."""
    ids = {m.group(0) for name in _netns_names() + _link_names() if (m := re.match(rf"{PREFIX}(\d+)[a-z]", name))}
    for cluster_id in ids:
        pid = int(re.match(rf"{PREFIX}(\d+)", cluster_id).group(1))
        if not Path(f"/proc/{pid}").exists() or (pid == os.getpid() and cluster_id not in _live):
            _remove_leftovers(cluster_id)


# ---------------------------------------------------------------- names and addresses

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _link_names() -> list[str]:
    return [line.split(": ")[1].split("@")[0] for line in _ip("-o", "link").stdout.splitlines()]


def _netns_pids(netns: str) -> list[int]:
    proc = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _free_letter() -> str:
    taken = set(_live) | {n[:len(PREFIX) + len(str(os.getpid())) + 1] for n in _netns_names() + _link_names()}
    return next(c for c in "abcdefghijklmnopqrstuvwxyz" if f"{PREFIX}{os.getpid()}{c}" not in taken)


def _free_subnet() -> str:
    """A random 198.18.X or 198.19.X (the benchmarking range, RFC 2544) that no interface or route uses."""
    used = _ip("-o", "-4", "addr").stdout + _ip("-4", "route").stdout
    while True:
        subnet = f"198.{random.choice((18, 19))}.{random.randrange(256)}"
        if f"{subnet}." not in used:
            return subnet
