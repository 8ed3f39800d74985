"""How a stage joins Ray: the cluster that ``RAY_ADDRESS`` names, else a private local one.

- Without ``RAY_ADDRESS`` a stage starts a local cluster of its own (``address="local"``) and
  shuts it down at the end. A plain ``ray.init()`` would instead join whatever cluster an
  earlier ``ray start --head`` on the machine recorded in ``/tmp/ray/ray_current_cluster``
  (another project's, or a dead one: then the stage fails to connect).
- With ``RAY_ADDRESS`` (``workflow run --address ...``, or exported) every stage joins that
  cluster, and every Ray task, actor and train worker it starts runs the stage's own
  interpreter (``runtime_env.py_executable``): the train stage's workers import LLaMA-Factory
  from the train environment and the evaluate stage's actors import vLLM from the serve
  environment, whichever interpreter started the cluster's nodes. The environments must
  therefore be at the same path on every node (``make setup`` in the same folder, or the
  containerfile image). Run storage must be a bucket (``s3://``, ``gs://``): a stage that joins a
  cluster of several nodes with storage in a local folder stops at once, since the other nodes
  cannot read it.

Ray is imported inside the function: the CLI imports this package in either environment.
"""

from __future__ import annotations

import os
import sys

from . import storage
from .errors import WorkflowError

ADDRESS_ENV = "RAY_ADDRESS"


def init_ray(*, log_to_driver: bool, storage_uri: str | None = None) -> bool:
    """Join or start Ray (see the module doc); True if this call did, so the caller shuts it down.

    ``storage_uri``: the run's storage, which every node must reach (checked on a cluster of several nodes).
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get(ADDRESS_ENV)
    if not address:
        ray.init(address="local", include_dashboard=False, log_to_driver=log_to_driver)
        return True
    ray.init(address=address, log_to_driver=log_to_driver, runtime_env={"py_executable": sys.executable})
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if storage_uri is not None and storage.is_local(storage_uri) and len(nodes) > 1:
        ray.shutdown()
        raise WorkflowError(f"storage {storage_uri} is a folder on this machine, which the other nodes of the "
                            f"cluster at {address} ({len(nodes)} nodes) cannot read",
                            hint="set the recipe's storage (or WORKFLOW_STORAGE) to s3://... or gs://...")
    return True
