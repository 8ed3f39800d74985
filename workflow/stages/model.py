"""Model stage: settle which base model the run uses, and where downstream stages load it.

- ``source: tiny`` builds a tiny Qwen2 model whose tokenizer is trained on the ingested
  train/val text (tests, the CPU demo).
- A local folder or an ``s3://``/``gs://`` mirror is used as it is; a Hugging Face id is
  pinned to the commit its ``revision`` (default main) resolves to — from the hub, else from the
  local Hugging Face cache when offline — and each library loads that commit from the hub (or its
  cache): the hash is an input of the stage (an upstream change reruns it and everything
  downstream) and its summary's ``revision``, which the train, evaluate, batch and serve stages pass
  on (LLaMA-Factory's ``model_revision``, vLLM's ``revision``).
- ``pretrain`` (LLaMA-Factory keys, ``stage: pt`` and ``finetuning_type: full`` unless set)
  then trains the tiny base through the same Ray Train code as the train stage
  (``workflow.training.ray_train``), on plain-text documents made from the ingested rows
  (``pretrain_text``: which splits and fields): it learns the data's text, not the task.
  With ``stage: sft`` it trains on the ingested splits named in ``pretrain_text.splits`` as
  they are. The base, the corpus and the checkpoints go to ``<run>/model/{base,pretrain,
  checkpoints}``; the trained model to ``weights``.
- ``mirror: true`` copies the base model into ``<storage>/<run>/model/weights`` (what the
  reference tutorial's ``upload_model`` does) so cluster nodes load it from the bucket; from
  the hub, only the files a model needs (``MODEL_FILES``: config, weights, tokenizer).

The stage's manifest output ``model`` is what train, evaluate and serve load.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import tempfile
from pathlib import Path

from ..config import is_remote
from ..core import manifest, storage
from ..core.console import say
from ..core.envs import TRAIN
from ..core.errors import WorkflowError
from ..core.stage import StageContext, StageResult
from ..training.pretrain_corpus import CORPUS, write_corpus

ENV = TRAIN
WEIGHTS = "weights"


PRETRAIN_DEFAULTS = {"stage": "pt", "finetuning_type": "full"}
# What a mirror takes of a hub repository: no READMEs, images, other formats' weights (*.bin, GGUF, ONNX).
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py"]
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@functools.lru_cache(maxsize=8)
def resolve_revision(model_id: str, revision: str | None) -> str:
    """The commit hash that ``revision`` (default main) of a hub model names: from the hub, else the
    local Hugging Face cache (offline, ``HF_HUB_OFFLINE=1``, or the hub unreachable)."""
    if revision and _COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi, constants

    try:
        return HfApi().model_info(model_id, revision=revision, token=os.environ.get("HF_TOKEN") or None).sha
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; the cache may still know
        ref = Path(constants.HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}" / "refs" / (revision or "main")
        if ref.is_file():
            return ref.read_text().strip()
        raise WorkflowError(f"model.source: cannot resolve {model_id!r} at revision {revision or 'main'} "
                            f"({type(err).__name__}), and the Hugging Face cache does not have it",
                            hint="check the id and revision, HF_TOKEN for gated models and network access; or "
                                 "point model.source at a local folder or a bucket mirror") from None


def config(ctx: StageContext) -> dict:
    out = ctx.recipe.model.model_dump(mode="json")
    if ctx.recipe.model.pretrain and ctx.recipe.train is not None:
        out["pretrain_scaling"] = ctx.recipe.train.scaling_config.model_dump(mode="json")
    return out


def inputs(ctx: StageContext) -> dict[str, str]:
    cfg = ctx.recipe.model
    if cfg.is_tiny:
        return {"ingest": ctx.upstream("ingest")["fingerprint"]}
    if not is_remote(cfg.source) and os.path.isabs(cfg.source):
        if not Path(cfg.source).is_dir():
            raise WorkflowError(f"model.source: {cfg.source} does not exist",
                                hint="give an existing model folder, a Hugging Face id, or s3://... / gs://...")
        # Names and sizes are enough to notice a changed checkpoint without reading gigabytes.
        files = sorted((p.relative_to(cfg.source).as_posix(), p.stat().st_size)
                       for p in Path(cfg.source).rglob("*") if p.is_file())
        return {"source": manifest.config_hash(files)}
    if cfg.is_hub:
        return {"source": cfg.source, "revision": resolve_revision(cfg.source, cfg.revision)}
    return {"source": cfg.source}


def _hf_snapshot(model_id: str, revision: str) -> Path:
    """A local copy of the files a hub model needs at ``revision`` (from the HF cache when offline)."""
    from huggingface_hub import snapshot_download

    fetch = functools.partial(snapshot_download, model_id, revision=revision, allow_patterns=MODEL_FILES,
                              token=os.environ.get("HF_TOKEN") or None)
    try:
        try:
            return Path(fetch())
        except Exception:  # noqa: BLE001 - hub unreachable or offline: the cached snapshot of that commit, if any
            # (huggingface_hub 1.x lists a commit's files from the hub even offline unless told not to)
            return Path(fetch(local_files_only=True))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise WorkflowError(f"model.source: cannot download {model_id!r} ({type(err).__name__})",
                            hint="check the model id, HF_TOKEN for gated models, and network access; "
                                 "or point model.source at a local folder or a bucket mirror") from None


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.model
    weights_uri = ctx.stage_uri("model", WEIGHTS)
    if cfg.is_tiny:
        from ..training.tiny_model import build_tiny_model

        ingest = ctx.upstream("ingest")["outputs"]
        with tempfile.TemporaryDirectory(prefix="workflow-tiny-") as tmp:
            data = [_local_file(ingest[s], tmp) for s in ("train", "val") if s in ingest]
            built = build_tiny_model(data, Path(tmp) / "model", cfg.tiny)
            if cfg.pretrain:
                pretrained = _pretrain(ctx, built, ingest, weights_uri)
                return StageResult(outputs={"model": weights_uri},
                                   summary={"kind": "tiny", **cfg.tiny.model_dump(), "pretrain": pretrained})
            storage.upload_dir(built, weights_uri, last=["config.json"])
        return StageResult(outputs={"model": weights_uri}, summary={"kind": "tiny", **cfg.tiny.model_dump()})
    source = cfg.source
    revision = resolve_revision(source, cfg.revision) if cfg.is_hub else None
    pinned = {"revision": revision} if revision else {}
    if not cfg.mirror:
        kind = "hub" if cfg.is_hub else "remote" if is_remote(source) else "path"
        return StageResult(outputs={"model": source}, summary={"kind": kind, **pinned})
    say(f"[model] mirroring {source}{f' at {revision}' if revision else ''} -> {weights_uri}")
    if cfg.is_hub:
        with tempfile.TemporaryDirectory(prefix="workflow-hub-") as tmp:
            storage.upload_dir(_model_files(_hf_snapshot(source, revision), Path(tmp)), weights_uri,
                               last=["config.json"])
    else:
        storage.copy_dir(source, weights_uri, last=["config.json"])
    return StageResult(outputs={"model": weights_uri}, summary={"kind": "mirror", "source": source, **pinned})


def _model_files(snapshot: Path, into: Path) -> Path:
    """``into`` holding links to the snapshot's ``MODEL_FILES`` only (a cached snapshot, read offline,
    can hold more than was asked for)."""
    for path in sorted(snapshot.rglob("*")):
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in MODEL_FILES):
            link = into / path.relative_to(snapshot)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    return into


def _local_file(uri: str, tmp: str) -> Path:
    if storage.is_local(uri):
        return storage.local_path(uri)
    dest = Path(tmp) / uri.rsplit("/", 1)[-1]
    dest.write_bytes(storage.read_bytes(uri))
    return dest


def _pretrain(ctx: StageContext, built: Path, ingest: dict, weights_uri: str) -> dict:
    """Train the freshly built tiny base with LLaMA-Factory in Ray Train; publish it at ``weights_uri``."""
    from ..training.llamafactory_args import WORKER_OUTPUT, check_llamafactory_keys, llamafactory_args
    from ..training.ray_train import run_training

    recipe = ctx.recipe
    keys = {**PRETRAIN_DEFAULTS, **recipe.model.pretrain}
    check_llamafactory_keys(keys, f"{recipe.path or recipe.name}: model.pretrain")
    base_uri = ctx.stage_uri("model", "base")
    storage.upload_dir(built, base_uri, last=["config.json"])
    if keys["stage"] == "pt":
        dataset_dir, dataset = ctx.stage_uri("model", CORPUS), CORPUS
        documents = write_corpus(recipe.model.pretrain_text, ingest, dataset_dir)
        say(f"[model] pre-training the tiny base on {documents} plain-text documents")
    else:
        dataset_dir, dataset = ingest["dataset_info"].rsplit("/", 1)[0], ",".join(recipe.model.pretrain_text.splits)
        documents = None
    fingerprint = manifest.fingerprint(ctx.stage, config(ctx), inputs(ctx))
    args = llamafactory_args(keys, model=base_uri, dataset_dir=dataset_dir, output_dir=WORKER_OUTPUT, dataset=dataset)
    scaling = recipe.train.scaling_config.model_dump() if recipe.train is not None else {}
    summary = run_training(
        args,
        experiment=f"pretrain-{fingerprint[:12]}",
        checkpoints_uri=ctx.stage_uri("model", "checkpoints"),
        export_uri=weights_uri,
        export_last=["config.json"],
        model_key=fingerprint,
        data_key=fingerprint,
        scaling_config=scaling,
        failure_config=recipe.train.failure_config.model_dump() if recipe.train is not None else {},
        checkpoint_config={"num_to_keep": 1},
        tensorboard_uri=ctx.stage_uri("model", "tensorboard"),
        fresh=ctx.force,
    )
    say(f"[model] pre-trained the base: {summary['global_step']} steps, final loss {summary['final_loss']}")
    return {"stage": keys["stage"], "documents": documents, **summary}

