"""Failures knowable before the expensive stages, reported before them in one ``error:`` line.

Three places, by what a check needs:

- :func:`check_recipe` needs the recipe alone (no data, no network): ``workflow validate`` and the
  start of ``workflow run`` call it. An endpoint that will listen beyond loopback without an API
  key; an adapter rank the recipe's engines cannot hold.
- :func:`check_before_run` is the start of ``workflow run``: a local model folder exists, the key's
  variable is set, no detached app of the recipe on the workflow's own cluster would be replaced by a
  run without ``--detach`` (unless ``--replace``), the run's storage is reachable and writable, a cluster
  named by ``RAY_ADDRESS`` has the stages' environments on every node, a run on a cluster keeps
  its storage in a bucket, and an ingest stage that will be skipped already read the data as a task
  the evaluate section contradicts.
- ``check_task`` (``workflow/evaluation/task_inference.py``, below the stages, which call it) needs the
  training outputs: the ingest stage calls it right after reading
  them (the task it infers is written to its ``stats.json`` and manifest; an explicit
  ``evaluate.task`` wins), so a recipe whose evaluate section the data contradicts fails within
  the ingest stage's time, not after training.

``workflow/dataset/lengths.py`` (the ingest stage) holds the rows' token counts against ``cutoff_len`` and
``max_model_len`` where the base model's tokenizer can be had before the model stage.

What still fails later needs a trained adapter (its saved modules, dtype, parity) or a live
engine or endpoint.
"""

from __future__ import annotations

import importlib.util
import os
import uuid

from .config import Recipe
from .core import ray_cluster, storage
from .core.errors import WorkflowError
from .inference.adapters import LORA_RANKS

# LLaMA-Factory's default lora_rank, which the train stage's adapters get when the recipe gives none.
DEFAULT_LORA_RANK = 8


# ---------------------------------------------------------------- the recipe alone

def check_recipe(recipe: Recipe, *, on_cluster: bool) -> None:
    """Checks that need nothing but the recipe; ``on_cluster``: the stages will join ``RAY_ADDRESS``."""
    where = str(recipe.path or "recipe")
    if recipe.serve is not None:
        try:
            recipe.serve.check_open_endpoint(on_cluster=on_cluster)
        except ValueError as err:
            cluster = " (RAY_ADDRESS is set: the app listens on every node)" if on_cluster and not recipe.serve.host \
                else ""
            raise WorkflowError(f"{where}: serve.{err}{cluster}") from None
    check_lora_rank(recipe)


def check_lora_rank(recipe: Recipe) -> None:
    """The train stage's LoRA rank fits vLLM's ranks and every ``max_lora_rank`` the recipe pins."""
    if recipe.train is None or recipe.train.llamafactory.get("finetuning_type", "lora") != "lora":
        return
    where = str(recipe.path or "recipe")
    rank = int(recipe.train.llamafactory.get("lora_rank", DEFAULT_LORA_RANK))
    fitting = [r for r in LORA_RANKS if r >= rank]
    if not fitting:
        raise WorkflowError(f"{where}: train.llamafactory.lora_rank: {rank} is above the largest LoRA rank vLLM "
                            f"serves ({LORA_RANKS[-1]})", hint=f"train with lora_rank {LORA_RANKS[-1]} or less")
    engines = []
    if recipe.evaluate is not None and recipe.evaluate.endpoint is None:
        engines.append(("evaluate.processor.engine_kwargs", recipe.evaluate.processor.get("engine_kwargs") or {}))
    if recipe.serve is not None:
        engines.append(("serve.llm_config.engine_kwargs", recipe.serve.llm_config.get("engine_kwargs") or {}))
    for key, engine_kwargs in engines:
        pinned = engine_kwargs.get("max_lora_rank")
        if pinned is not None and int(pinned) < rank:
            raise WorkflowError(f"{where}: {key}.max_lora_rank is {pinned}, below train.llamafactory.lora_rank "
                                f"{rank}: the engine would refuse the run's adapter after training",
                                hint=f"set {key}.max_lora_rank to {fitting[0]} (or remove it: it is then derived "
                                     "from the adapter)")


# ---------------------------------------------------------------- the start of a run

def check_before_run(recipe: Recipe, stages: list[str], serve_options: dict | None = None) -> None:
    """Everything a run can check before its first stage (see the module doc); ``serve_options``: the serve
    stage's (``detach``, ``replace``)."""
    address = os.environ.get(ray_cluster.ADDRESS_ENV)
    check_recipe(recipe, on_cluster=bool(address))
    where = str(recipe.path or "recipe")
    source = recipe.model.source
    if "model" in stages and source.startswith("/") and not os.path.exists(source):
        raise WorkflowError(f"{where}: model.source: {source} does not exist",
                            hint="give an existing model folder, a Hugging Face id, or s3://... / gs://...")
    if "serve" in stages:
        check_serve_environment(recipe, address)
        check_no_live_app_replaced(recipe, serve_options or {})
    check_storage_writable(recipe.run_uri)
    if address:
        check_cluster(address, recipe.run_uri, stages)
    if "ingest" in stages and recipe.evaluate is not None:
        check_skipped_ingest(recipe)


def check_serve_environment(recipe: Recipe, address: str | None) -> None:
    """What the serve stage reads from this process's environment: the API key's variable, and a cluster
    (``address``) that can load the model and adapters from the run's storage."""
    where = str(recipe.path or "recipe")
    key_env = recipe.serve.api_key_env
    if key_env and not os.environ.get(key_env):
        raise WorkflowError(f"{where}: serve.api_key_env: ${key_env} is not set (the serve stage needs it)",
                            hint=f"export {key_env}=<key>, or remove serve.api_key_env for an open endpoint")
    if address and storage.is_local(recipe.run_uri):
        raise WorkflowError(f"{where}: storage: {recipe.run_uri} is a folder on this machine, which the serving "
                            f"replicas on the cluster at {address} cannot load the model and adapters from",
                            hint="set the recipe's storage (or WORKFLOW_STORAGE) to s3://... or gs://..., or "
                                 "unset RAY_ADDRESS")


def check_no_live_app_replaced(recipe: Recipe, serve_options: dict) -> None:
    """A run without ``--detach`` would replace the recipe's detached app on the workflow's own cluster: refused
    now unless ``--replace``, not after training (``workflow/stages/serve.py``, ``refuse_replacing_a_live_app``)."""
    from .core.stage import StageContext
    from .stages import serve

    serve.refuse_replacing_a_live_app(StageContext(recipe=recipe, stage="serve", options=serve_options))


def check_storage_writable(run_uri: str) -> None:
    """Write and remove one small file under the run's folder (storage's own retries and one-line errors)."""
    probe = storage.join(run_uri, f".preflight-{uuid.uuid4().hex[:12]}")
    storage.write_text(probe, "workflow: checking that the run's storage is writable\n")
    storage.remove(probe)


def check_cluster(address: str, run_uri: str, stages: list[str]) -> None:
    """The cluster contract for the stages that run in this environment (docs/cluster.md, "The cluster contract"):
    every node imports their modules with this interpreter's Ray and Python. The stages of the other
    environment check theirs as they start."""
    needs = {"evaluate": "vllm", "serve": "vllm"}
    wanted = tuple(sorted({needs[s] for s in stages if s in needs}))
    if not wanted or importlib.util.find_spec(wanted[0]) is None:  # not the serve environment
        return
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if storage.is_local(run_uri) and len(nodes) > 1:
            raise WorkflowError(f"storage {run_uri} is a folder on this machine, which the other nodes of the "
                                f"cluster at {address} ({len(nodes)} nodes) cannot read",
                                hint="set the recipe's storage (or WORKFLOW_STORAGE) to s3://... or gs://...")
        ray_cluster.check_nodes(nodes, address, needs=("workflow", *wanted))
    finally:
        ray.shutdown()


def check_skipped_ingest(recipe: Recipe) -> None:
    """An ingest stage that is up to date will not run, so its task check would not either: check its record."""
    from .core import manifest
    from .core.stage import StageContext
    from .dataset.read import read_records
    from .evaluation.task_inference import check_task
    from .stages import ingest

    ctx = StageContext(recipe=recipe, stage="ingest")
    found = manifest.read(ctx.out_uri)
    if found is None or "task" not in (found.get("summary") or {}):
        return
    if found.get("fingerprint") != manifest.fingerprint("ingest", ingest.config(ctx), ingest.inputs(ctx)):
        return  # it runs again, and checks then
    train_uri = found["outputs"].get("train")
    check_task(recipe, found["summary"]["task"], ingest.expected_outputs(read_records(train_uri, "jsonl"))
               if train_uri else None)
