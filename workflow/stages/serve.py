"""Serve stage: deploy the base model and the run's adapters as an OpenAI-compatible app.

``workflow serve RECIPE`` (and ``workflow run``) deploys, smoke-checks and shuts the app
down; ``--detach`` leaves it running; ``--stop`` (or ``workflow stop RECIPE``) shuts a
detached app down. The app runs ``ray.serve.llm.build_openai_app`` on a Ray cluster of its
own that outlives this process (see workflow/serving/cluster.py); the cluster's process group,
address and URL are kept in a local state file, ``<scratch>/serve/state.json``.

Written to ``<run>/serve/``: ``smoke.json`` (the model ids served and what each answered),
``endpoint.json`` (URL, model ids, whether a key is needed; never the key) and a
manifest naming both. The stage is not cacheable: every call deploys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core import manifest, storage
from ..core.envs import SERVE
from ..core.errors import WorkflowError
from ..core.stage import StageContext, StageResult
from ..patches import ray_serve_direct_streaming
from ..prompts import guard
from ..serving import adapter_store, app, client, cluster

ENV = SERVE
CACHEABLE = False


def config(ctx: StageContext) -> dict:
    if ctx.recipe.serve is None:
        raise WorkflowError(f"{ctx.recipe.path}: the recipe has no serve: section",
                            hint="add one (see recipes/viggo-cpu.yaml)")
    return ctx.recipe.serve.model_dump(mode="json")


def inputs(ctx: StageContext) -> dict[str, str]:
    if ctx.options.get("stop"):
        return {}
    found = {"model": ctx.upstream("model")["fingerprint"]}
    if ctx.recipe.train is not None:
        found["train"] = ctx.upstream("train")["fingerprint"]
    return found


def _state_file(ctx: StageContext) -> Path:
    return ctx.scratch() / "state.json"


def _read_state(ctx: StageContext) -> dict | None:
    path = _state_file(ctx)
    return json.loads(path.read_text()) if path.exists() else None


def stop(ctx: StageContext) -> bool:
    """Shut down the recipe's detached app, if one runs; True if there was one."""
    state = _read_state(ctx)
    if state is None:
        return False
    print(f"[serve] stopping the app at {state.get('base_url')} (Ray cluster {state['address']})", flush=True)
    cluster.stop_cluster(state)
    _state_file(ctx).unlink()
    return True


def _adapters(ctx: StageContext) -> tuple[str | None, list[str], int | None, list[dict]]:
    """(adapters folder, adapter names, LoRA rank, training rows for the smoke check)."""
    if ctx.recipe.train is None:
        return None, [], None, []
    train = ctx.upstream("train")
    adapters_dir = train["outputs"]["adapters_dir"]
    names = sorted({rel.split("/")[0] for rel in storage.list_files(adapters_dir)
                    if rel.endswith("/adapter_config.json") and rel.count("/") == 1})
    if not names:
        raise WorkflowError(f"serve: no adapter in {adapters_dir} (no <name>/adapter_config.json)",
                            hint="rerun the train stage")
    rows = []
    train_uri = ctx.upstream("ingest")["outputs"].get("train")
    if train_uri:
        lines = storage.read_text(train_uri).splitlines()
        rows = [json.loads(line) for line in lines[: ctx.recipe.serve.smoke.rows] if line.strip()]
    return adapters_dir, names, train["summary"].get("lora_rank"), rows


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.serve
    started = manifest.now()
    if ctx.options.get("stop"):
        if not stop(ctx):
            print(f"[serve] no detached app is recorded for {ctx.recipe.name} ({_state_file(ctx)})", flush=True)
        return StageResult(outputs={})
    api_key = None
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise WorkflowError(f"{ctx.recipe.path}: serve.api_key_env: ${cfg.api_key_env} is not set",
                                hint=f"export {cfg.api_key_env}=<key>, or remove serve.api_key_env for an open endpoint")
    model_source = ctx.upstream("model")["outputs"]["model"]
    adapters_dir, adapter_names, lora_rank, rows = _adapters(ctx)
    if adapters_dir is not None:
        guard.check_stored_adapters(adapters_dir, adapter_names, model_source, ctx.scratch("prompt-format"),
                                    where="serve", allow_mismatch=cfg.allow_prompt_mismatch)
    local_adapters = adapters_dir is not None and storage.is_local(adapters_dir)
    s3_port = cluster.free_port() if local_adapters else None
    # The loopback URI is only known once published; validate with a placeholder of the same form.
    placeholder = f"s3://{adapter_store.LOOPBACK_BUCKET}/{ctx.recipe.name}" if local_adapters else adapters_dir
    llm = app.build_llm_config(cfg, model_source=model_source, default_model_id=ctx.recipe.name,
                                   adapters_uri=placeholder, lora_rank=lora_rank)
    app.validate_llm_config(llm, f"{ctx.recipe.path}: serve.llm_config")
    model_id = llm["model_loading_config"]["model_id"]

    if stop(ctx):
        print("[serve] replaced the app that was running", flush=True)
    env_vars = adapter_store.loopback_env(s3_port) if s3_port else {}
    direct_streaming = cfg.direct_streaming and ray_serve_direct_streaming.available()
    if direct_streaming:
        env_vars.update(app.direct_streaming_env(api_key))
    port = cfg.port or cluster.free_port()
    base_url = f"http://{cfg.host}:{port}/v1"
    if os.environ.get("RAY_ADDRESS"):
        print("[serve] RAY_ADDRESS is set, but the app is deployed on a Ray cluster of its own on this machine "
              "(serving on the user's cluster is not built yet)", flush=True)
    print(f"[serve] starting a Ray cluster ({cfg.num_cpus} logical CPUs) for {model_id}", flush=True)
    state = cluster.start_cluster(ctx.scratch("ray"), num_cpus=cfg.num_cpus, env_vars=env_vars)
    state["base_url"] = base_url
    _state_file(ctx).write_text(json.dumps(state))
    try:
        cluster.connect(state)
        if local_adapters:
            llm["lora_config"]["dynamic_lora_loading_path"] = adapter_store.publish_adapters_on_loopback(
                adapters_dir, s3_port, ctx.recipe.name)
        print(f"[serve] deploying build_openai_app on {base_url} (takes a minute or two on a CPU)", flush=True)
        app.deploy(app.validate_llm_config(llm, f"{ctx.recipe.path}: serve.llm_config"), host=cfg.host,
                       port=port, ingress_cls_config=app.ingress_cls_config(cfg.api_key_env),
                       ingress_deployment_config=cfg.ingress_deployment_config, direct_streaming=direct_streaming)
        client.wait_until_answering(base_url, model_id, api_key)
        model_ids = [model_id] + [f"{model_id}:{a}" for a in adapter_names]
        print(client.usage_text(base_url, model_ids, cfg.api_key_env), flush=True)
        smoke = client.smoke_check(base_url, model_id=model_id, adapters=adapter_names, rows=rows or
                                    [{"instruction": "Say hello.", "output": ""}], api_key=api_key,
                                    max_tokens=cfg.smoke.max_tokens)
        smoke_uri = storage.join(ctx.out_uri, "smoke.json")
        storage.write_json(smoke_uri, smoke)
        endpoint = {"base_url": base_url, "model_ids": model_ids, "api_key_env": cfg.api_key_env,
                    "detached": bool(ctx.options.get("detach"))}
        endpoint_uri = storage.join(ctx.out_uri, "endpoint.json")
        storage.write_json(endpoint_uri, endpoint)
        if not smoke["passed"]:
            raise WorkflowError("serve: smoke check failed: " + "; ".join(smoke["problems"]),
                                hint=f"details in {smoke_uri}")
        manifest.write(ctx.out_uri, stage=ctx.stage, run=ctx.recipe.name, config=config(ctx), inputs=inputs(ctx),
                       outputs={"smoke": smoke_uri, "endpoint": endpoint_uri},
                       started_at=started, summary={"model_ids": model_ids, "base_url": base_url})
        print(f"[serve] smoke check passed; {smoke_uri}", flush=True)
    except BaseException:
        stop(ctx)
        raise
    if ctx.options.get("detach"):
        print(f"[serve] left running at {base_url}; stop it with `workflow stop {ctx.recipe.path}`", flush=True)
    else:
        stop(ctx)
        print("[serve] shut down", flush=True)
    return StageResult(outputs={"smoke": smoke_uri, "endpoint": endpoint_uri}, summary={"model_ids": model_ids})
