"""Serve stage: deploy the base model and the run's adapters as an OpenAI-compatible app.

``workflow serve RECIPE`` (and ``workflow run``) deploys, smoke-checks and shuts the app
down; ``--detach`` leaves it running; ``--stop`` (or ``workflow stop RECIPE``) shuts a
detached app down. The app is ``ray.serve.llm.build_openai_app``, deployed

- with ``RAY_ADDRESS`` set, into that cluster's Ray Serve as the application
  ``workflow-<recipe>`` at the route ``serve.route_prefix`` (default ``/<recipe>``; base URL
  ``http://<head>:<port><route>/v1``), beside other recipes' apps, listening on every node (``0.0.0.0``, Serve's
  port 8000 unless the recipe says otherwise; such an endpoint needs an API key or ``serve.allow_unauthenticated``).
  ``--detach`` again updates the app in place (Serve's rolling update). Without ``--detach`` the smoke check
  runs on a temporary app of its own (``workflow-<recipe>-check-<id>``), removed after, so a detached app
  of the recipe goes on answering. ``endpoint.json`` records the cluster and the detached application, so
  ``workflow stop`` finds it from any machine that can reach the cluster and the run's storage;
- else on a Ray cluster of the workflow's own on this machine that outlives this process
  (serving/cluster.py), the app at ``/``; its process group, address and URL are kept in a local state
  file, ``<scratch>/serve/state.json``. While a detached app runs there, a run without ``--detach`` is
  refused unless ``--replace`` (it would replace it).

Before anything is deployed, ``serve.require`` (the promotion gate, ``evaluation/gate.py``) keeps out each
adapter whose scores in the evaluate stage's ``metrics.json`` fall short, in one line; ``--adapters a,b``
picks which to expose. Fewer than all of the train stage's adapters are served from a copy holding only
those (``<run>/serve/adapters/<key>/``), so no other can be asked for by name.

Written to ``<run>/serve/``: ``smoke.json`` (the model ids served and what each answered),
``endpoint.json`` (URL, model ids, whether a key is needed, where the app runs, and once
stopped when; never the key) and a manifest naming both. The stage is not cacheable: every
call deploys.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from ..config.evaluate import ParityConfig
from ..core import envs, manifest, ray_cluster, storage
from ..core.console import say
from ..core.envs import SERVE
from ..core.errors import WorkflowError
from ..core.stage import StageContext, StageResult
from ..dataset.read import read_records
from ..evaluation import gate, parity, tasks
from ..evaluation.task_inference import stage_task
from ..inference.adapters import check_trained_on, lint_adapters, model_architectures, stored_adapters
from ..inference.processor import cpu_engine, note_emulated_bfloat16
from ..patches import ray_serve_adapter_folders, ray_serve_direct_streaming
from ..prompts import guard
from ..prompts.messages import expected_output, row_messages
from ..serving import app, client, cluster

ENV = SERVE
CACHEABLE = False
# The hub's token variables (huggingface_hub reads both).
HUB_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


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
    """The local cluster's state, trusted (its process group is signalled) only if this user wrote it."""
    path = _state_file(ctx)
    if path.exists() and not storage.owned_by_user(path):
        raise WorkflowError(f"{path}: not this user's file (or a link); it names processes the workflow would signal",
                            hint="remove it, and keep the workflow's cache folder (WORKFLOW_CACHE) your own")
    return json.loads(path.read_text()) if path.exists() else None


def _endpoint_uri(ctx: StageContext) -> str:
    return storage.join(ctx.out_uri, "endpoint.json")


def _recorded_endpoint(ctx: StageContext) -> dict | None:
    uri = _endpoint_uri(ctx)
    return storage.read_json(uri) if storage.exists(uri) else None


def _mark_stopped(ctx: StageContext) -> None:
    endpoint = _recorded_endpoint(ctx)
    if endpoint is not None and not endpoint.get("stopped_at"):
        storage.write_json(_endpoint_uri(ctx), {**endpoint, "stopped_at": manifest.now()})


def _stop_own_cluster(ctx: StageContext) -> bool:
    """End the workflow's own serving cluster of this recipe on this machine, if one runs."""
    state = _read_state(ctx)
    if state is None:
        return False
    say(f"[serve] stopping the app at {state.get('base_url')} (Ray cluster {state['address']})")
    cluster.stop_cluster(state)
    _state_file(ctx).unlink()
    _mark_stopped(ctx)
    return True


def stop(ctx: StageContext) -> bool:
    """Shut down the recipe's detached app, on this machine's own cluster or on the cluster the
    run's ``endpoint.json`` names (``RAY_ADDRESS`` wins); True if there was one."""
    if _stop_own_cluster(ctx):
        return True
    endpoint = _recorded_endpoint(ctx) or {}
    address = os.environ.get(ray_cluster.ADDRESS_ENV) or endpoint.get("ray_address")
    if not endpoint.get("app") or not address or endpoint.get("stopped_at"):
        return False
    say(f"[serve] stopping the application {endpoint['app']} on the Ray cluster at {address}")
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        found = app.delete(endpoint["app"])
    finally:
        ray.shutdown()
    _mark_stopped(ctx)
    return found


def refuse_replacing_a_live_app(ctx: StageContext) -> None:
    """A run without ``--detach`` on the workflow's own cluster would replace the recipe's detached app there
    (one app per cluster, and a second vLLM engine costs what this machine has): refused in one line while
    that app is live, unless ``--replace``. On a user's cluster the check runs as an app of its own instead.
    Called by the stage and, for ``workflow run``, before its first stage (workflow/preflight.py)."""
    if ctx.options.get("detach") or ctx.options.get("replace") or os.environ.get(ray_cluster.ADDRESS_ENV):
        return
    state = _read_state(ctx)
    if state is None or not cluster.cluster_alive(state):
        return
    command, recipe = envs.command(), ctx.recipe.path or ctx.recipe.name
    raise WorkflowError(f"{recipe}: serve: the app of {ctx.recipe.name} left running (--detach) is live at "
                        f"{state.get('base_url')}; a run without --detach would replace it with one it shuts down "
                        "after its smoke check",
                        hint=f"pass --replace to do so, --detach to redeploy it, or stop it first (`{command} stop "
                             f"{recipe}`)")


def _adapters(ctx: StageContext) -> tuple[str | None, list[str], int | None, list[dict]]:
    """(adapters folder, adapter names, LoRA rank, training rows for the smoke check)."""
    if ctx.recipe.train is None:
        return None, [], None, []
    train = ctx.upstream("train")
    adapters_dir = train["outputs"]["adapters_dir"]
    names = stored_adapters(adapters_dir)
    if not names:
        raise WorkflowError(f"serve: no adapter in {adapters_dir} (no <name>/adapter_config.json)",
                            hint="rerun the train stage")
    return adapters_dir, names, train["summary"].get("lora_rank"), _training_rows(ctx)


def _chosen_adapters(ctx: StageContext, adapters_dir: str | None, names: list[str]) -> tuple[list[str], str | None]:
    """(the adapters to deploy, the folder the replicas load them from): those ``--adapters`` picks (all by
    default) that pass ``serve.require`` (one line for each that does not); the train stage's folder when
    that is all of them, else a copy holding only those, so that no other adapter can be asked for."""
    if adapters_dir is None:
        return names, None
    stored, picked = names, ctx.options.get("adapters")
    if picked:
        unknown = [a for a in picked if a not in stored]
        if unknown:
            raise WorkflowError(f"serve --adapters: {', '.join(unknown)}: not among the run's adapters "
                                f"({', '.join(stored)})", hint="name adapters of the train stage's folder")
        names = [a for a in stored if a in picked]
    require = ctx.recipe.serve.require
    if require.metrics:
        results = storage.read_json(ctx.upstream("evaluate")["outputs"]["metrics.json"])
        names, refused = gate.gate(require, results, names, where=f"{ctx.recipe.path}")
        if not names:
            more = f" (and {len(refused) - 1} more adapter(s))" if len(refused) > 1 else ""
            raise WorkflowError(f"serve: {refused[0]}{more}; nothing was deployed",
                                hint="train a better adapter, or change serve.require in the recipe")
        for line in refused:
            say(f"[serve] {line}")
    if names == stored:
        return names, adapters_dir
    key = hashlib.sha256(json.dumps([ctx.upstream("train")["fingerprint"], names]).encode()).hexdigest()[:12]
    served = storage.join(ctx.out_uri, "adapters", key)
    for name in names:
        storage.copy_dir(storage.join(adapters_dir, name), storage.join(served, name), last=["adapter_config.json"])
    say(f"[serve] serving the adapters {', '.join(names)} (of {', '.join(stored)}) from {served}")
    return names, served


def _training_rows(ctx: StageContext) -> list[dict]:
    train_uri = ctx.upstream("ingest")["outputs"].get("train")
    if not train_uri:
        return []
    return read_records(train_uri, "jsonl")


def _smoke_metric(ctx: StageContext, rows: list[dict]):
    """(name, one row's score) of the metric ``serve.require`` names first, else of the evaluation task's main
    metric: the task the evaluate stage scores with (the recipe's, else the one the ingest stage recorded, else
    the one the training outputs read as); None without any."""
    cfg = stage_task(ctx.recipe.evaluate.task if ctx.recipe.evaluate is not None else None, ctx.upstream("ingest"),
                     "serve")
    outputs = [o for o in map(expected_output, rows) if o is not None]
    if cfg is None and not outputs:
        return None
    task = tasks.build(cfg, outputs, where=f"{ctx.recipe.path}: evaluate.task", stage="serve")
    name = next((m for m in ctx.recipe.serve.require.metrics if m in task.metrics), task.main_metric)
    return name, lambda expected, got: task.row_score(expected, got, metric=name)


def _parity_settings(ctx: StageContext) -> ParityConfig | None:
    """The parity rule of the recipe's evaluate section (one rule for both stages), or its defaults."""
    return ctx.recipe.evaluate.parity if ctx.recipe.evaluate is not None else ParityConfig()


def _parity_reference(ctx: StageContext, settings: ParityConfig, adapters_dir: str,
                      names: list[str]) -> tuple[list[list[dict]], int, dict] | None:
    """(rows as messages, max_tokens, each adapter's PEFT reference) for the live endpoint's parity check:
    the rows and max_tokens of the evaluate stage's, so its stored reference is reused; None without rows."""
    evaluate = ctx.recipe.evaluate
    split = evaluate.split if evaluate is not None else "test"
    uri = ctx.upstream("ingest")["outputs"].get(split)
    if not uri:
        say(f"[serve] parity: skipped (the ingest stage has no {split!r} split)")
        return None
    rows = [row_messages(row) for row in read_records(uri, "jsonl")[: settings.rows]]
    if evaluate is not None and evaluate.max_rows:
        rows = rows[: evaluate.max_rows]
    max_tokens = int(evaluate.sampling_params.get("max_tokens", 16)) if evaluate else ctx.recipe.serve.smoke.max_tokens
    template = parity.training_template(adapters_dir, names, ctx.recipe)
    dtype = parity.reference_dtype(settings, ctx.recipe.serve.llm_config.get("engine_kwargs"))
    # An engine on GPUs: the reference is a Ray task with one GPU, as in the evaluate stage (whose stored
    # reference this reuses when it has the same rows), not a model copied to this machine.
    on_gpu = not cpu_engine(ctx.recipe.serve.llm_config)
    reference = parity.stored_reference(
        model_manifest=ctx.upstream("model"), train_manifest=ctx.upstream("train"),
        adapters={name: storage.join(adapters_dir, name) for name in names}, rows=rows, template=template,
        dtype=dtype, max_tokens=max_tokens, cache_uri=parity.cache_uri(ctx.run_uri), scratch=ctx.scratch("parity"),
        gpus=1 if on_gpu else None)
    if on_gpu and not os.environ.get(ray_cluster.ADDRESS_ENV):
        import ray

        ray.shutdown()  # the task's private Ray; the app runs on the workflow's own serving cluster
    say(f"[serve] parity: {len(rows)} rows of {split!r}, PEFT reference ready ({dtype}"
        f"{', a Ray task with one GPU' if on_gpu else ''})")
    return rows, max_tokens, reference


def _endpoint_parity(ctx: StageContext, base_url: str, model_id: str, api_key: str | None,
                     checked: tuple[list[list[dict]], int, dict]) -> dict:
    """The live endpoint's greedy token ids for the parity rows, against the PEFT reference (smoke.json's
    ``parity``)."""
    rows, max_tokens, reference = checked
    decode = parity.token_decoder(ctx.upstream("model"))
    results = {}
    for name, ref in reference.items():
        served = [client.greedy_token_ids(base_url, f"{model_id}:{name}", messages, api_key=api_key,
                                          max_tokens=max_tokens) for messages in rows]
        results[name] = parity.compare([r["generated_ids"] for r in ref["rows"]], served, decode)
        say(f"[serve] parity: adapter {name}: {parity.describe(results[name])}")
    first = next(iter(reference.values()))
    return {"rows": len(rows), "max_tokens": max_tokens, "reference": parity.describe_reference(first),
            "adapters": results}


def _check_cluster_on_this_machine(ctx: StageContext, address: str) -> None:
    """A run in a local folder serves on a cluster whose every node is this machine (a workstation's
    ``ray start --head``): its replicas read the model and adapters where they are. Any other node is refused."""
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        off = ray_cluster.nodes_off_this_machine([n for n in ray.nodes() if n.get("Alive")])
    finally:
        ray.shutdown()
    if off:
        raise WorkflowError(f"serve: the run's storage {ctx.run_uri} is a folder on this machine, which the replicas "
                            f"on the cluster at {address} cannot load the model and adapters from (node {off[0]} "
                            f"is another machine{f', and {len(off) - 1} more' if len(off) > 1 else ''})",
                            hint="set the recipe's storage (or WORKFLOW_STORAGE) to s3://... or gs://..., or unset "
                                 "RAY_ADDRESS to serve on a cluster of the workflow's own on this machine")


def _serve_listening_at(ctx: StageContext, host: str, port: int, address: str) -> tuple[str, int]:
    """Where the cluster's Serve will answer: ours if Serve is not running yet, else where it already listens.

    A recipe that names another host or port than the running Serve's is refused (Serve would
    ignore it); with the defaults the app joins the running Serve, and one line says where.
    """
    running = app.running_http_options()
    if running is None or running == (host, port):
        return host, port
    cfg = ctx.recipe.serve
    clashes = [f"{key}: {asked}" for key, asked, there in (("host", cfg.host, running[0]), ("port", cfg.port, running[1]))
               if asked is not None and asked != there]
    if clashes:
        raise WorkflowError(f"{ctx.recipe.path}: serve: {', '.join(clashes)}: Ray Serve already runs on the cluster at "
                            f"{address}, listening on {running[0]}:{running[1]} (its HTTP options are fixed while it "
                            "runs)", hint=f"set serve.host: {running[0]} and serve.port: {running[1]} (or remove them), "
                                          "or serve on a cluster whose Serve is not started yet")
    say(f"[serve] Ray Serve already runs on the cluster, listening on {running[0]}:{running[1]}: the app joins it "
        "there")
    return running


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.serve
    started = manifest.now()
    if ctx.options.get("stop"):
        if not stop(ctx):
            say(f"[serve] no detached app is recorded for {ctx.recipe.name} ({_state_file(ctx)}, "
                f"{_endpoint_uri(ctx)})")
        return StageResult(outputs={})
    refuse_replacing_a_live_app(ctx)
    address = os.environ.get(ray_cluster.ADDRESS_ENV)
    detach = bool(ctx.options.get("detach"))
    try:
        cfg.check_open_endpoint(on_cluster=bool(address))
    except ValueError as err:
        raise WorkflowError(f"{ctx.recipe.path}: serve: {err}") from None
    try:
        api_key = cfg.api_key(os.environ)
    except ValueError as err:
        raise WorkflowError(f"{ctx.recipe.path}: {err}", hint=f"export {cfg.api_key_env}=<key>, or remove "
                            "serve.api_key_env for an open endpoint") from None
    if address and storage.is_local(ctx.run_uri):
        _check_cluster_on_this_machine(ctx, address)
    model = ctx.upstream("model")
    model_source = model["outputs"]["model"]
    adapters_dir, adapter_names, lora_rank, training = _adapters(ctx)
    adapter_names, served_dir = _chosen_adapters(ctx, adapters_dir, adapter_names)
    main_metric = _smoke_metric(ctx, training) if adapter_names else None
    rows = training[: cfg.smoke.rows]
    # The replicas load a local folder's adapters from where they are (patches/ray_serve_adapter_folders.py).
    adapters_uri = ray_serve_adapter_folders.served_uri(served_dir) if served_dir is not None else None
    if served_dir is not None and adapters_uri is None:
        raise WorkflowError(f"serve: the run's adapters are in a local folder ({served_dir}), which Ray Serve LLM "
                            f"loads adapters from only with the workflow's LLMServer, tested on ray "
                            f"{ray_serve_adapter_folders.TESTED['ray']}",
                            hint="use that Ray, or keep the run in a bucket (storage: s3://... or gs://...)")
    if cpu_engine(cfg.llm_config):
        note_emulated_bfloat16(cfg.llm_config.get("engine_kwargs") or {}, "serve.llm_config.engine_kwargs.dtype")
    if adapter_names:
        check_trained_on(ctx.upstream("train"), model, "serve")
        lint_adapters({name: storage.join(adapters_dir, name) for name in adapter_names}, "serve",
                      model_architectures(model_source, model.get("summary", {}).get("revision")),
                      engine_dtype=(cfg.llm_config.get("engine_kwargs") or {}).get("dtype"),
                      dtype_key="serve.llm_config.engine_kwargs.dtype")
    if adapters_dir is not None:
        guard.check_stored_adapters(adapters_dir, adapter_names, model_source, ctx.scratch("prompt-format"),
                                    where="serve", allow_mismatch=cfg.allow_prompt_mismatch,
                                    revision=model.get("summary", {}).get("revision"))
    parity_settings = _parity_settings(ctx)
    checked = None
    if adapter_names and parity_settings is not None:
        # Before the serving cluster takes the cores (and a GPU).
        checked = _parity_reference(ctx, parity_settings, adapters_dir, adapter_names)
    llm = app.build_llm_config(cfg, model_source=model_source, default_model_id=ctx.recipe.name,
                               adapters_uri=adapters_uri, lora_rank=lora_rank,
                               revision=model.get("summary", {}).get("revision"))
    app.validate_llm_config(app.with_cors_origins(llm, cfg), f"{ctx.recipe.path}: serve.llm_config")
    model_id = llm["model_loading_config"]["model_id"]
    model_ids = [model_id] + [f"{model_id}:{a}" for a in adapter_names]
    host = cfg.listen_host(on_cluster=bool(address))

    records_endpoint = detach or not address
    if address:
        # The user's cluster: its Ray Serve, its nodes' environments (checked), no state on this machine.
        if cfg.direct_streaming:
            say("[serve] serve.direct_streaming applies to the workflow's own cluster (it is a setting of the "
                "cluster's Serve controller); on this cluster the app runs behind the workflow ingress")
        direct_streaming = False
        # Each recipe's app at a route of its own. Without --detach the check runs as a temporary app (its own
        # name and route, removed after), so a detached app of the recipe goes on answering; it is never
        # recorded in endpoint.json, which names what `workflow stop` stops.
        name, route = app.app_name(ctx.recipe.name), cfg.route(ctx.recipe.name)
        if not detach:
            name = f"{name}-check-{uuid.uuid4().hex[:8]}"
            route = f"/{name}"
        port = cfg.port or 8000
        ray_cluster.init_ray(log_to_driver=False, storage_uri=ctx.run_uri, needs=("vllm",))
        import ray

        host, port = _serve_listening_at(ctx, host, port, address)

        public = host if host != "0.0.0.0" else ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
        base_url = f"http://{public}:{port}{route.rstrip('/')}/v1"
        # A detached app of the recipe already there is updated in place (Serve's rolling update).
        replacing = detach and app.application_status(name) is not None
        where = {"ray_address": address, "app": name}

        def undeploy() -> None:
            app.delete(name)
            ray.shutdown()
    else:
        # One app per cluster: at the root, where direct streaming's HAProxy routes (serve.route_prefix is for a
        # shared cluster).
        route, replacing = "/", False
        if cfg.route_prefix not in (None, "/"):
            say("[serve] serve.route_prefix applies on a cluster named by RAY_ADDRESS; the workflow's own cluster "
                "runs one app, at /")
        if _stop_own_cluster(ctx):
            say("[serve] replaced the app that was running")
        env_vars = {}
        direct_streaming = cfg.direct_streaming and ray_serve_direct_streaming.available()
        if direct_streaming:
            env_vars.update(app.direct_streaming_env(api_key, cfg))
        name = app.APP_NAME
        port = cfg.port or cluster.free_port()
        base_url = f"http://{host}:{port}/v1"
        where = {}
        say(f"[serve] starting a Ray cluster ({cfg.num_cpus} logical CPUs) for {model_id}")
        # A model in a folder or a bucket needs no hub token in the replicas, and Ray Serve LLM copies one it finds
        # in a replica's environment into the replica's runtime_env (ray.llm's ENV_VARS_TO_PROPAGATE), which Ray's
        # runtime-env agent writes to its log in full: the cluster is started without it.
        hub_model = storage.is_local(model_source) and not storage.local_path(model_source).exists()
        state = cluster.start_cluster(ctx.scratch("ray"), num_cpus=cfg.num_cpus, env_vars=env_vars,
                                      withheld=() if hub_model else HUB_TOKEN_VARS)
        state["base_url"] = base_url
        _state_file(ctx).write_text(json.dumps(state))

        def undeploy() -> None:
            _stop_own_cluster(ctx)
    try:
        if not address:
            cluster.connect(state)
        say(f"[serve] deploying build_openai_app as {name} on {base_url} (takes a minute or two on a CPU)")
        app.deploy(app.validate_llm_config(llm, f"{ctx.recipe.path}: serve.llm_config"), host=host,
                   port=port, ingress_cls_config=app.ingress_cls_config(api_key, cfg),
                   ingress_deployment_config=cfg.ingress_deployment_config, direct_streaming=direct_streaming,
                   name=name, route_prefix=route)
        if address:
            app.wait_until_deployed(name)
        client.wait_until_answering(base_url, model_id, api_key)
        say(client.usage_text(base_url, model_ids, cfg.api_key_env))
        smoke = client.smoke_check(base_url, model_id=model_id, adapters=adapter_names, rows=rows or
                                   [{"instruction": "Say hello.", "output": ""}], api_key=api_key,
                                   max_tokens=cfg.smoke.max_tokens, main_metric=main_metric)
        if checked is not None:
            smoke["parity"] = _endpoint_parity(ctx, base_url, model_id, api_key, checked)
        smoke_uri = storage.join(ctx.out_uri, "smoke.json")
        storage.write_json(smoke_uri, smoke)
        if checked is not None:
            for warning in parity.check(smoke["parity"]["adapters"], parity_settings.min_identical, where="serve",
                                        key="evaluate.parity", allow_mismatch=parity_settings.allow_mismatch):
                say(f"warning: {warning}; going on because evaluate.parity.allow_mismatch is true")
        if records_endpoint:
            endpoint = {"base_url": base_url, "model_ids": model_ids, "api_key_env": cfg.api_key_env,
                        "detached": detach, "route_prefix": route, **where}
            storage.write_json(_endpoint_uri(ctx), endpoint)
        if not smoke["passed"]:
            raise WorkflowError("serve: smoke check failed: " + "; ".join(smoke["problems"]),
                                hint=f"details in {smoke_uri}")
        # endpoint.json: this run's app, or one a run with --detach left (a check app is never recorded).
        outputs = {"smoke": smoke_uri, **({"endpoint": _endpoint_uri(ctx)} if storage.exists(_endpoint_uri(ctx))
                                          else {})}
        summary = {"model_ids": model_ids, **({"base_url": base_url} if records_endpoint else {})}
        manifest.write(ctx.out_uri, stage=ctx.stage, run=ctx.recipe.name, config=config(ctx), inputs=inputs(ctx),
                       outputs=outputs, started_at=started, summary=summary)
        say(f"[serve] smoke check passed; {smoke_uri}")
    except BaseException:
        if replacing:
            # Deleting it would take down what clients use: where the new replicas did not start, Serve keeps the
            # old ones serving.
            say(f"[serve] {name} ran before this deploy: left as Ray Serve has it now; stop it with "
                f"`{envs.command()} stop {ctx.recipe.path}`")
            ray.shutdown()
        else:
            undeploy()
            if records_endpoint:
                _mark_stopped(ctx)
        raise
    if detach:
        say(f"[serve] left running at {base_url}; stop it with `{envs.command()} stop {ctx.recipe.path}`")
        if address:
            ray.shutdown()
    else:
        undeploy()
        if records_endpoint:
            _mark_stopped(ctx)
        say(f"[serve] shut down{' the check app ' + name if address else ''}")
    return StageResult(outputs=outputs, summary={"model_ids": model_ids})
