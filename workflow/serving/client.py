"""Talking to the served app: streaming chat, the model list, waiting for it, the smoke check.

httpx is imported inside the functions that use it.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable
from typing import Any

from ..core.console import say
from ..core.errors import WorkflowError
from ..prompts.messages import expected_output, row_messages


def client_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def stream_chat(base_url: str, model: str, messages: list[dict], *, api_key: str | None, max_tokens: int,
                timeout_s: float = 120) -> str:
    """One streaming chat completion, greedy; the text, or an error naming the status."""
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    parts = []
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, headers=client_headers(api_key),
                      timeout=timeout_s) as resp:
        if resp.status_code != 200:
            resp.read()
            raise WorkflowError(f"serve: {model!r} answered HTTP {resp.status_code}: {resp.text[:300]}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise WorkflowError(f"serve: {model!r} streamed an error: {chunk['error']}")
            for choice in chunk.get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


def list_models(base_url: str, api_key: str | None) -> list[str]:
    import httpx

    resp = httpx.get(f"{base_url}/models", headers=client_headers(api_key), timeout=60)
    resp.raise_for_status()
    return [m["id"] for m in resp.json()["data"]]


def wait_until_answering(base_url: str, model_id: str, api_key: str | None, *, timeout_s: float = 600) -> None:
    """Poll until the base model answers one request (replicas and the engine are up)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            stream_chat(base_url, model_id, [{"role": "user", "content": "hi"}], api_key=api_key, max_tokens=1,
                        timeout_s=60)
            return
        except (httpx.HTTPError, WorkflowError) as err:
            last = str(err)[:200]
            time.sleep(3)
    raise WorkflowError(f"serve: the app did not answer within {timeout_s:.0f} s (last: {last})")


# ---------------------------------------------------------------- smoke check

def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.strip(), b.strip(), autojunk=False).ratio()


def smoke_check(base_url: str, *, model_id: str, adapters: list[str], rows: list[dict], api_key: str | None,
                max_tokens: int, main_metric: tuple[str, Callable[[str, str], float]] | None = None) -> dict[str, Any]:
    """Ask the base model and each adapter about training rows; the adapters must be closer to the targets.

    A model "reproduces" a target when its answer equals it; since a short CPU training
    rarely gets there, the evaluation task's main metric (``main_metric``: its name and its
    score of one row) and the mean similarity (difflib ratio) to the targets are compared in
    that order: an adapter passes when it has more exact matches than the base, or as many
    and a higher mean main metric, or as high and a higher mean similarity.
    """
    models = [model_id] + [f"{model_id}:{a}" for a in adapters]
    results: dict[str, Any] = {"base_url": base_url, "model_ids": models, "models": {}}
    for model in models:
        answers = []
        for row in rows:
            answer = stream_chat(base_url, model, row_messages(row), api_key=api_key, max_tokens=max_tokens)
            target = expected_output(row) or ""
            answers.append({"answer": answer, "target": target,
                            "similarity": round(similarity(answer, target), 4),
                            **({main_metric[0]: round(main_metric[1](target, answer), 4)} if main_metric else {})})
        results["models"][model] = {
            "answered": all(a["answer"].strip() for a in answers),
            "exact": sum(a["answer"].strip() == (a["target"] or "").strip() for a in answers),
            "mean_similarity": round(sum(a["similarity"] for a in answers) / len(answers), 4),
            "samples": answers,
        }
        if main_metric:
            results["models"][model][f"mean_{main_metric[0]}"] = round(
                sum(a[main_metric[0]] for a in answers) / len(answers), 4)
        scored = (f"{main_metric[0]} {results['models'][model][f'mean_{main_metric[0]}']:.3f}, "
                  if main_metric else "")
        say(f"[serve] smoke {model}: exact {results['models'][model]['exact']}/{len(rows)}, {scored}"
            f"similarity {results['models'][model]['mean_similarity']:.3f}")
    # Listed after the requests: with direct streaming /v1/models shows the adapters loaded so far.
    results["listed"] = listed = list_models(base_url, api_key)
    base = results["models"][model_id]
    problems = [f"{m} is not listed by /v1/models" for m in models if m not in listed]
    problems += [f"{m} gave an empty answer" for m, r in results["models"].items() if not r["answered"]]
    for model in models[1:]:
        r = results["models"][model]
        keys = ["exact"] + ([f"mean_{main_metric[0]}"] if main_metric else []) + ["mean_similarity"]
        r["beats_base"] = tuple(r[k] for k in keys) > tuple(base[k] for k in keys)
        if not r["beats_base"]:
            problems.append(f"{model} is no closer to its training targets than the base model ("
                            + ", ".join(f"{k.removeprefix('mean_')} {r[k]} vs {base[k]}" for k in keys) + ")")
    results["passed"] = not problems
    results["problems"] = problems
    return results


def greedy_token_ids(base_url: str, model: str, messages: list[dict], *, api_key: str | None, max_tokens: int,
                     timeout_s: float = 120) -> list[int]:
    """The token ids of one greedy chat completion (vLLM's ``return_token_ids`` extension, which Ray Serve
    LLM's request model inherits from vLLM's, so it reaches the engine behind the ingress and directly)."""
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True}
    resp = httpx.post(f"{base_url}/chat/completions", json=body, headers=client_headers(api_key), timeout=timeout_s)
    if resp.status_code != 200:
        raise WorkflowError(f"serve: {model!r} answered HTTP {resp.status_code}: {resp.text[:300]}")
    ids = resp.json()["choices"][0].get("token_ids")
    if ids is None:
        raise WorkflowError(f"serve: {model!r} returned no token_ids for return_token_ids: true",
                            hint="the parity check needs vLLM's return_token_ids; set evaluate.parity: null to skip it")
    return list(ids)


def usage_text(base_url: str, model_ids: list[str], api_key_env: str | None) -> str:
    """Ready-to-paste curl and openai examples for the served models."""
    auth = f' -H "Authorization: Bearer ${api_key_env}"' if api_key_env else ""
    key = f'os.environ["{api_key_env}"]' if api_key_env else '"none"'
    model = model_ids[-1]
    return "\n".join([
        f"base URL: {base_url}",
        "models:   " + ", ".join(model_ids),
        "",
        f"curl{auth} {base_url}/models",
        f"curl -N{auth} -H 'Content-Type: application/json' {base_url}/chat/completions \\",
        f"  -d '{{\"model\": \"{model}\", \"stream\": true, \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
        "",
        "python - <<'EOF'",
        "import os",
        "from openai import OpenAI",
        f"client = OpenAI(base_url=\"{base_url}\", api_key={key})",
        f"stream = client.chat.completions.create(model=\"{model}\", stream=True,",
        "                                        messages=[{\"role\": \"user\", \"content\": \"Hello\"}])",
        "for chunk in stream:",
        "    print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)",
        "EOF",
    ])
