"""The key guard, adapter names, API keys, CORS and HAProxy's listeners, without a deployed app.

The same attacks against the deployed apps, in both serving modes, run in tests/stages/test_serve.py
(tests/security_checks.py), which deploys them once for all its tests.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from workflow.core.secrets import key_digest
from workflow.serving.adapter_store import AdapterCatalogue, adapter_name_allowed
from workflow.serving.guard import KeyGuard, route_table

KEY = "guard-test-key-0123456789abcdef"


class App:
    """An ASGI app that records what reaches it and reads its whole body."""

    def __init__(self):
        self.seen: list[tuple[str, bytes]] = []

    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.seen.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(guard, path: str, *chunks: bytes, headers: dict | None = None, method: str = "POST",
         declared: int | None = None) -> tuple[int, bytes, int]:
    """(status, body, body messages the guard took) of one request through ``guard``."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    total = len(messages)
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if declared is not None:
        raw.append((b"content-length", str(declared).encode()))
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(guard({"type": "http", "method": method, "path": path, "headers": raw}, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body, total - len(messages)


def bearer(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_without_the_key_nothing_is_read_and_nothing_reaches_the_app():
    app = App()
    guard = KeyGuard(app, api_key_sha256=key_digest(KEY), max_body_bytes=1000)
    body = json.dumps({"model": "m:viggo", "messages": []}).encode()
    for path in ("/v1/chat/completions", "/invocations", "/tokenize", "/metrics", "/docs", "/anything"):
        for headers in ({}, bearer("wrong-key-0123456789"), {"Authorization": KEY}, bearer(KEY + " x")):
            status, answer, taken = call(guard, path, body[:5], body[5:], headers=headers)
            assert status == 401 and taken == 0, (path, headers, status, taken)
            assert json.loads(answer)["error"]["code"] == "invalid_api_key"
    assert app.seen == []
    assert call(guard, "/-/healthz", headers={}, method="GET")[0] == 200  # Serve's health check
    status, _, _ = call(guard, "/v1/chat/completions", body[:5], body[5:], headers=bearer())
    assert status == 200 and app.seen[-1] == ("/v1/chat/completions", body)  # the body reaches the app whole
    assert call(guard, "/v1/models", headers={"authorization": f"bearer  {KEY} "}, method="GET")[0] == 200


def test_bodies_over_the_limit_are_refused_declared_or_streamed():
    app = App()
    guard = KeyGuard(app, api_key_sha256=key_digest(KEY), max_body_bytes=100)
    status, answer, taken = call(guard, "/v1/completions", b"x" * 50, b"x" * 60, headers=bearer(), declared=110)
    assert status == 413 and taken == 0 and json.loads(answer)["error"]["code"] == "request_too_large"
    status, _, taken = call(guard, "/v1/completions", b"x" * 50, b"x" * 60, b"x" * 60, headers=bearer())
    assert status == 413 and taken == 2  # stopped at the message that passed the limit
    assert call(guard, "/v1/completions", b"x" * 100, headers=bearer())[0] == 200
    assert app.seen == [("/v1/completions", b"x" * 100)]
    open_guard = KeyGuard(App(), api_key_sha256=None, max_body_bytes=100)  # an open endpoint keeps the limit
    assert call(open_guard, "/v1/completions", b"x" * 101)[0] == 413
    assert call(open_guard, "/v1/completions", b"x" * 10)[0] == 200


def test_cors_preflight_passes_only_where_origins_are_allowed():
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    assert call(KeyGuard(App(), api_key_sha256=key_digest(KEY), max_body_bytes=100), "/v1/models",
                headers=preflight, method="OPTIONS")[0] == 401
    assert call(KeyGuard(App(), api_key_sha256=key_digest(KEY), max_body_bytes=100, cors_preflight=True),
                "/v1/models", headers=preflight, method="OPTIONS")[0] == 200
    assert call(KeyGuard(App(), api_key_sha256=key_digest(KEY), max_body_bytes=100, cors_preflight=True),
                "/v1/models", headers={"Origin": "https://app.example.com"}, method="GET")[0] == 401


def test_route_table_reads_routes_and_mounts():
    from fastapi import FastAPI
    from starlette.routing import Mount

    app = FastAPI()
    app.post("/v1/chat/completions")(lambda: None)
    app.router.routes.append(Mount("/metrics", app=App()))
    table = dict(route_table(app))
    assert table["/v1/chat/completions"] == ["POST"] and table["/metrics"] == []
    assert "/openapi.json" in table and "/docs" in table  # FastAPI's own routes count too


@pytest.mark.parametrize("name", ["viggo", "viggo2", "v1.2_final-b"])
def test_plain_folder_names_are_adapter_names(name):
    assert adapter_name_allowed(name)


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "/abs", "x y", "", "viggo\n", "a\\b", "ü"])
def test_anything_else_is_not(name):
    assert not adapter_name_allowed(name)


def test_the_catalogue_knows_listed_adapters_only_and_lists_in_the_background():
    listings = [["viggo"], ["viggo", "later"]]
    calls = []

    def list_names(uri):
        calls.append(uri)
        return listings[min(len(calls), len(listings)) - 1]

    async def scenario():
        catalogue = AdapterCatalogue("s3://b/adapters", refresh_s=0.05, list_names=list_names)
        await asyncio.gather(*(catalogue.start() for _ in range(3)))  # requests arriving together: one listing
        assert len(calls) == 1
        first = [catalogue.knows(n) for n in ("viggo", "later", "../viggo", "nope")]
        before = len(calls)
        for _ in range(5):
            catalogue.knows("nope")  # asking reads nothing
        assert len(calls) == before
        await asyncio.sleep(0.2)
        return first, catalogue.knows("later")

    first, later = asyncio.run(scenario())
    assert first == [True, False, False, False] and later


def test_short_or_padded_api_keys_are_refused_in_one_line():
    from workflow.config import ServeConfig

    cfg = ServeConfig(api_key_env="MY_KEY")
    with pytest.raises(ValueError, match=r"^serve.api_key_env: \$MY_KEY holds 15 characters; an API key needs at "
                                         r"least 16"):
        cfg.api_key({"MY_KEY": "k" * 15})
    with pytest.raises(ValueError, match="no surrounding spaces"):
        cfg.api_key({"MY_KEY": " " + "k" * 20})
    with pytest.raises(ValueError, match=r"\$MY_KEY is not set"):
        cfg.api_key({})
    assert cfg.api_key({"MY_KEY": "k" * 16}) == "k" * 16
    assert ServeConfig().api_key({}) is None


def test_cors_origins_are_off_by_default_and_named_one_by_one():
    from pydantic import ValidationError

    from workflow.config import ServeConfig
    from workflow.serving import app

    assert ServeConfig().cors_allow_origins == []
    for bad in (["*"], ["https://a.example.com/path"], ["a.example.com"], ["https://a,https://b"]):
        with pytest.raises(ValidationError, match="scheme://host"):
            ServeConfig(cors_allow_origins=bad)
    cfg = ServeConfig(cors_allow_origins=["https://app.example.com"])
    assert app.with_cors_origins({}, cfg) == {"engine_kwargs": {"allowed_origins": ["https://app.example.com"]}}
    assert app.with_cors_origins({}, ServeConfig()) == {}


def test_the_replicas_get_the_keys_digest_never_the_key():
    from workflow.config import ServeConfig
    from workflow.serving import app, guard

    env = app.direct_streaming_env(KEY, ServeConfig(max_request_bytes=4096))
    assert KEY not in json.dumps(env) and env[guard.DIGEST_ENV] == key_digest(KEY)
    assert env[guard.MAX_BODY_ENV] == "4096" and "VLLM_API_KEY" not in env
    ingress = app.ingress_cls_config(KEY, ServeConfig(cors_allow_origins=["https://a.example.com"]))
    assert KEY not in json.dumps(ingress)
    assert ingress["ingress_extra_kwargs"] == {"api_key_sha256": key_digest(KEY), "max_body_bytes": 16 * 2**20,
                                               "cors_allow_origins": ["https://a.example.com"]}


def test_haproxy_stats_and_metrics_bind_to_loopback(monkeypatch):
    """The patch rewrites the two bind lines of Ray's own template and nothing else (the frontend keeps serve.host)."""
    from ray.serve._private import haproxy

    from workflow.patches import ray_serve_haproxy_listeners as patch

    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", haproxy.HAPROXY_CONFIG_TEMPLATE)
    original = haproxy.HAPROXY_CONFIG_TEMPLATE
    assert patch.bind_listeners_to_loopback()
    changed = [(a, b) for a, b in zip(original.splitlines(), haproxy.HAPROXY_CONFIG_TEMPLATE.splitlines(), strict=True)
               if a != b]
    assert [b.strip() for _, b in changed] == ["bind 127.0.0.1:{{ config.metrics_port }}",
                                               "bind 127.0.0.1:{{ config.stats_port }}"]
    assert patch.cluster_env() == {patch.CALLBACK_ENV: f"{patch.PATCH}.in_controller"}
    monkeypatch.setenv(patch.OFF_ENV, "0")
    assert patch.cluster_env() == {}
