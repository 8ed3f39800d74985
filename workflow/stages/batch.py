"""The ``batch`` job: batch inference over any dataset with the run's model (and adapters).

    workflow batch RECIPE --input URI --output URI [--adapter DIR ...] [--max-errors N]

Reads JSONL/JSON, Parquet or CSV (local, s3://, gs://) whose rows hold ``messages``,
Alpaca ``instruction``/``input`` (+ ``system``) or a ``prompt``; writes one Parquet or
JSONL file with every input column plus ``generated_text``, ``num_input_tokens``,
``num_generated_tokens`` and ``error``. With adapters, every row is answered once per
adapter by the same engine and a ``model`` column names the adapter. Engine and sampling
settings come from the recipe's ``evaluate`` section.

A row that fails (too long for the model, say) keeps its place with its ``error`` set; the job
counts them, prints how many, and fails (exit 2, the output still written) when more than
``--max-errors`` (default 0) did. On a Ray cluster of several nodes, an input file and adapter
folders on this machine's disk are first copied into the run's storage (a bucket there, which
every node reads) under ``<run>/batch/uploads/<job>/``, removed when the job ends.
"""

from __future__ import annotations

import functools
import uuid
from pathlib import Path

from ..config.evaluate import check_library_fields
from ..core import storage
from ..core.console import say
from ..core.envs import SERVE
from ..core.errors import WorkflowError
from ..core.stage import StageContext, StageResult
from ..inference import io, processor
from ..inference.adapters import EngineAdapters, engine_adapters, lora_engine_kwargs, model_for_engine

ENV = SERVE
# A job, not a pipeline stage: it writes where it is told and leaves no manifest.
CACHEABLE = False


def config(ctx: StageContext) -> dict:
    return {}


def inputs(ctx: StageContext) -> dict[str, str]:
    return {}


def _steer(batch, *, name: str, path: str):
    import pyarrow as pa

    n = batch.num_rows
    return batch.append_column("model", pa.array([name] * n, pa.string())).append_column(
        "__adapter", pa.array([path] * n, pa.string()))


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def _where_every_node_reads(source: str, adapters: dict[str, str], lora: EngineAdapters,
                            uploads: str) -> tuple[str, EngineAdapters]:
    """(input, adapters) that every node of the cluster can read: what is on this machine's disk (or not
    in one storage folder the engines load by name) copied under ``uploads``, in the run's storage."""
    if storage.is_local(source):
        local = storage.local_path(source)
        shared = storage.join(uploads, "input", local.name)
        say(f"[batch] copying the input {source} to {shared}, where every node of the cluster reads it")
        if local.is_dir():
            storage.upload_dir(local, shared)
        else:
            storage.write_bytes(shared, local.read_bytes())
        source = shared
    if adapters and lora.loading_path is None:
        folder = storage.join(uploads, "adapters")
        say(f"[batch] copying the adapters {', '.join(adapters)} to {folder}, where every node's engine loads them")
        for name, location in adapters.items():
            storage.copy_dir(location, storage.join(folder, name), last=["adapter_config.json"])
        lora = EngineAdapters({name: name for name in adapters}, folder)
    return source, lora


def _counting_errors(batches, seen: dict):
    """Pass the output batches through, counting the rows whose ``error`` is set (and keeping the first)."""
    for batch in batches:
        errors = [e for e in batch.column("error").to_pylist() if e]
        if errors and not seen["first"]:
            seen["first"] = " ".join(str(errors[0]).split())[:300]
        seen["failed"] += len(errors)
        yield batch


def check_row_errors(failed: int, total: int, first: str, max_errors: int, dest: str) -> None:
    """Print how many rows failed; one error line when more than ``max_errors`` did."""
    if not failed:
        return
    say(f"[batch] {failed} of {total} rows failed (their error column in {dest} says why); first: {first}")
    if failed > max_errors:
        raise WorkflowError(f"batch: {failed} of {total} rows failed, more than --max-errors {max_errors} allows "
                            f"(first: {first}); every row is in {dest}, the failed ones with their error",
                            hint=f"fix those rows, or pass --max-errors {failed} to accept them")


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.evaluate
    if cfg is None:
        raise WorkflowError(f"{ctx.recipe.path}: batch takes its engine settings from an evaluate: section; add one")
    options = ctx.options
    source, dest = options.get("input"), options.get("output")
    if not source or not dest:
        raise WorkflowError("batch: --input and --output are required")
    max_errors = int(options.get("max_errors") or 0)
    if max_errors < 0:
        raise WorkflowError(f"batch: --max-errors {max_errors}: give a count of rows, 0 or more")
    io.output_format(dest)
    check_library_fields(cfg)
    adapters = {Path(a.rstrip("/")).name: a for a in options.get("adapters") or []}
    if len(adapters) != len(options.get("adapters") or []):
        raise WorkflowError("batch: two --adapter folders have the same name; give each a distinct folder name")

    model = ctx.upstream("model")
    model_source = model_for_engine(model["outputs"]["model"])
    lora_engine_kwargs(cfg.processor.get("engine_kwargs") or {}, adapters, "evaluate.processor")  # refuse early
    if storage.is_local(source) and not storage.local_path(source).exists():
        raise WorkflowError(f"{source}: input not found", hint="check --input")
    lora = engine_adapters(adapters, ctx.scratch("adapters"))
    processor.init_ray(ctx.run_uri, engine=True)  # on several nodes, only with the run's storage in a bucket
    uploads = None
    if _alive_nodes() > 1 and (storage.is_local(source) or (adapters and lora.loading_path is None)):
        uploads = storage.join(ctx.run_uri, "batch", "uploads", uuid.uuid4().hex[:12])
    try:
        if uploads is not None:
            source, lora = _where_every_node_reads(source, adapters, lora, uploads)
        written, seen = _answer(cfg, model, model_source, source, dest, adapters, lora)
    finally:
        if uploads is not None:
            storage.remove(uploads)
    check_row_errors(seen["failed"], written, seen["first"], max_errors, dest)
    return StageResult(outputs={"output": dest}, summary={"rows": written, "failed": seen["failed"]})


def _answer(cfg, model, model_source, source, dest, adapters, lora) -> tuple[int, dict]:
    """Every row (once per adapter) through the engine into ``dest``: (rows written, {failed, first})."""
    ds = io.read_dataset(source)
    columns = ds.columns()
    processor.check_input_columns(columns, source)
    if adapters:
        if "model" in columns:
            raise WorkflowError(f"{source}: the input has a 'model' column, which names the adapter in the output",
                                hint="rename it")
        parts = [ds.map_batches(functools.partial(_steer, name=name, path=path), batch_format="pyarrow")
                 for name, path in lora.row_model.items()]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        columns = [*columns, "model"]
    total = ds.count()
    engine = processor.engine_processor(model_source, cfg.processor, cfg.sampling_params, adapters, columns,
                                        model_key=model["fingerprint"], lora_loading_path=lora.loading_path,
                                        revision=model.get("summary", {}).get("revision"))
    out = processor.run(ds, engine, columns)
    say(f"[batch] {total} rows from {source} -> {dest}")
    seen = {"failed": 0, "first": ""}
    written = io.write_rows(_counting_errors(out.iter_batches(batch_format="pyarrow", batch_size=None), seen), dest,
                            total=total)
    if written != total:
        raise WorkflowError(f"batch: {total} rows went in but {written} came out")
    say(f"[batch] wrote {written} rows to {dest}")
    return written, seen
