"""HAProxy's stats page and Prometheus endpoint on loopback, not on every interface.

With direct streaming (``serving.app.DIRECT_STREAMING_ENV``) Ray 2.60 runs HAProxy on each node,
configured from ``ray.serve._private.haproxy_templates.HAPROXY_CONFIG_TEMPLATE``, which binds the
stats page (``listen stats``, port 8404) and the Prometheus exporter (``frontend prometheus``, port
9101) to every interface (``bind *:8404``, ``bind :9101``) whatever ``http_options.host`` says, and
without authentication: seen on ``0.0.0.0:8404`` and ``0.0.0.0:9101`` with ``serve.host:
127.0.0.1``. Ray itself reads HAProxy's state through its unix socket, not these ports, so here
both bind to 127.0.0.1 (a local Prometheus still scrapes them).

HAProxy's configuration is rendered by the ``HAProxyManager`` actor that the Serve controller
starts on each node. The cluster's environment names :func:`in_controller` as Serve's controller
callback (``RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH``, :func:`cluster_env`), which runs in the
controller before it creates those actors; it gives the controller a ``HAProxyManager`` whose
constructor first rebinds the two listeners in the template (:func:`bind_listeners_to_loopback`).

Off switch: ``WORKFLOW_HAPROXY_LOOPBACK=0`` (Ray's binds, every interface). Outside ``TESTED``, or
where the template's bind lines are not as written, Ray's configuration stays, with one warning.
"""

from __future__ import annotations

import os

from . import PatchTargetMissing, replace_attribute, supported, warn

PATCH = "workflow.patches.ray_serve_haproxy_listeners"
TESTED = {"ray": "==2.60.*"}
OFF_ENV = "WORKFLOW_HAPROXY_LOOPBACK"
CONSEQUENCE = ("HAProxy's stats page (port 8404) and Prometheus endpoint (port 9101) listen on every interface, "
               "without authentication")
CALLBACK_ENV = "RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH"
# Ray's bind lines in HAPROXY_CONFIG_TEMPLATE, and what they become.
BINDS = {"bind :{{ config.metrics_port }}": "bind 127.0.0.1:{{ config.metrics_port }}",
         "bind *:{{ config.stats_port }}": "bind 127.0.0.1:{{ config.stats_port }}"}


def wanted() -> bool:
    """True unless switched off or outside the tested Ray (which then warns once)."""
    return os.environ.get(OFF_ENV, "1") != "0" and supported(PATCH, TESTED, CONSEQUENCE)


def cluster_env() -> dict[str, str]:
    """What a direct-streaming cluster's environment needs for the patch (nothing when it is off)."""
    return {CALLBACK_ENV: f"{PATCH}.in_controller"} if wanted() else {}


def bind_listeners_to_loopback() -> bool:
    """Rewrite the two bind lines of Ray's HAProxy template in this process; False (and a warning) if it cannot."""
    from ray.serve._private import haproxy

    template = getattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", "")
    missing = [line for line in BINDS if line not in template]
    if missing:
        warn(PATCH, f"HAProxy's template has no line {missing[0]!r}; {CONSEQUENCE}")
        return False
    for line, loopback in BINDS.items():
        template = template.replace(line, loopback)
    try:
        replace_attribute(haproxy, "HAPROXY_CONFIG_TEMPLATE", template)
    except PatchTargetMissing as err:
        warn(PATCH, f"{err}; {CONSEQUENCE}")
        return False
    return True


def in_controller() -> None:
    """Serve's controller callback: the controller starts the loopback-binding ``HAProxyManager`` on each node."""
    if not wanted():
        return
    import ray
    from ray.serve._private import controller, haproxy

    rays = haproxy.HAProxyManager.__ray_actor_class__

    class HAProxyManager(rays):  # Ray's name: actors and process titles stay as Ray names them
        def __init__(self, *args, **kwargs):
            bind_listeners_to_loopback()
            super().__init__(*args, **kwargs)

    HAProxyManager.__qualname__ = rays.__qualname__
    try:
        replace_attribute(controller, "HAProxyManager", ray.remote(num_cpus=0)(HAProxyManager))
    except PatchTargetMissing as err:
        warn(PATCH, f"{err}; {CONSEQUENCE}")
