"""Ingest stage: read a dataset, validate it, write it in LLaMA-Factory's form.

Reads JSONL, JSON, CSV or Parquet from a local path, ``http(s)://``, ``s3://`` or ``gs://``
(fsspec), maps columns to Alpaca (``instruction``/``input``/``output``) or ShareGPT
(``messages``), drops or rejects invalid rows with counted reasons, and writes
``<split>.jsonl`` for each split plus ``dataset_info.json`` (the dataset names are the split
names) and ``stats.json`` to ``<storage>/<run>/ingest/``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..core import manifest, storage
from ..core.console import say
from ..core.envs import SERVE
from ..core.stage import StageContext, StageResult
from ..dataset.formats import dataset_info, load_splits, split_sources
from ..dataset.lengths import check_prompt_lengths
from ..evaluation.task_inference import check_task, task_record
from ..prompts.messages import expected_output

ENV = SERVE


def config(ctx: StageContext) -> dict:
    return ctx.recipe.ingest.model_dump(mode="json")


def _source_fingerprint(uri: str) -> str:
    if storage.is_local(uri):
        return manifest.hash_file(uri) if Path(storage.local_path(uri)).is_file() else "missing"
    fs, path = storage.filesystem(uri)
    try:
        info = storage.with_retries(lambda: fs.info(path), what=f"check {uri}")
    except FileNotFoundError:
        return "missing"
    return manifest.config_hash({k: info.get(k) for k in ("size", "ETag", "etag", "LastModified", "mtime", "md5Hash")})


def inputs(ctx: StageContext) -> dict[str, str]:
    cfg = ctx.recipe.ingest
    sources = split_sources(cfg) or {"source": cfg.source}
    return {f"source:{name}": _source_fingerprint(uri) for name, uri in sources.items()}


def expected_outputs(rows: list[dict]) -> list[str]:
    """The rows' expected outputs (``output``, or a final assistant turn), those that have one."""
    return [o for o in map(expected_output, rows) if o is not None]


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.ingest
    splits, stats = load_splits(cfg)
    training = expected_outputs(splits["train"]) if splits.get("train") else None
    task = None
    if training:
        task, lines = task_record(training, "training")
        stats["task"] = task
        for line in lines:
            say(f"[ingest] {line}")
    check_task(ctx.recipe, task, training)
    check_prompt_lengths(ctx.recipe, splits)
    with tempfile.TemporaryDirectory(prefix="workflow-ingest-") as tmp:
        out = Path(tmp)
        for name, rows in splits.items():
            with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        has_system = {name: any("system" in r for r in rows) for name, rows in splits.items()}
        (out / "dataset_info.json").write_text(json.dumps(dataset_info(cfg, list(splits), has_system), indent=2) + "\n")
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        storage.upload_dir(out, ctx.out_uri, last=["dataset_info.json"])
    for name in splits:
        s = stats[name]
        dropped = ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "none"
        say(f"[ingest] {name}: read {s['read']}, kept {s['kept']}, dropped {sum(s['dropped'].values())} ({dropped})")
    for where, s in [*((name, stats[name]) for name in splits), ("source", stats)]:
        if "json_outputs" in s:
            say(f"[ingest] {where}: {s['json_outputs']['rows']} {s['json_outputs']['written_as']}")
    outputs = {name: storage.join(ctx.out_uri, f"{name}.jsonl") for name in splits}
    outputs["dataset_info"] = storage.join(ctx.out_uri, "dataset_info.json")
    hashes = {name: manifest.hash_file(uri) for name, uri in outputs.items()}
    return StageResult(outputs=outputs, summary={"rows": {n: len(r) for n, r in splits.items()}, "format": cfg.format,
                                                 "sha256": hashes, "stats": stats,
                                                 **({"task": task} if task is not None else {})})
