"""Attacks on a deployed app, shared by the serving tests that deploy one (tests/stages/test_serve.py).

Each check takes a live app of the workflow's own cluster (its ``state.json``, its root URL, the
key) and does what a client without the key, or with a bad adapter name, would do. The routes are
read from the app the replica serves (``asgi_routes`` through a Serve deployment handle, in a
process of its own that connects to the cluster), never written down here.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx

from workflow.core import envs
from workflow.serving import cluster
from workflow.serving.guard import HEALTH_PATHS

_ROUTES_SCRIPT = """
import json, sys
from workflow.serving import app, cluster
cluster.connect(json.load(open(sys.argv[1])))
from ray import serve
deployments = serve.status().applications[app.APP_NAME].deployments
name = next(d for d in deployments if d.startswith(sys.argv[2]))
handle = serve.get_deployment_handle(name, app_name=app.APP_NAME)
print("ROUTES " + json.dumps(handle.asgi_routes.remote().result(timeout_s=120)))
"""
# Ray's own services (token-authenticated gRPC, its agents and metrics exporter): Ray 2.60 binds them to
# every interface and has no setting for it (README's listener table says so). Matched by command line.
RAY_CORE = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard/dashboard.py",
            "autoscaler/_private/monitor.py", "ray.util.client.server", "log_monitor.py")


def app_routes(state_file: Path, deployment_prefix: str) -> list[tuple[str, list[str]]]:
    """The (path, methods) the replica's app answers, asked from the replica itself."""
    proc = subprocess.run([envs.python_for(envs.SERVE), "-c", _ROUTES_SCRIPT, str(state_file), deployment_prefix],
                          env=envs.stage_environment(envs.SERVE), capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROUTES ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(lines[-1].removeprefix("ROUTES "))]


def _filled(path: str, model: str) -> str:
    """A route's path with its parameters filled in (a model parameter with ``model``)."""
    path = re.sub(r"\{model(:path)?\}", model, path)
    return re.sub(r"\{[^}]+\}", "x", path)


def check_every_route_needs_the_key(root: str, routes: list, model: str, key: str) -> None:
    """Every route (and a path the app does not have) answers 401 without the key or with a wrong one;
    Serve's health check answers without it."""
    assert len(routes) > 5, routes  # the app's routes were read, not an empty list
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi",
            "max_tokens": 2}
    refused = []
    for path, methods in [*routes, ("/no/such/path", ["GET", "POST"])]:
        url = root + _filled(path, model)
        for method in methods or ["GET", "POST"]:
            for headers in ({}, {"Authorization": "Bearer " + "w" * len(key)}, {"Authorization": key}):
                resp = httpx.request(method, url, headers=headers, timeout=60,
                                     json=body if method in ("POST", "PUT", "PATCH") else None)
                if path in HEALTH_PATHS:
                    continue
                if resp.status_code != 401:
                    refused.append(f"{method} {path} {headers}: {resp.status_code} {resp.text[:100]}")
                elif method != "HEAD":
                    assert resp.json()["error"]["code"] == "invalid_api_key", resp.text
    assert not refused, refused
    assert httpx.get(root + "/-/healthz", timeout=30).status_code == 200


def check_bodies_over_the_limit_are_refused(root: str, model: str, key: str, limit: int) -> None:
    """With the key: a body over ``serve.max_request_bytes`` is a 413, whether its length is declared or not."""
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    big = json.dumps({"model": model, "messages": [{"role": "user", "content": "x" * limit}]}).encode()
    declared = httpx.post(root + "/v1/chat/completions", content=big, headers=auth, timeout=60)
    assert declared.status_code == 413, declared.text[:300]

    def chunks():
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    streamed = httpx.post(root + "/v1/chat/completions", content=chunks(), headers=auth, timeout=60)
    assert streamed.status_code == 413, streamed.text[:300]
    assert set(streamed.json()["error"]) >= {"message", "type", "code"}


def check_adapter_names_come_from_the_list(root: str, model: str, key: str) -> None:
    """A name that climbs or that the adapters folder does not list is OpenAI's 404, in every place a model is named."""
    auth = {"Authorization": f"Bearer {key}"}
    for name in ("../x", "..", "nope", "a/b", "x%2F..%2Fy", " viggo"):
        requested = f"{model}:{name}"
        resp = httpx.post(root + "/v1/chat/completions", headers=auth, timeout=120, json={
            "model": requested, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert resp.status_code == 404, (requested, resp.status_code, resp.text[:300])
        error = resp.json()["error"]
        assert set(error) >= {"message", "type", "code"} and requested in error["message"], error


def _speaks_http(host: str, port: int) -> bool:
    """Whether the listener on ``port`` answers an HTTP/1 request (Serve's proxy, HAProxy, a replica's app do;
    the gRPC server of every Ray worker, which binds every interface, does not)."""
    import socket

    with socket.create_connection((host, port), timeout=5) as conn:
        conn.settimeout(3)
        conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        try:
            return conn.recv(5) == b"HTTP/"
        except OSError:
            return False


def check_no_serving_listener_off_loopback(address: str) -> None:
    """No HTTP listener of the cluster (the serving path: Serve's proxy, HAProxy's frontend, stats and metrics, the
    replicas' apps) is on an address other than loopback. Ray's own services
    (``RAY_CORE``) and its workers' gRPC servers bind every interface whatever the settings (README's table)."""
    import ipaddress

    import psutil

    pids = {p.pid: " ".join(p.cmdline()) or p.name() for p in cluster.cluster_processes(address) if p.is_running()}
    assert any("haproxy" in c or "ServeReplica" in c for c in pids.values()), pids
    http, off = [], []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in pids or any(n in pids[conn.pid] for n in RAY_CORE):
            continue
        ip = ipaddress.ip_address(conn.laddr.ip)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if not _speaks_http("127.0.0.1" if ip.is_unspecified or ip.is_loopback else str(ip), conn.laddr.port):
            continue
        http.append(conn.laddr.port)
        if not ip.is_loopback:
            off.append(f"{conn.laddr.ip}:{conn.laddr.port} {pids[conn.pid][:120]}")
    assert http, "no HTTP listener of the cluster was found"
    assert not off, off
