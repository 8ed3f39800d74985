"""Token authentication for a driver that imported Ray before it connects to a token cluster.

The workflow's own serving cluster runs with ``RAY_AUTH_MODE=token`` (``serving/cluster.py``).
Ray reads that variable into its process-wide ``RayConfig`` when ``ray`` is first imported, and
the process that connects (the serve stage, ``workflow serve``/``stop``, a bench) has mostly
imported Ray before: setting the variable then changes nothing. Ray re-reads it the way its own
``_enable_token_auth`` does (ray/_private/authentication/authentication_token_setup.py):
``ray._raylet.Config.initialize("")``, a private call, made only with the Ray versions in
``TESTED``.

Outside them (or without that call) :func:`use_token_auth` only sets the variable, with one
warning line: a process that imported Ray before is refused by the cluster (it connects
without the token), one that imports Ray after connects.
"""

from __future__ import annotations

import os

from . import supported, warn

PATCH = "workflow.patches.ray_token_auth"
TESTED = {"ray": "==2.60.*"}
CONSEQUENCE = ("RAY_AUTH_MODE=token reaches only a process that imports ray after it is set: connecting to the "
               "workflow's own cluster may fail with an authentication error")


def use_token_auth() -> None:
    """Make this process use token authentication from its next ``ray.init`` (module doc)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if not supported(PATCH, TESTED, CONSEQUENCE):
        return
    from ray import _raylet

    config = getattr(_raylet, "Config", None)
    if config is None or not hasattr(config, "initialize"):
        warn(PATCH, f"ray._raylet.Config.initialize does not exist; {CONSEQUENCE}")
        return
    config.initialize("")
