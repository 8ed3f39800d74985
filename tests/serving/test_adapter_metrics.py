"""serving/metrics.py's middleware on a small ASGI app (no Ray): what it counts per model id, parsed back by
prometheus_client. The served app's /metrics, with the LLM replica's loads, is tested in tests/stages/test_serve.py."""

from __future__ import annotations

import asyncio
import json

import httpx

from workflow.core.secrets import key_digest
from workflow.serving import metrics
from workflow.serving.guard import KeyGuard


async def completions(scope, receive, send):
    """Streams one SSE chunk per token of ``max_tokens`` (usage at the end if asked), or answers as vLLM does."""
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    request = json.loads(body)
    if request["model"] == "m:nope":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        return await send({"type": "http.response.body", "body": b'{"error": {"message": "no"}}'})
    if not request.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        usage = {"prompt_tokens": 3, "completion_tokens": request["max_tokens"]}
        return await send({"type": "http.response.body", "body": json.dumps({"choices": [], "usage": usage}).encode()})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n',
                "more_body": True})
    for _ in range(request["max_tokens"]):
        await send({"type": "http.response.body", "body": b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n',
                    "more_body": True})
    if request.get("stream_options", {}).get("include_usage"):
        await send({"type": "http.response.body", "more_body": True,
                    "body": b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d}}\n\n'
                    % request["max_tokens"]})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def samples(text: str) -> dict[tuple[str, str | None], float]:
    from prometheus_client.parser import text_string_to_metric_families  # in the serve environment only

    return {(s.name, s.labels.get("model")): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if "le" not in s.labels}


def test_requests_errors_tokens_and_ttft_by_model_behind_the_key():
    asyncio.run(_requests_errors_tokens_and_ttft_by_model_behind_the_key())


async def _requests_errors_tokens_and_ttft_by_model_behind_the_key():
    recorded = metrics.RequestMetrics()
    loads = metrics.LoadMetrics()
    loads.loaded("m:a", 0.5)
    loads.loaded("m:a", 0.25)  # evicted, then loaded again

    async def load_text():
        return loads.text()

    app = KeyGuard(metrics.MetricsMiddleware(completions, metrics=recorded, more_text=load_text),
                   api_key_sha256=key_digest("k"), max_body_bytes=2**20)
    auth = {"Authorization": "Bearer k"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path="/route"), base_url="http://t/route") as client:
        assert (await client.get("/metrics")).status_code == 401
        for body in ({"model": "m:a", "max_tokens": 5, "stream": True},
                     {"model": "m:a", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
                     {"model": "m:b", "max_tokens": 7}, {"model": "m:nope", "max_tokens": 1}):
            await client.post("/v1/chat/completions", json=body, headers=auth)
        text = (await client.get("/metrics", headers=auth)).text
    found = samples(text)
    assert found[("workflow_adapter_requests_total", "m:a")] == 2 and found[("workflow_adapter_requests_total", "m:b")] == 1
    assert found[("workflow_adapter_generated_tokens_total", "m:a")] == 8  # 5 deltas counted, 3 from usage
    assert found[("workflow_adapter_generated_tokens_total", "m:b")] == 7
    assert found[("workflow_adapter_time_to_first_token_seconds_count", "m:a")] == 2
    assert ("workflow_adapter_time_to_first_token_seconds_count", "m:b") not in found  # not streamed
    assert found[("workflow_adapter_errors_total", "<unknown>")] == 1
    assert not [k for k in found if k[1] == "m:nope"]
    assert found[("workflow_adapter_loads_total", "m:a")] == 2 and found[("workflow_adapter_reloads_total", "m:a")] == 1
    assert found[("workflow_adapter_load_seconds_sum", "m:a")] == 0.75
