"""Serve stage: recipe checks, and one detached deploy (tiny model, two adapters in the run's local folder).

The deploy takes minutes on the CPU, so the module deploys once (``served``) through the
CLI with ``--detach`` and runs every endpoint check against it; the last test stops it
and checks that nothing of the app's Ray cluster is left.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from workflow.config import ServeConfig, parse_recipe
from workflow.core import envs, manifest, storage
from workflow.core.errors import WorkflowError
from workflow.serving import app, client, cluster

RUN = "serve-test"
KEY_ENV = "WORKFLOW_TEST_SERVE_KEY"
KEY = "test-serve-key-0123456789"
ADAPTERS = ("viggo", "viggo2")
# serve.max_request_bytes of both deploys (tests/security_checks.py sends a larger body).
MAX_BODY = 2**20
# Rows of the test split the parity check sends to each adapter (fewer than its default 16: CPU time).
PARITY_ROWS = 3
LLM_CONFIG = {
    "accelerator_config": {"kind": "cpu"},
    "placement_group_config": {"bundles": [{"CPU": 1}]},
    "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
    "lora_config": {"max_num_adapters_per_replica": 2},
    "engine_kwargs": {"dtype": "float32", "enforce_eager": True, "max_model_len": 512},
}


def _recipe(serve: dict) -> dict:
    return {"name": RUN, "model": {"source": "tiny"}, "ingest": {"source": "/data/train.jsonl"},
            "train": {"llamafactory": {"stage": "sft"}}, "serve": serve}


def _parse(serve: dict):
    return parse_recipe(_recipe(serve), base_dir=Path("."), where="recipe.yaml")


# ---------------------------------------------------------------- the recipe section

def test_model_id_with_colon_is_refused():
    with pytest.raises(WorkflowError, match=r"recipe.yaml: serve: .*model_id: must not contain ':'"):
        _parse({"llm_config": {"model_loading_config": {"model_id": "qwen:7b"}}})


def test_adapter_limits_must_agree():
    with pytest.raises(WorkflowError, match=r"max_num_adapters_per_replica \(4\) must equal .*max_loras \(2\)"):
        _parse({"llm_config": {"lora_config": {"max_num_adapters_per_replica": 4}, "engine_kwargs": {"max_loras": 2}}})


def test_api_key_env_is_a_variable_name_not_a_key():
    with pytest.raises(WorkflowError, match="serve.api_key_env: .*NAME of an environment variable"):
        _parse({"api_key_env": "sk-live abc/123"})


def test_an_endpoint_reachable_from_other_hosts_needs_a_key_or_an_explicit_open():
    with pytest.raises(WorkflowError, match=r"serve: host: 0.0.0.0 is reachable from other hosts, and the endpoint "
                                            r"has no API key; set serve.api_key_env"):
        _parse({"host": "0.0.0.0"})
    assert _parse({"host": "0.0.0.0", "api_key_env": KEY_ENV}).serve.api_key_env == KEY_ENV
    assert _parse({"host": "0.0.0.0", "allow_unauthenticated": True}).serve.allow_unauthenticated
    assert _parse({"host": "127.0.0.1"}).serve.host == "127.0.0.1"
    # The default listens on loopback on the workflow's own cluster, on every interface on a user's cluster.
    cfg = _parse({}).serve
    assert cfg.listen_host(on_cluster=False) == "127.0.0.1" and cfg.listen_host(on_cluster=True) == "0.0.0.0"
    cfg.check_open_endpoint(on_cluster=False)
    with pytest.raises(ValueError, match="0.0.0.0 is reachable from other hosts"):
        cfg.check_open_endpoint(on_cluster=True)


def test_route_prefix_is_a_path_of_its_own():
    assert _parse({}).serve.route(RUN) == f"/{RUN}"  # the default on a user's cluster: /<recipe name>
    assert _parse({"route_prefix": "/team/viggo"}).serve.route(RUN) == "/team/viggo"
    assert _parse({"route_prefix": "/"}).serve.route(RUN) == "/"
    for bad in ("viggo", "/viggo/", "/a b", "/{x}"):
        with pytest.raises(WorkflowError, match=r"recipe.yaml: serve.route_prefix: .*give a path such as /viggo"):
            _parse({"route_prefix": bad})
    for clash in ("/viggo/v1", "/v1/x", "/-/routes"):
        with pytest.raises(WorkflowError, match=r"serve.route_prefix: .*clashes with the routes the app answers"):
            _parse({"route_prefix": clash})


def _evaluated(path: Path, scores: dict[str, float], require: dict) -> None:
    """The run of ``path`` with an evaluate stage that scored each variant's slot F1 as given (interval +-0.05)."""
    recipe = yaml.safe_load(path.read_text())
    recipe["serve"] = {"llm_config": LLM_CONFIG, "require": require}
    path.write_text(yaml.safe_dump(recipe))
    out = f"{recipe['storage']}/{recipe['name']}/evaluate"
    storage.write_json(f"{out}/metrics.json", {v: {"metrics": {"slot_f1": f, "function_accuracy": 1.0},
                                                   "intervals": {"slot_f1": [f - 0.05, f + 0.05]}}
                                               for v, f in scores.items()})
    manifest.write(out, stage="evaluate", run=recipe["name"], config={}, inputs={}, started_at=manifest.now(),
                   outputs={"metrics.json": f"{out}/metrics.json"})


def test_an_adapter_below_serve_require_is_not_deployed_with_one_line(make_run, tiny_adapter):
    path = make_run("serve-gate", adapters={"good": tiny_adapter, "weak": tiny_adapter})
    _evaluated(path, {"base": 0.1, "good": 0.9, "weak": 0.3}, {"at_least": {"slot_f1": 0.8}})

    def serve(*args: str) -> list[str]:
        proc = subprocess.run([envs.python_for(envs.SERVE), "-m", "workflow", "serve", str(path), *args],
                              env=envs.stage_environment(envs.SERVE), capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
        return errors[0]

    assert serve("--adapters", "weak") == ("error: serve: adapter 'weak' is not served: slot_f1 0.300 [0.250, 0.350] "
                                           "is below serve.require.at_least.slot_f1: 0.8; nothing was deployed "
                                           "(train a better adapter, or change serve.require in the recipe)")
    assert serve("--adapters", "good,nope").startswith("error: serve --adapters: nope: not among the run's adapters "
                                                       "(good, weak)")
    assert not storage.exists(f"{yaml.safe_load(path.read_text())['storage']}/serve-gate/serve/endpoint.json")


def test_the_gate_passes_each_adapter_on_its_own_scores():
    from workflow.config.serve import RequireConfig
    from workflow.evaluation import gate

    results = {v: {"metrics": {"slot_f1": f}, "intervals": {"slot_f1": [f - 0.1, f + 0.1]}}
               for v, f in {"base": 0.2, "a": 0.85, "b": 0.6, "b+constrained": 0.95}.items()}
    require = RequireConfig(at_least={"slot_f1": 0.5}, beats_base_by={"slot_f1": 0.5})
    passed, refused = gate.gate(require, results, ["a", "b", "c"], "r.yaml")
    assert passed == ["a"]
    # b is judged unconstrained (as clients get it), not on its constrained variant's 0.95.
    assert refused == ["adapter 'b' is not served: slot_f1 0.600 [0.500, 0.700] against the base's 0.200 "
                       "[0.100, 0.300] is short of serve.require.beats_base_by.slot_f1: 0.5",
                       "adapter 'c' is not served: it has no scores in the evaluate stage's metrics.json (variants: "
                       "base, a, b, b+constrained)"]
    with pytest.raises(WorkflowError, match=r"r.yaml: serve.require names 'rouge_l', which the evaluation does not"):
        gate.gate(RequireConfig(at_least={"rouge_l": 0.5}), results, ["a"], "r.yaml")


def test_unknown_own_key_is_refused():
    with pytest.raises(WorkflowError, match=r"serve.prot: unknown key"):
        _parse({"prot": 8001})


def test_direct_streaming_has_no_ingress_options():
    with pytest.raises(WorkflowError, match=r"serve: ingress_deployment_config: not used with direct_streaming"):
        _parse({"direct_streaming": True, "ingress_deployment_config": {"num_replicas": 1}})
    assert _parse({"direct_streaming": True}).serve.direct_streaming


def test_run_fills_model_adapters_and_lora_limits():
    cfg = ServeConfig(llm_config={"lora_config": {"max_num_adapters_per_replica": 3}})
    llm = app.build_llm_config(cfg, model_source="s3://b/run/model/weights", default_model_id="viggo",
                                   adapters_uri="s3://b/run/train/adapters", lora_rank=12)
    assert llm["model_loading_config"] == {"model_id": "viggo", "model_source": "s3://b/run/model/weights"}
    assert llm["lora_config"] == {"max_num_adapters_per_replica": 3, "dynamic_lora_loading_path": "s3://b/run/train/adapters"}
    assert llm["engine_kwargs"] == {"enable_lora": True, "max_loras": 3, "max_lora_rank": 16}
    assert cfg.llm_config == {"lora_config": {"max_num_adapters_per_replica": 3}}  # the recipe is not modified


def test_recipe_keys_win_over_run_values():
    cfg = ServeConfig(llm_config={"model_loading_config": {"model_id": "mine", "model_source": "/models/x"},
                                  "engine_kwargs": {"max_loras": 2, "max_lora_rank": 64}})
    llm = app.build_llm_config(cfg, model_source="/run/model", default_model_id="run", adapters_uri="s3://b/a",
                                   lora_rank=8)
    assert llm["model_loading_config"] == {"model_id": "mine", "model_source": "/models/x"}
    assert llm["engine_kwargs"]["max_lora_rank"] == 64
    assert llm["lora_config"]["max_num_adapters_per_replica"] == 2


def test_llm_config_is_validated_against_ray():
    good = app.build_llm_config(ServeConfig(llm_config=LLM_CONFIG), model_source="/m", default_model_id="m",
                                    adapters_uri="s3://b/adapters", lora_rank=8)
    assert app.validate_llm_config(good, "r.yaml").model_id == "m"
    with pytest.raises(WorkflowError, match=r"^r.yaml: serve.llm_config: engine_kwarg: "):
        app.validate_llm_config({**good, "engine_kwarg": {}}, "r.yaml: serve.llm_config")
    local = {**good, "lora_config": {"dynamic_lora_loading_path": "/local/adapters"}}
    with pytest.raises(WorkflowError, match=r"serve.llm_config: lora_config: .*'/local/adapters'"):
        app.validate_llm_config(local, "r.yaml: serve.llm_config")


def test_usage_text_names_the_variable_not_the_key():
    text = client.usage_text("http://127.0.0.1:9/v1", ["m", "m:a"], "MY_KEY")
    assert 'Authorization: Bearer $MY_KEY' in text and 'os.environ["MY_KEY"]' in text
    assert '"model": "m:a"' in text and "OpenAI(base_url=\"http://127.0.0.1:9/v1\"" in text


def test_smoke_similarity_counts_every_character():
    # difflib's autojunk would ignore '[' in targets over 200 characters and score 0.
    target = "inform(" + ", ".join(f"attr{i}[value {i}]" for i in range(20)) + ")"
    assert len(target) > 200
    assert client.similarity("[[[[", target) > 0
    assert client.similarity(target, target) == 1.0


def test_a_head_that_exited_is_not_alive_though_not_yet_reaped():
    """The serve stage without --detach (and the benches) stop the cluster they started: its
    head is their child, and its zombie must not count as a running cluster (that made every
    such stop wait out both of its 30 s signal rounds)."""
    import psutil

    head = subprocess.Popen(["true"], start_new_session=True)
    deadline = time.monotonic() + 10
    while psutil.Process(head.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cluster.cluster_alive({"pid": head.pid})
    assert not psutil.pid_exists(head.pid)


def test_stop_ends_processes_of_the_cluster_outside_its_group():
    """Ray workers sit outside the head's process group (CI once found a replica's
    VLLM::EngineCore and VLLM::Worker alive after stop): stop ends every process carrying the
    cluster's marker and their descendants, with SIGKILL where SIGTERM is ignored."""
    import os
    import sys

    import psutil

    address = f"127.0.0.1:{cluster.free_port()}"
    head = subprocess.Popen(["true"], start_new_session=True)
    head.wait()  # the head's group is gone, as after the killpg
    # A marked process in a session of its own, and its child with an environment of its own;
    # both ignore SIGTERM.
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    child = ignore_term + "time.sleep(600)"
    parent = (ignore_term + f"import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', {child!r}], env={{}}); "
              "print(c.pid, flush=True); time.sleep(600)")
    stray = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True, stdout=subprocess.PIPE,
                             env={**os.environ, cluster.CLUSTER_MARKER: address}, text=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True,
                             env={**os.environ, cluster.CLUSTER_MARKER: "127.0.0.1:1"})
    grandchild = psutil.Process(int(stray.stdout.readline()))
    try:
        assert sorted(p.pid for p in cluster.cluster_processes(address)) == sorted([stray.pid, grandchild.pid])
        cluster.stop_cluster({"pid": head.pid, "address": address}, timeout_s=4)
        # Both ignore SIGTERM, so gone means killed (psutil reaped the child: no exit code to read).
        assert stray.poll() is not None and not grandchild.is_running()
        assert other.poll() is None  # another cluster's process is left alone
    finally:
        for proc in (stray, other):
            proc.kill()
            proc.wait()
        if grandchild.is_running():
            grandchild.kill()


# ---------------------------------------------------------------- one detached deploy

def _cluster_pids(address: str) -> dict[int, str]:
    """Processes of the app's cluster (they inherit its marker variable), with their titles."""
    found = {}
    marker = f"{cluster.CLUSTER_MARKER}={address}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def _layout_run(run_uri: str, tiny_model: Path, tiny_adapter: Path, viggo_alpaca: Path) -> None:
    """The manifests and files the ingest, model and train stages would have written."""
    train_rows = storage.join(run_uri, "ingest", "train.jsonl")
    storage.write_bytes(train_rows, (viggo_alpaca / "train.jsonl").read_bytes())
    test_rows = storage.join(run_uri, "ingest", "test.jsonl")
    storage.write_text(test_rows, "".join((viggo_alpaca / "test.jsonl").read_text().splitlines(True)[:PARITY_ROWS]))
    for name in ADAPTERS:
        storage.upload_dir(tiny_adapter, storage.join(run_uri, "train", "adapters", name), last=["adapter_config.json"])
    common = {"run": RUN, "config": {}, "inputs": {}, "started_at": manifest.now()}
    manifest.write(storage.join(run_uri, "ingest"), stage="ingest", outputs={"train": train_rows, "test": test_rows},
                   **common)
    manifest.write(storage.join(run_uri, "model"), stage="model", outputs={"model": str(tiny_model)}, **common)
    manifest.write(storage.join(run_uri, "train"), stage="train", summary={"adapter_name": "viggo", "lora_rank": 8},
                   outputs={"adapter": storage.join(run_uri, "train", "adapters", "viggo"),
                            "adapters_dir": storage.join(run_uri, "train", "adapters")}, **common)


def _workflow(*args: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([envs.python_for(envs.SERVE), "-m", "workflow.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def served(tiny_model, tiny_adapter, viggo_alpaca, tmp_path_factory):
    """The run in a local folder, as the CPU recipe's: the replicas load its adapters from there
    (patches/ray_serve_llm_server.py; a run in a bucket is served on the namespace cluster, tests/test_on_a_cluster.py)."""
    tmp = tmp_path_factory.mktemp("serve")
    storage_uri = str(tmp / "runs")
    run_uri = f"{storage_uri}/{RUN}"
    _layout_run(run_uri, tiny_model, tiny_adapter, viggo_alpaca)
    # Where the adapter name "../x" would lead Ray (beside the adapters folder): the name must be refused.
    storage.upload_dir(tiny_adapter, f"{run_uri}/train/x", last=["adapter_config.json"])
    # A third adapter that serve.require keeps out (the scores are written here, not measured: the gate reads them).
    storage.upload_dir(tiny_adapter, f"{run_uri}/train/adapters/weak", last=["adapter_config.json"])
    scores = {"base": 0.0, "viggo": 0.9, "viggo2": 0.9, "weak": 0.1}
    storage.write_json(f"{run_uri}/evaluate/metrics.json", {v: {"metrics": {"slot_f1": f}, "intervals": {
        "slot_f1": [f, f]}} for v, f in scores.items()})
    manifest.write(f"{run_uri}/evaluate", stage="evaluate", run=RUN, config={}, inputs={}, started_at=manifest.now(),
                   outputs={"metrics.json": f"{run_uri}/evaluate/metrics.json"})
    serve = {"api_key_env": KEY_ENV, "port": cluster.free_port(), "ingress_deployment_config": {"num_replicas": 1},
             "smoke": {"rows": 2, "max_tokens": 32}, "llm_config": LLM_CONFIG, "max_request_bytes": MAX_BODY,
             "require": {"at_least": {"slot_f1": 0.5}}}
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**_recipe(serve), "storage": storage_uri}))
    env = {**envs.stage_environment(envs.SERVE), KEY_ENV: KEY, "WORKFLOW_CACHE": str(tmp / "cache")}
    proc = _workflow("serve", str(recipe), "--detach", env=env)
    state_file = tmp / "cache" / RUN / "serve" / "state.json"
    info = {"proc": proc, "recipe": recipe, "env": env, "run_uri": f"{storage_uri}/{RUN}", "state_file": state_file,
            "base_url": f"http://127.0.0.1:{serve['port']}/v1"}
    yield info
    _workflow("stop", str(recipe), env=env, timeout=300)


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _assert_parity(smoke: dict, out: str) -> None:
    """The live endpoint's greedy tokens (return_token_ids) agree with PEFT's at the default threshold."""
    from workflow.config.evaluate import ParityConfig

    checked = smoke["parity"]
    assert checked["rows"] == PARITY_ROWS and checked["max_tokens"] == 32 and set(checked["adapters"]) == set(ADAPTERS)
    for name, result in checked["adapters"].items():
        assert result["share_identical"] >= ParityConfig().min_identical, (name, result)
        assert result["mean_common_prefix"] > 0
        assert f"[serve] parity: adapter {name}: {result['identical']}/{PARITY_ROWS} rows identical to training" in out


def test_deploy_prints_usage_and_records_the_smoke_check(served):
    proc = served["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    ids = [RUN] + [f"{RUN}:{a}" for a in ADAPTERS]
    assert f"base URL: {served['base_url']}" in out and "models:   " + ", ".join(ids) in out
    assert f'curl -H "Authorization: Bearer ${KEY_ENV}" {served["base_url"]}/models' in out
    assert "from openai import OpenAI" in out
    smoke = storage.read_json(f"{served['run_uri']}/serve/smoke.json")
    assert smoke["passed"] and smoke["model_ids"] == ids and set(ids) <= set(smoke["listed"])
    for adapter in ids[1:]:
        assert smoke["models"][adapter]["beats_base"]
    _assert_parity(smoke, out)
    written = manifest.read(f"{served['run_uri']}/serve")
    assert written["summary"]["model_ids"] == ids
    endpoint = storage.read_json(written["outputs"]["endpoint"])
    assert endpoint["api_key_env"] == KEY_ENV and endpoint["detached"]
    for text in (out, proc.stderr, json.dumps(smoke), json.dumps(written), json.dumps(endpoint)):
        assert KEY not in text


def test_models_lists_base_and_adapters(served):
    import httpx

    resp = httpx.get(f"{served['base_url']}/models", headers=_auth(), timeout=60)
    assert resp.status_code == 200
    assert {m["id"] for m in resp.json()["data"]} == {RUN, *(f"{RUN}:{a}" for a in ADAPTERS)}


def test_streams_from_base_and_each_adapter(served):
    from openai import OpenAI

    client = OpenAI(base_url=served["base_url"], api_key=KEY, timeout=120)
    messages = [{"role": "user", "content": "Dirt: Showdown from 2012 is a sport racing game."}]
    answers = {}
    for model in [RUN] + [f"{RUN}:{a}" for a in ADAPTERS]:
        chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=messages, max_tokens=16, temperature=0.0, stream=True) if c.choices]
        assert sum(1 for c in chunks if c) > 1, (model, chunks)  # streamed, not one block
        answers[model] = "".join(chunks)
    assert answers[f"{RUN}:viggo"] != answers[RUN]  # the adapter is applied
    assert answers[f"{RUN}:viggo"] == answers[f"{RUN}:viggo2"]  # same weights, same answer


def test_an_adapter_the_gate_keeps_out_is_not_served(served):
    import httpx

    assert ("[serve] adapter 'weak' is not served: slot_f1 0.100 [0.100, 0.100] is below "
            "serve.require.at_least.slot_f1: 0.5") in served["proc"].stdout
    resp = httpx.post(f"{served['base_url']}/chat/completions", headers=_auth(), timeout=120,
                      json={"model": f"{RUN}:weak", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert resp.status_code == 404, resp.text  # in the train stage's folder, not in the one the app loads from


def test_unknown_adapter_is_an_error_not_a_hang(served):
    import httpx

    started = time.monotonic()
    resp = httpx.post(f"{served['base_url']}/chat/completions", headers=_auth(), timeout=120,
                      json={"model": f"{RUN}:nope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert 400 <= resp.status_code < 500 and time.monotonic() - started < 90, resp.text
    assert "nope" in resp.json().get("error", {}).get("message", ""), resp.text


def test_bad_request_gets_an_openai_error(served):
    import httpx

    resp = httpx.post(f"{served['base_url']}/chat/completions", headers=_auth(), timeout=60,
                      json={"model": RUN, "max_tokens": 4})
    assert resp.status_code == 400
    assert set(resp.json()["error"]) >= {"message", "type"}


def test_api_key_is_enforced_except_on_the_health_check(served):
    import httpx

    for headers in ({}, _auth("wrong-key"), {"Authorization": KEY}):
        for method, path, body in (("GET", "/models", None), ("POST", "/chat/completions",
                                                              {"model": RUN, "messages": [{"role": "user", "content": "hi"}]})):
            resp = httpx.request(method, served["base_url"] + path, json=body, headers=headers, timeout=60)
            assert resp.status_code == 401, (headers, path, resp.text)
            assert resp.json()["error"]["code"] == "invalid_api_key"
    health = httpx.get(served["base_url"].removesuffix("/v1") + "/-/healthz", timeout=30)
    assert health.status_code == 200


def test_the_ingress_app_guards_every_route_and_names_adapters_from_the_list(served):
    """tests/security_checks.py against the workflow ingress (issue 36); "../x" would reach the adapter planted at
    train/x, so its 404 shows the name was refused before Ray read storage."""
    import httpx
    import security_checks as attack

    root = served["base_url"].removesuffix("/v1")
    routes = attack.app_routes(served["state_file"], "WorkflowIngress")
    attack.check_every_route_needs_the_key(root, routes, f"{RUN}:viggo", KEY)
    attack.check_bodies_over_the_limit_are_refused(root, RUN, KEY, MAX_BODY)
    attack.check_adapter_names_come_from_the_list(root, RUN, KEY)
    card = httpx.get(f"{root}/v1/models/{RUN}:nope", headers=_auth(), timeout=60)
    assert card.status_code == 404 and set(card.json()["error"]) >= {"message", "type", "code"}, card.text
    attack.check_no_serving_listener_off_loopback(json.loads(served["state_file"].read_text())["address"])


def test_a_run_without_detach_is_refused_while_the_detached_app_is_live(served):
    """It would replace the detached app on the workflow's own cluster: one line, at the start of `workflow run`
    too (before its first stage), and the app goes on answering."""
    import httpx

    expected = (f"error: {served['recipe']}: serve: the app of {RUN} left running (--detach) is live at "
                f"{served['base_url']}; a run without --detach would replace it with one it shuts down after its "
                "smoke check (pass --replace to do so, --detach to redeploy it, or stop it first")
    for args in (("serve",), ("run", "--stages", "serve")):
        proc = _workflow(*args, str(served["recipe"]), env=served["env"], timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert errors[0].startswith(expected), errors[0]
        assert f"run {RUN}:" not in proc.stdout and "deploying" not in proc.stdout
    assert httpx.get(f"{served['base_url']}/models", headers=_auth(), timeout=60).status_code == 200


def test_an_adapter_added_after_the_deploy_is_served_and_a_removed_one_is_a_404(served, tiny_adapter):
    """The replicas load the adapters of the run's local folder themselves: one copied into the folder the app
    serves from is answered once the listings (every 5 s) have seen it; once removed, it is OpenAI's 404."""
    import shutil

    import httpx

    (folder,) = Path(served["run_uri"], "serve", "adapters").iterdir()  # the copy without 'weak' (serve.require)
    later = f"{RUN}:later"

    def ask() -> httpx.Response:
        return httpx.post(f"{served['base_url']}/chat/completions", headers=_auth(), timeout=120, json={
            "model": later, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0.0})

    def listed() -> set[str]:
        return {m["id"] for m in httpx.get(f"{served['base_url']}/models", headers=_auth(), timeout=60).json()["data"]}

    storage.upload_dir(tiny_adapter, str(folder / "later"), last=["adapter_config.json"])
    try:
        deadline = time.monotonic() + 60
        while (resp := ask()).status_code == 404 and time.monotonic() < deadline:
            time.sleep(1)
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"], resp.text
        assert later in listed()
    finally:
        shutil.rmtree(folder / "later")
    deadline = time.monotonic() + 60
    while (resp := ask()).status_code == 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert resp.status_code == 404, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", error
    assert f"The model '{later}' does not exist." in error["message"]
    assert later not in listed()


def _adapter_metrics(base_url: str) -> dict[tuple[str, str], float]:
    """``GET <route>/metrics`` parsed by prometheus_client: (sample name, model label) -> value."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(base_url.removesuffix("/v1") + "/metrics", headers=_auth(), timeout=120)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain"), resp.text
    return {(s.name, s.labels.get("model")): s.value for family in text_string_to_metric_families(resp.text)
            if family.name.startswith("workflow_adapter_") for s in family.samples if "le" not in s.labels}


def test_per_adapter_metrics_behind_the_key(served):
    """Requests, errors, generated tokens and TTFT by adapter (the ingress), adapter loads (the LLM replica);
    after the adapter added and removed above was loaded into the 2 slots, the others are loaded again."""
    import httpx

    assert httpx.get(served["base_url"].removesuffix("/v1") + "/metrics", timeout=60).status_code == 401
    before = _adapter_metrics(served["base_url"])
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "min_tokens": 4, "ignore_eos": True,
            "temperature": 0.0}
    for model in (f"{RUN}:viggo", f"{RUN}:viggo2", f"{RUN}:viggo2"):
        with httpx.stream("POST", f"{served['base_url']}/chat/completions", headers=_auth(), timeout=120,
                          json={**body, "model": model, "stream": True}) as resp:
            assert resp.status_code == 200 and "data: [DONE]" in resp.read().decode()
    missing = httpx.post(f"{served['base_url']}/chat/completions", headers=_auth(), timeout=120,
                         json={**body, "model": f"{RUN}:nope"})
    assert missing.status_code == 404
    after = _adapter_metrics(served["base_url"])

    def grew(name: str, model: str) -> float:
        return after.get((name, model), 0) - before.get((name, model), 0)

    viggo, viggo2 = f"{RUN}:viggo", f"{RUN}:viggo2"
    assert grew("workflow_adapter_requests_total", viggo2) == 2 and grew("workflow_adapter_requests_total", viggo) == 1
    assert grew("workflow_adapter_generated_tokens_total", viggo2) == 8
    assert grew("workflow_adapter_time_to_first_token_seconds_count", viggo2) == 2
    assert grew("workflow_adapter_time_to_first_token_seconds_sum", viggo2) > 0
    assert grew("workflow_adapter_errors_total", viggo2) == 0
    assert grew("workflow_adapter_requests_total", "<unknown>") == grew("workflow_adapter_errors_total", "<unknown>") == 1
    assert not [key for key in after if key[1] == f"{RUN}:nope"]  # a 404's name is no label
    for model in (viggo, viggo2):
        loads = after[("workflow_adapter_loads_total", model)]
        assert loads >= 1 and after[("workflow_adapter_load_seconds_count", model)] == loads
        assert after.get(("workflow_adapter_reloads_total", model), 0) == loads - 1
    if after.get(("workflow_adapter_loads_total", f"{RUN}:later")):  # the test above ran: one of the two was evicted
        assert grew("workflow_adapter_reloads_total", viggo) + grew("workflow_adapter_reloads_total", viggo2) >= 1


def test_an_adapter_over_the_served_rank_is_refused_in_one_line_not_loaded(served, tiny_adapter):
    """The served max_lora_rank is the train stage's rank, 8: an adapter of rank 16 put into the folder gets
    OpenAI's 400 naming the rank at its first request, and the replica loads nothing for it."""
    import shutil

    import httpx

    (folder,) = Path(served["run_uri"], "serve", "adapters").iterdir()
    shutil.copytree(tiny_adapter, folder / "wide")
    config = json.loads((folder / "wide" / "adapter_config.json").read_text())
    (folder / "wide" / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    try:
        deadline = time.monotonic() + 60
        while True:
            resp = httpx.post(f"{served['base_url']}/chat/completions", headers=_auth(), timeout=120, json={
                "model": f"{RUN}:wide", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            if resp.status_code != 404 or time.monotonic() > deadline:  # 404 until the listing (every 5 s) sees it
                break
            time.sleep(1)
    finally:
        shutil.rmtree(folder / "wide")
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["message"] == (f"The model '{RUN}:wide' cannot be served: adapter 'wide' has LoRA rank 16, over the "
                                "served model's max_lora_rank 8 (serve.llm_config.engine_kwargs.max_lora_rank).")
    assert error["type"] == "invalid_request_error"
    assert _adapter_metrics(served["base_url"]).get(("workflow_adapter_loads_total", f"{RUN}:wide"), 0) == 0


def test_stop_leaves_no_application_or_replica_behind(served):
    import httpx

    state = json.loads(served["state_file"].read_text())
    before = _cluster_pids(state["address"])
    titles = " ".join(before.values())
    assert "ServeReplica:workflow:WorkflowIngress" in titles
    assert "ServeReplica:workflow:LLMServer" in titles and "ServeController" in titles

    proc = _workflow("stop", str(served["recipe"]), env=served["env"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopping the app" in proc.stdout
    deadline = time.monotonic() + 60
    while _cluster_pids(state["address"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert _cluster_pids(state["address"]) == {}
    assert not served["state_file"].exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{served['base_url']}/models", headers=_auth(), timeout=10)
    again = _workflow("stop", str(served["recipe"]), env=served["env"], timeout=300)
    assert again.returncode == 0 and "no detached app is recorded" in again.stdout


def test_direct_streaming_serves_base_and_adapters_behind_haproxy(tiny_model, tiny_adapter, viggo_alpaca,
                                                                  tmp_path):
    """serve.direct_streaming: vLLM's app in the LLM replica, HAProxy in front, the key checked by vLLM.

    The run is in a local folder, as the CPU recipe's: the replica loads the adapters from there, an adapter
    trained into the folder after the deploy too.
    One fixed replica, as the CPU recipe's: no router deployment; the replica finds the adapter
    named in the request body (patches/ray_serve_llm_server.py).
    """
    import httpx
    from openai import OpenAI

    storage_uri = str(tmp_path / "runs")
    _layout_run(f"{storage_uri}/{RUN}", tiny_model, tiny_adapter, viggo_alpaca)
    port = cluster.free_port()
    serve = {"api_key_env": KEY_ENV, "port": port, "direct_streaming": True, "smoke": {"rows": 2, "max_tokens": 32},
             "llm_config": {**LLM_CONFIG, "deployment_config": {"num_replicas": 1}}, "max_request_bytes": MAX_BODY}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**_recipe(serve), "storage": storage_uri}))
    env = {**envs.stage_environment(envs.SERVE), KEY_ENV: KEY, "WORKFLOW_CACHE": str(tmp_path / "cache")}
    proc = _workflow("serve", str(recipe), "--detach", env=env)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        smoke = storage.read_json(f"{storage_uri}/{RUN}/serve/smoke.json")
        assert smoke["passed"] and all(smoke["models"][f"{RUN}:{a}"]["beats_base"] for a in ADAPTERS)
        _assert_parity(smoke, proc.stdout)
        state = json.loads((tmp_path / "cache" / RUN / "serve" / "state.json").read_text())
        titles = " ".join(_cluster_pids(state["address"]).values())
        assert "haproxy" in titles and "WorkflowIngress" not in titles and "OpenAiIngress" not in titles
        assert "LLMRouter" not in titles

        base_url = f"http://127.0.0.1:{port}/v1"
        client = OpenAI(base_url=base_url, api_key=KEY, timeout=120)
        messages = [{"role": "user", "content": "Dirt: Showdown from 2012 is a sport racing game."}]
        answers = {}
        for model in (RUN, f"{RUN}:viggo"):
            chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=model, messages=messages, max_tokens=16, temperature=0.0, stream=True) if c.choices]
            assert sum(1 for c in chunks if c) > 1, (model, chunks)
            answers[model] = "".join(chunks)
        assert answers[f"{RUN}:viggo"] != answers[RUN]
        resp = httpx.post(f"{base_url}/chat/completions", json={"model": RUN, "messages": messages}, timeout=60)
        assert resp.status_code == 401, resp.text

        storage.upload_dir(tiny_adapter, f"{storage_uri}/{RUN}/train/adapters/later", last=["adapter_config.json"])
        _guards_every_route(base_url.removesuffix("/v1"), tmp_path / "cache" / RUN / "serve" / "state.json")
        deadline, later = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            later = httpx.post(f"{base_url}/chat/completions", headers=_auth(), timeout=120, json={
                "model": f"{RUN}:later", "messages": messages, "max_tokens": 16, "temperature": 0.0})
            if later.status_code == 200:
                break
            time.sleep(2)
        assert later.status_code == 200, later.text
        assert later.json()["choices"][0]["message"]["content"] == answers[f"{RUN}:viggo"]
        for text in (proc.stdout, proc.stderr, json.dumps(smoke)):
            assert KEY not in text
    finally:
        stopped = _workflow("stop", str(recipe), env=env, timeout=300)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    deadline = time.monotonic() + 60
    while _cluster_pids(state["address"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert _cluster_pids(state["address"]) == {}


def _guards_every_route(root: str, state_file: Path) -> None:
    """tests/security_checks.py against vLLM's app behind the workflow's LLMServer (issue 36), once the adapter
    "later" is in the adapters folder but not loaded: a request without the key that names it loads nothing."""
    import httpx
    import security_checks as attack

    def loaded() -> set[str]:  # vLLM's list: the base model and the adapters the engine holds
        return {m["id"] for m in httpx.get(f"{root}/v1/models", headers=_auth(), timeout=60).json()["data"]}

    time.sleep(10)  # the replica's adapter listing (every 5 s) picks "later" up
    before = loaded()
    assert f"{RUN}:later" not in before, before
    attack.check_every_route_needs_the_key(root, attack.app_routes(state_file, "LLMServer"), f"{RUN}:later", KEY)
    assert loaded() == before
    attack.check_bodies_over_the_limit_are_refused(root, RUN, KEY, MAX_BODY)
    attack.check_adapter_names_come_from_the_list(root, RUN, KEY)
    attack.check_no_serving_listener_off_loopback(json.loads(state_file.read_text())["address"])
