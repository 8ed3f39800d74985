"""patches/ray_serve_llm_server.py: requests arriving together for an adapter a replica has not loaded load it once;
an adapter of a local folder is loaded from where it is.

vLLM refuses a second load of an adapter it holds ("has already been loaded"); Ray 2.60's
``LLMServer`` let every concurrent first request ask for a load, so all but one failed with
HTTP 500 (seen on a cluster once a lost replica's replacement was up: bench/README.md,
"Faults"). The engine here checks and loads as Ray's ``VLLMEngine.resolve_lora`` and vLLM's
loader do, with no model.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="Ray Serve LLM: serve environment")
# Replicas made without __init__: Ray's async __del__ then has nothing to close.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine 'LLMServer.__del__' was never awaited")

from ray import serve  # noqa: E402
from ray.llm._internal.serve.core.server.llm_server import LLMServer as RayLLMServer  # noqa: E402

from workflow.serving import app  # noqa: E402
from workflow.serving.llm_server import LLMServer  # noqa: E402


class Engine:
    """``resolve_lora`` as Ray's: return if vLLM lists the adapter, else ask vLLM to load it (which yields)."""

    def __init__(self):
        self.loaded: set[str] = set()
        self.loads = 0

    async def resolve_lora(self, disk_lora_model):
        if disk_lora_model.model_id in self.loaded:
            return
        await asyncio.sleep(0.01)  # vLLM reads the adapter's files
        if disk_lora_model.model_id in self.loaded:
            raise ValueError(f"Failed to load lora model: The lora adapter '{disk_lora_model.model_id}' has "
                             "already been loaded.")
        self.loaded.add(disk_lora_model.model_id)
        self.loads += 1


def server(cls) -> object:
    from workflow.serving.adapter_store import AdapterCatalogue

    replica = object.__new__(cls)  # no engine start: only what adapter resolution reads
    replica._llm_config = SimpleNamespace(lora_config=SimpleNamespace(dynamic_lora_loading_path="s3://b/adapters"))
    replica.engine = Engine()
    # The adapters folder, listed: "run" is there (a real folder listing is adapter_store's test).
    replica._workflow_adapters = AdapterCatalogue("s3://b/adapters", list_names=lambda uri: ["run"])

    async def load_model(model_id):
        return SimpleNamespace(model_id=model_id, local_path="/adapters/" + model_id)

    replica._load_model = load_model
    return replica


def resolve_together(replica, n: int) -> list:
    async def all_at_once():
        return await asyncio.gather(*(replica._maybe_resolve_lora_from_multiplex() for _ in range(n)),
                                    return_exceptions=True)

    return asyncio.run(all_at_once())


@pytest.fixture
def adapter_requested(monkeypatch):
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "viggo:run")


def test_concurrent_first_requests_load_the_adapter_once_and_all_succeed(adapter_requested):
    replica = server(LLMServer)
    assert resolve_together(replica, 4) == [None] * 4
    assert replica.engine.loads == 1
    assert resolve_together(replica, 3) == [None] * 3 and replica.engine.loads == 1


def test_an_adapter_the_folder_does_not_list_is_a_404_and_loads_nothing(monkeypatch):
    from fastapi import HTTPException

    replica = server(LLMServer)
    for name in ("viggo:nope", "viggo:../run", "viggo:run/../run"):
        monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda name=name: name)
        with pytest.raises(HTTPException) as refused:
            asyncio.run(replica._maybe_resolve_lora_from_multiplex())
        assert refused.value.status_code == 404 and name in refused.value.detail
    assert replica.engine.loads == 0


def test_base_model_requests_are_not_serialized(monkeypatch):
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "")
    replica = server(LLMServer)
    assert resolve_together(replica, 3) == [None] * 3 and replica.engine.loads == 0


def test_the_served_app_uses_it_where_there_are_adapters():
    from workflow.config import ServeConfig

    with_adapters = app.build_llm_config(ServeConfig(), model_source="/m", default_model_id="m",
                                         adapters_uri="s3://b/adapters", lora_rank=8)
    assert with_adapters["server_cls"] == app.SERVER
    assert app.validate_llm_config(with_adapters, "r.yaml").server_cls is LLMServer
    assert LLMServer.__name__ == RayLLMServer.__name__  # deployments keep their names (LLMServer:<model id>)
    without = app.build_llm_config(ServeConfig(), model_source="/m", default_model_id="m", adapters_uri=None,
                                   lora_rank=None)
    assert without["server_cls"] == app.SERVER  # with direct streaming its replicas check the key


def test_without_the_router_the_adapter_comes_from_the_request_body():
    """One replica is served without Ray's router, which otherwise names the adapter in a header."""
    import json

    from workflow.patches.ray_serve_llm_server import _AdapterFromBody

    seen = []

    async def app_behind(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        seen.append((serve.get_multiplexed_model_id(), body))

    middleware = _AdapterFromBody(app_behind, base_model_id="viggo")

    def call(*chunks: bytes, method: str = "POST") -> None:
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return messages.pop(0)

        asyncio.run(middleware({"type": "http", "method": method}, receive, None))

    body = json.dumps({"model": "viggo:run", "messages": [{"role": "user", "content": "hi"}]}).encode()
    call(body[:9], body[9:])  # the app still reads the whole body, in any number of messages
    call(b'{"model": "viggo"}')
    call(b'{"model": "other:run"}')
    call(b"not json")
    call(b"", method="GET")
    assert seen == [("viggo:run", body), ("", b'{"model": "viggo"}'), ("", b'{"model": "other:run"}'),
                    ("", b"not json"), ("", b"")]


def test_one_fixed_replica_is_served_without_the_router():
    from workflow.config import ServeConfig

    def config(deployment: dict, adapters: bool):
        llm = app.build_llm_config(ServeConfig(llm_config={"deployment_config": deployment}), model_source="/m",
                                   default_model_id="m", adapters_uri="s3://b/a" if adapters else None, lora_rank=8)
        return app.validate_llm_config(llm, "r.yaml")

    one = config({"num_replicas": 1}, adapters=True)
    assert app._one_replica(one) and app._reads_adapter_from_body(one)
    assert app._reads_adapter_from_body(config({"num_replicas": 1}, adapters=False))
    assert not app._one_replica(config({"num_replicas": 2}, adapters=True))
    assert not app._one_replica(config({"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}, adapters=True))
    theirs = config({"num_replicas": 1}, adapters=True).model_copy(update={"server_cls": RayLLMServer})
    assert not app._reads_adapter_from_body(theirs)  # Ray's class would not find the adapter


# ---------------------------------------------------------------- adapters of a local folder

def _folder_with_adapters(root, tiny: dict[str, bool]):
    """``root/adapters`` with a subfolder per name, complete (adapter_config.json written) or not."""
    folder = root / "adapters"
    for name, complete in tiny.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "adapter_model.safetensors").write_bytes(b"weights")
        if complete:
            (folder / name / "adapter_config.json").write_text('{"r": 8, "max_length": 512}')
    return folder


def test_a_local_folder_is_named_so_that_ray_accepts_it_and_lists_complete_adapters(tmp_path):
    from workflow.patches import ray_serve_adapter_folders as folders

    folder = _folder_with_adapters(tmp_path, {"viggo": True, "half-written": False})
    (folder / "notes.txt").write_text("not an adapter")
    uri = folders.served_uri(str(folder))
    assert uri == f"pyarrow-file://{folder.resolve()}" and folders.local_folder(uri) == folder.resolve()
    assert folders.served_uri("s3://b/adapters") == "s3://b/adapters" and folders.local_folder("s3://b/a") is None
    assert folders.list_adapters(uri) == ["viggo"]  # adapter_config.json comes last: a folder without it is not one
    assert folders.list_adapters(folders.served_uri(str(tmp_path / "none"))) == []
    from workflow.config import ServeConfig

    llm = app.build_llm_config(ServeConfig(), model_source="/m", default_model_id="m", adapters_uri=uri, lora_rank=8)
    assert app.validate_llm_config(llm, "r.yaml").lora_config.dynamic_lora_loading_path == uri


def test_an_adapter_of_a_local_folder_is_loaded_from_where_it_is(tmp_path):
    from fastapi import HTTPException

    from workflow.patches import ray_serve_adapter_folders as folders
    from workflow.patches.ray_serve_llm_server import _FolderLoader

    folder = _folder_with_adapters(tmp_path, {"viggo": True})
    llm_config = SimpleNamespace(lora_config=SimpleNamespace(dynamic_lora_loading_path=folders.served_uri(str(folder))))
    loader = _FolderLoader()
    loaded = asyncio.run(loader.load_model_from_config("m:viggo", llm_config))
    assert loaded.model_id == "m:viggo" and loaded.local_path == str(folder.resolve() / "viggo")
    assert loaded.max_total_tokens == 512
    with pytest.raises(HTTPException) as gone:
        asyncio.run(loader.load_model_from_config("m:removed", llm_config))
    assert gone.value.status_code == 404 and "m:removed" in gone.value.detail


def test_a_local_folder_is_refused_outside_the_tested_ray(monkeypatch, capsys):
    import workflow.patches as patches
    from workflow.patches import ray_serve_adapter_folders as folders

    assert patches.outside_tested(folders.TESTED) is None  # this environment's Ray
    monkeypatch.setattr(patches, "installed_version", lambda package: "0.1.0")
    monkeypatch.setattr(patches, "_warned", set())
    assert folders.served_uri("/runs/r/train/adapters") is None
    assert folders.served_uri("s3://b/adapters") == "s3://b/adapters"  # a bucket is Ray's own path
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert lines == ["warning: workflow.patches.ray_serve_adapter_folders not applied: ray 0.1.0 is outside the "
                     "versions it was tested on (==2.60.*); adapters in a local folder cannot be served (Ray Serve "
                     "LLM loads adapters from s3://, gs:// or Azure storage only)"]


def test_the_serving_gates_name_the_versions_the_patches_were_tested_on():
    """serving.app decides whether the replicas use the patched classes; it must use the patches' own versions."""
    import workflow.patches as patches
    from workflow.patches import ray_serve_ingress, ray_serve_llm_server

    assert app.SERVER_TESTED == ray_serve_llm_server.TESTED and app.INGRESS_TESTED == ray_serve_ingress.TESTED
    for tested in (ray_serve_llm_server.TESTED, ray_serve_ingress.TESTED):
        assert patches.outside_tested(tested) is None
