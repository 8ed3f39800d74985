"""serving/llm_server.py: requests arriving together for an adapter a replica has not loaded load it once.

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
    replica = object.__new__(cls)  # no engine start: only what adapter resolution reads
    replica._llm_config = SimpleNamespace(lora_config=object())
    replica.engine = Engine()

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


def test_rays_server_fails_all_but_one_of_the_first_requests(adapter_requested):
    # What the fix is for: if Ray's own class stops failing so, the override can go.
    results = resolve_together(server(RayLLMServer), 4)
    assert sum(isinstance(r, ValueError) for r in results) == 3


def test_concurrent_first_requests_load_the_adapter_once_and_all_succeed(adapter_requested):
    replica = server(LLMServer)
    assert resolve_together(replica, 4) == [None] * 4
    assert replica.engine.loads == 1
    assert resolve_together(replica, 3) == [None] * 3 and replica.engine.loads == 1


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
    assert "server_cls" not in without
