"""Where a running Ray Serve listens: the HTTP options its controller was started with.

Serve fixes its HTTP options when it starts; a later ``serve.start`` with other options is
ignored with a log warning only, so the serve stage reads where a running Serve listens before it
deploys (``stages/serve.py``). Serve has no public reader of them (``serve.status()`` does not
carry them, the REST API needs the dashboard): the client that ``serve.start`` itself uses,
``ray.serve.context._get_global_client``, holds them, and is read only with the Ray versions in
``TESTED``. Outside them :func:`running_http_options` says it does not know, with one warning
line, and the app is deployed with the recipe's host and port.
"""

from __future__ import annotations

from . import supported, warn

PATCH = "workflow.patches.ray_serve_http_options"
TESTED = {"ray": "==2.60.*"}
CONSEQUENCE = ("a recipe's serve.host/serve.port that differ from those of a Serve already running on the cluster are "
               "not detected: Serve keeps its own, and the app answers there")


def running_http_options() -> tuple[str, int] | None:
    """Host and port of the connected cluster's Serve proxies; None where Serve does not run yet, or
    outside ``TESTED`` (one warning)."""
    if not supported(PATCH, TESTED, CONSEQUENCE):
        return None
    from ray.serve import context

    client_of = getattr(context, "_get_global_client", None)
    if client_of is None:
        warn(PATCH, f"ray.serve.context._get_global_client does not exist; {CONSEQUENCE}")
        return None
    client = client_of(raise_if_no_controller_running=False)
    return None if client is None else (client.http_config.host, client.http_config.port)
