"""Model stage: settle which base model the run uses, and where downstream stages load it.

- ``source: tiny`` builds a tiny Qwen2 model whose tokenizer is trained on the ingested
  train/val text (tests, the CPU demo).
- A local folder or an ``s3://``/``gs://`` mirror is used as it is; a Hugging Face id is
  recorded and loaded by each library from the hub (or its cache).
- ``mirror: true`` copies the base model into ``<storage>/<run>/model/weights`` (what the
  reference tutorial's ``upload_model`` does) so cluster nodes load it from the bucket.

The stage's manifest output ``model`` is what train, evaluate and serve load.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import manifest, storage
from .config import is_remote
from .envs import TRAIN
from .errors import WorkflowError
from .stage import StageContext, StageResult

ENV = TRAIN
WEIGHTS = "weights"


def config(ctx: StageContext) -> dict:
    return ctx.recipe.model.model_dump(mode="json")


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
    return {"source": cfg.source}


def _hf_snapshot(model_id: str) -> Path:
    """A local copy of a hub model (from the HF cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, token=os.environ.get("HF_TOKEN")))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise WorkflowError(f"model.source: cannot download {model_id!r} ({type(err).__name__})",
                            hint="check the model id, HF_TOKEN for gated models, and network access; "
                                 "or point model.source at a local folder or a bucket mirror") from None


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.model
    weights_uri = ctx.stage_uri("model", WEIGHTS)
    if cfg.is_tiny:
        from .tiny_model import build_tiny_model

        ingest = ctx.upstream("ingest")["outputs"]
        with tempfile.TemporaryDirectory(prefix="workflow-tiny-") as tmp:
            data = [_local_file(ingest[s], tmp) for s in ("train", "val") if s in ingest]
            built = build_tiny_model(data, Path(tmp) / "model", cfg.tiny)
            if cfg.pretrain:
                raise WorkflowError("model.pretrain: pre-training the tiny base is not built yet")
            storage.upload_dir(built, weights_uri, last=["config.json"])
        return StageResult(outputs={"model": weights_uri}, summary={"kind": "tiny", **cfg.tiny.model_dump()})
    source = cfg.source
    if not cfg.mirror:
        return StageResult(outputs={"model": source}, summary={"kind": "remote" if is_remote(source) else "path-or-hub"})
    local = source if (not is_remote(source) and os.path.isdir(source)) else None
    if local is None and not is_remote(source):
        local = str(_hf_snapshot(source))
    print(f"[model] mirroring {source} -> {weights_uri}", flush=True)
    storage.copy_dir(local or source, weights_uri, last=["config.json"])
    return StageResult(outputs={"model": weights_uri}, summary={"kind": "mirror", "source": source})


def _local_file(uri: str, tmp: str) -> Path:
    if storage.is_local(uri):
        return storage.local_path(uri)
    dest = Path(tmp) / uri.rsplit("/", 1)[-1]
    dest.write_bytes(storage.read_bytes(uri))
    return dest
