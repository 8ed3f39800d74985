"""How a stage joins Ray: the cluster that ``RAY_ADDRESS`` names, else a private local one.

- Without ``RAY_ADDRESS`` a stage starts a local cluster of its own (``address="local"``) and
  shuts it down at the end. A plain ``ray.init()`` would instead join whatever cluster an
  earlier ``ray start --head`` on the machine recorded in ``/tmp/ray/ray_current_cluster``
  (another project's, or a dead one: then the stage fails to connect).
- With ``RAY_ADDRESS`` (``workflow run --address ...``, or exported) every stage joins that
  cluster, and every Ray task, actor and train worker it starts runs the stage's own
  interpreter (``runtime_env.py_executable``): the train stage's workers import LLaMA-Factory
  from the train environment and the evaluate stage's actors import vLLM from the serve
  environment, whichever interpreter started the cluster's nodes. That is the cluster
  contract (docs/cluster.md, "The cluster contract"): every node has the stage's environment at
  the same path, with the same Ray and Python versions as the driver. ``check_nodes`` checks
  it on every node before the stage starts anything there (a worker whose interpreter is
  missing would otherwise leave Ray retrying its start forever). Run storage must be a bucket
  (``s3://``, ``gs://``): a stage that joins a cluster of several nodes with storage in a local
  folder stops at once, since the other nodes cannot read it.

Ray is imported inside the functions: the CLI imports this package in either environment.
"""

from __future__ import annotations

import os
import sys

from . import storage
from .errors import WorkflowError

ADDRESS_ENV = "RAY_ADDRESS"
CONTRACT_HINT = ("every node needs the stage's environment at the same path, with the driver's Ray and Python "
                 "(`make setup` in the same folder on each node, or nodes started from the containerfile image; "
                 "docs/cluster.md: The cluster contract)")


def init_ray(*, log_to_driver: bool, storage_uri: str | None = None, needs: tuple[str, ...] = (),
             setup_hook: str | None = None, local_setup_hook: str | None = None) -> bool:
    """Join or start Ray (see the module doc); True if this call did, so the caller shuts it down.

    ``storage_uri``: the run's storage, which every node must reach (checked on a cluster of several nodes).
    ``needs``: modules the stage's Ray workers import (e.g. ``("vllm",)``), checked on every node of a cluster.
    ``setup_hook`` (on a cluster) and ``local_setup_hook`` (on the private one): a function
    (``module.name``) every worker process of the stage runs first (Ray takes
    ``worker_process_setup_hook`` only in the job's runtime_env).
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get(ADDRESS_ENV)
    if not address:
        # The private cluster's one node is this machine, which no cloud preempts: Ray Train's preemption
        # watcher (an actor restarted forever) has nothing to watch, and Ray core logs an error about it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address="local", include_dashboard=False, log_to_driver=log_to_driver,
                 runtime_env={"worker_process_setup_hook": local_setup_hook} if local_setup_hook else None)
        return True
    # First with the cluster's own interpreter, which runs the check; then with the stage's.
    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if storage_uri is not None and storage.is_local(storage_uri) and len(nodes) > 1:
            raise WorkflowError(f"storage {storage_uri} is a folder on this machine, which the other nodes of the "
                                f"cluster at {address} ({len(nodes)} nodes) cannot read",
                                hint="set the recipe's storage (or WORKFLOW_STORAGE) to s3://... or gs://...")
        check_nodes(nodes, address, needs=("workflow", *needs))
    finally:
        ray.shutdown()
    runtime_env = {"py_executable": sys.executable}
    if setup_hook is not None:
        runtime_env["worker_process_setup_hook"] = setup_hook
    ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env)
    return True


# Run on a node by the cluster's default interpreter, with this process's interpreter: its versions and
# which of the modules named on its command line it cannot import.
_PROBE = ("import importlib.util, json, sys, ray; print(json.dumps({'ray': ray.__version__, 'python': "
          "'%d.%d' % sys.version_info[:2], 'missing': [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]}))")


def _probe_node(python: str, needs: tuple[str, ...], want_ray: str, want_python: str) -> str | None:
    """What this node lacks of the driver's environment, in words, or None."""
    import json
    import subprocess

    if not os.access(python, os.X_OK):
        return f"it has no interpreter at {python}"
    proc = subprocess.run([python, "-c", _PROBE, *needs], capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        return f"{python} fails to import ray there: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    if (found["ray"], found["python"]) != (want_ray, want_python):
        return (f"{python} there has Ray {found['ray']} and Python {found['python']}, "
                f"the driver Ray {want_ray} and Python {want_python}")
    if found["missing"]:
        return f"{python} there cannot import {', '.join(found['missing'])}"
    return None


def check_nodes(nodes: list[dict], address: str, *, needs: tuple[str, ...]) -> None:
    """One line naming the first node that cannot run this stage's workers, and what it lacks."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    want = (ray.__version__, "{}.{}".format(*sys.version_info[:2]))
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    pending = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(sys.executable, needs, *want): n["NodeManagerAddress"] for n in nodes}
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=300)
    problems = sorted([(pending[ref], ray.get(ref)) for ref in ready] +
                      [(pending[ref], "it did not answer within 300 s") for ref in late])
    problems = [(ip, found) for ip, found in problems if found]
    if problems:
        ip, found = problems[0]
        others = f" (and {len(problems) - 1} more node(s))" if len(problems) > 1 else ""
        raise WorkflowError(f"node {ip} of the cluster at {address} cannot run this stage's workers: {found}{others}",
                            hint=CONTRACT_HINT)


def nodes_off_this_machine(nodes: list[dict]) -> list[str]:
    """The addresses (``NodeManagerAddress``) of ``nodes`` that are not this machine's: neither loopback nor an
    address of one of its network interfaces. A node in a network namespace of its own has its own address (and
    its own mounts), so it counts as another machine."""
    import ipaddress

    import psutil

    own = {a.address.split("%")[0] for addresses in psutil.net_if_addrs().values() for a in addresses}
    off = []
    for node in nodes:
        ip = node["NodeManagerAddress"]
        try:
            loopback = ipaddress.ip_address(ip).is_loopback
        except ValueError:  # a host name
            loopback = False
        if not loopback and ip not in own:
            off.append(ip)
    return off
