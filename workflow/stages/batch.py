"""The ``batch`` job: batch inference over any dataset with the run's model (and adapters).

    workflow batch RECIPE --input URI --output URI [--adapter DIR ...]

Reads JSONL/JSON, Parquet or CSV (local, s3://, gs://) whose rows hold ``messages``,
Alpaca ``instruction``/``input`` (+ ``system``) or a ``prompt``; writes one Parquet or
JSONL file with every input column plus ``generated_text``, ``num_input_tokens``,
``num_generated_tokens`` and ``error``. With adapters, every row is answered once per
adapter by the same engine and a ``model`` column names the adapter. Engine and sampling
settings come from the recipe's ``evaluate`` section.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..config.evaluate import check_library_fields
from ..core.console import say
from ..core.envs import SERVE
from ..core.errors import WorkflowError
from ..core.stage import StageContext, StageResult
from ..inference import io, processor
from ..inference.adapters import engine_adapters, lora_engine_kwargs, model_for_engine

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


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.evaluate
    if cfg is None:
        raise WorkflowError(f"{ctx.recipe.path}: batch takes its engine settings from an evaluate: section; add one")
    options = ctx.options
    source, dest = options.get("input"), options.get("output")
    if not source or not dest:
        raise WorkflowError("batch: --input and --output are required")
    io.output_format(dest)
    check_library_fields(cfg)
    adapters = {Path(a.rstrip("/")).name: a for a in options.get("adapters") or []}
    if len(adapters) != len(options.get("adapters") or []):
        raise WorkflowError("batch: two --adapter folders have the same name; give each a distinct folder name")

    model = ctx.upstream("model")
    model_source = model_for_engine(model["outputs"]["model"])
    lora_engine_kwargs(cfg.processor.get("engine_kwargs") or {}, adapters, "evaluate.processor")  # refuse early
    lora = engine_adapters(adapters, ctx.scratch("adapters"))
    processor.init_ray(ctx.run_uri, engine=True)
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
    written = io.write_rows(out.iter_batches(batch_format="pyarrow", batch_size=None), dest, total=total)
    if written != total:
        raise WorkflowError(f"batch: {total} rows went in but {written} came out")
    say(f"[batch] wrote {written} rows to {dest}")
    return StageResult(outputs={"output": dest}, summary={"rows": written})
