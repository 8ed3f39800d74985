"""Evaluate stage: batch inference over the test split, metrics, report.

Every variant (the base model, each adapter of the run's train stage, each of them again
with constrained decoding when the recipe asks for it) answers every test row in one pass
through one vLLM engine (``ray.data.llm``; a row's ``model`` column picks the adapter), or
through an OpenAI-compatible endpoint when ``evaluate.endpoint`` is set. Then the recipe's
metrics are computed per variant and written to ``<run>/evaluate/``: ``predictions.parquet``,
``metrics.json``, ``report.md`` and ``metrics.png`` (the manifest goes last).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ..config.evaluate import EvaluateConfig, check_library_fields
from ..config.task import dump
from ..core import manifest, storage
from ..core.console import say
from ..core.envs import SERVE
from ..core.errors import WorkflowError
from ..core.stage import StageContext, StageResult
from ..dataset.read import read_records
from ..evaluation import parity, report, tasks
from ..evaluation.task_inference import stage_task
from ..inference import io, processor
from ..inference.adapters import (
    check_trained_on,
    engine_adapters,
    lint_adapters,
    lora_engine_kwargs,
    model_architectures,
    model_for_engine,
    stored_adapters,
)
from ..prompts import guard
from ..prompts.messages import expected_output, row_messages

ENV = SERVE
CONSTRAINED = "+constrained"


def config(ctx: StageContext) -> dict:
    return ctx.recipe.evaluate.model_dump(mode="json")


def inputs(ctx: StageContext) -> dict[str, str]:
    found = {"ingest": ctx.upstream("ingest")["fingerprint"]}
    if ctx.recipe.evaluate.endpoint is None:
        found["model"] = ctx.upstream("model")["fingerprint"]
        if ctx.recipe.train is not None:
            found["train"] = ctx.upstream("train")["fingerprint"]
    return found


# ---------------------------------------------------------------- what to evaluate

def load_rows(ctx: StageContext, cfg: EvaluateConfig) -> list[dict[str, Any]]:
    outputs = ctx.upstream("ingest")["outputs"]
    if cfg.split not in outputs:
        splits = [k for k in outputs if k != "dataset_info"]
        raise WorkflowError(f"evaluate.split: no split {cfg.split!r} in the ingest stage; it has {splits}")
    rows = [json.loads(line) for line in storage.read_text(outputs[cfg.split]).splitlines() if line.strip()]
    return rows[: cfg.max_rows] if cfg.max_rows else rows


def run_adapters(ctx: StageContext, cfg: EvaluateConfig) -> dict[str, str]:
    """Adapter name -> URI, for the adapters the train stage wrote (all, or those named)."""
    if ctx.recipe.train is None:
        return {}
    adapters_dir = ctx.upstream("train")["outputs"]["adapters_dir"]
    found = stored_adapters(adapters_dir)
    wanted = cfg.adapters if cfg.adapters is not None else found
    missing = [a for a in wanted if a not in found]
    if missing:
        raise WorkflowError(f"evaluate.adapters: {missing} not in {adapters_dir}; it has {found}")
    return {name: storage.join(adapters_dir, name) for name in wanted}


def training_outputs(ctx: StageContext) -> list[str] | None:
    """The expected outputs of the ingest stage's training split (what a task is learnt from), if it has one."""
    train_uri = ctx.upstream("ingest")["outputs"].get("train")
    if not train_uri:
        return None
    return [o for o in map(expected_output, read_records(train_uri, "jsonl")) if o is not None]


def expand_rows(rows: list[dict[str, Any]], variants: list[tuple[str, dict[str, Any]]],
                cfg: EvaluateConfig, task: tasks.Task) -> list[dict[str, Any]]:
    """One row per (test row, variant, constrained or not, seed); ``__`` columns steer inference."""
    modes = [False, True] if cfg.constrained_decoding else [False]
    constraint = json.dumps(task.constraint) if task.constraint else ""
    out = []
    for seed in cfg.seeds or [None]:
        for name, steer in variants:
            for constrained in modes:
                for i, row in enumerate(rows):
                    out.append({"row_id": i, "variant": name + (CONSTRAINED if constrained else ""), "model": name,
                                "constrained": constrained, "seed": seed, "instruction": row.get("instruction", ""),
                                "input": row.get("input", ""), "system": row.get("system", ""),
                                "messages": row.get("messages"),
                                "expected": metrics_reference(row), **steer,
                                "__constraint": constraint if constrained else "", "__seed": seed})
    return out


def metrics_reference(row: dict[str, Any]) -> str:
    expected = expected_output(row)
    if expected is None:
        raise WorkflowError("evaluate: a test row has no expected output ('output' or a final assistant turn)")
    return expected


# ---------------------------------------------------------------- inference

def predict(ctx: StageContext, cfg: EvaluateConfig, rows: list[dict[str, Any]], task: tasks.Task):
    """All variants' predictions for the rows, as one Arrow table, and the parity reference (or None)."""
    import pyarrow as pa

    reference = None
    if cfg.endpoint is not None:
        variants = [(m, {"__endpoint_model": m}) for m in cfg.endpoint.models]
        adapters: dict[str, str] = {}
    else:
        model = ctx.upstream("model")
        model_source = model_for_engine(model["outputs"]["model"])
        adapters = run_adapters(ctx, cfg)
        if adapters:
            check_trained_on(ctx.upstream("train"), model, "evaluate")
            lint_adapters(adapters, "evaluate", model_architectures(model["outputs"]["model"],
                                                                     model.get("summary", {}).get("revision")),
                          engine_dtype=(cfg.processor.get("engine_kwargs") or {}).get("dtype"),
                          dtype_key="evaluate.processor.engine_kwargs.dtype")
            guard.check_stored_adapters(ctx.upstream("train")["outputs"]["adapters_dir"], list(adapters),
                                        model["outputs"]["model"], ctx.scratch("prompt-format"), where="evaluate",
                                        allow_mismatch=cfg.allow_prompt_mismatch,
                                        revision=model.get("summary", {}).get("revision"))
        lora_engine_kwargs(cfg.processor.get("engine_kwargs") or {}, adapters, "evaluate.processor")  # refuse early
        if adapters:
            reference = parity_reference(ctx, cfg, rows, adapters)
        lora = engine_adapters(adapters, ctx.scratch("adapters"))
        variants = ([("base", {"__adapter": ""})] if cfg.base else []) + [
            (name, {"__adapter": lora.row_model[name]}) for name in adapters]
        if not variants:
            raise WorkflowError("evaluate: nothing to evaluate (base: false and the run has no adapters)")
    items = expand_rows(rows, variants, cfg, task)
    for column in ("messages", "seed", "__seed"):
        if all(r[column] is None for r in items):
            for r in items:
                del r[column]
    if not any(r["system"] for r in items):
        for r in items:
            del r["system"]
    columns = [c for c in items[0] if not c.startswith("__")]
    processor.init_ray(ctx.run_uri, engine=cfg.endpoint is None)
    passes = f" x {len(cfg.seeds)} seeds" if cfg.seeds else ""
    say(f"[evaluate] {len(rows)} rows x {len({r['variant'] for r in items})} variants{passes} "
        f"({', '.join(sorted({r['variant'] for r in items}))})")
    if cfg.endpoint is not None:
        # One pass per request shape: Ray Data cannot merge blocks whose payload structs differ
        # (with and without structured_outputs). Passes are cheap here: no engine to start.
        passes = [[r for r in items if r["constrained"] == c] for c in (False, True)]
        batches = []
        for part in (p for p in passes if p):
            http = processor.http_processor(cfg.endpoint.processor, cfg.sampling_params, columns)
            batch_size = cfg.endpoint.processor.get("batch_size", 64)
            out = processor.run(io.from_rows(part, batch_size), http, columns, http=True)
            batches += io.with_progress(out.iter_batches(batch_format="pyarrow", batch_size=None),
                                        total=len(part), what="evaluate")
    else:
        engine = processor.engine_processor(model_source, cfg.processor, cfg.sampling_params, adapters, columns,
                                            model_key=model["fingerprint"], lora_loading_path=lora.loading_path,
                                            revision=model.get("summary", {}).get("revision"))
        out = processor.run(io.from_rows(items, cfg.processor.get("batch_size", 32)), engine, columns,
                            extra_columns=("generated_tokens",))
        batches = list(io.with_progress(out.iter_batches(batch_format="pyarrow", batch_size=None),
                                        total=len(items), what="evaluate"))
    n = sum(b.num_rows for b in batches)
    if n != len(items):
        raise WorkflowError(f"evaluate: {len(items)} rows went in but {n} came out")
    return pa.concat_tables(batches).sort_by([("variant", "ascending"), ("row_id", "ascending")]), reference


# ---------------------------------------------------------------- parity with training

def parity_reference(ctx: StageContext, cfg: EvaluateConfig, rows: list[dict[str, Any]],
                     adapters: dict[str, str]) -> dict[str, Any] | None:
    """Each adapter's greedy answers to the first ``evaluate.parity.rows`` rows as trained (PEFT), or None
    when the recipe turns parity off or the engine samples (its tokens then differ from greedy decoding by
    design). Runs before the engine starts, so a GPU is still free for it."""
    if cfg.parity is None:
        say("[evaluate] parity: off (evaluate.parity: null)")
        return None
    if not parity.is_greedy(cfg.sampling_params):
        say(f"[evaluate] parity: left out: the engine samples (evaluate.sampling_params.temperature "
            f"{cfg.sampling_params.get('temperature', 1.0)}), so its tokens cannot be held against greedy decoding")
        return None
    train = ctx.upstream("train")
    template = parity.training_template(train["outputs"]["adapters_dir"], list(adapters), ctx.recipe)
    dtype = parity.reference_dtype(cfg.parity, cfg.processor.get("engine_kwargs"))
    k = min(cfg.parity.rows, len(rows))
    on_gpu = not processor.cpu_engine(cfg.processor)
    say(f"[evaluate] parity: {k} rows, greedy, by PEFT in the train environment "
        f"({'a Ray task with one GPU, ' if on_gpu else ''}{dtype}, prompts by "
        f"{f'LLaMA-Factory template {template!r}' if template else 'the chat template'})")
    if on_gpu:
        processor.init_ray(ctx.run_uri, engine=True)  # the cluster the engine will use; the task runs there
    return parity.stored_reference(model_manifest=ctx.upstream("model"), train_manifest=train, adapters=adapters,
                                   rows=[row_messages(row) for row in rows[:k]], template=template, dtype=dtype,
                                   max_tokens=int(cfg.sampling_params.get("max_tokens", 16)),
                                   cache_uri=parity.cache_uri(ctx.run_uri), scratch=ctx.scratch("parity"),
                                   gpus=1 if on_gpu else None)


def check_parity(ctx: StageContext, cfg: EvaluateConfig, table, reference: dict[str, Any] | None):
    """Compare the engine's token ids with the reference; parity.json's content, or None when skipped.

    Fails with one line below ``evaluate.parity.min_identical`` (before anything is written).
    """
    if reference is None:
        if cfg.parity is not None and (cfg.endpoint is not None or parity.is_greedy(cfg.sampling_params)):
            why = "evaluate.endpoint scores an endpoint, not the run's adapters" if cfg.endpoint else "no adapters"
            say(f"[evaluate] parity: skipped ({why})")
        return None
    decode = parity.token_decoder(ctx.upstream("model"))
    answers = table.select(["variant", "row_id", "generated_tokens"]).to_pylist()
    results = {}
    for name, ref in reference.items():
        engine = {r["row_id"]: r["generated_tokens"] or [] for r in answers if r["variant"] == name}
        results[name] = parity.compare([r["generated_ids"] for r in ref["rows"]],
                                       [engine[i] for i in range(len(ref["rows"]))], decode)
    first = next(iter(reference.values()))
    content = {"rows": len(first["rows"]), "min_identical": cfg.parity.min_identical,
               "reference": parity.describe_reference(first),
               "engine": {"dtype": (cfg.processor.get("engine_kwargs") or {}).get("dtype", "auto"),
                          "sampling_params": cfg.sampling_params},
               "adapters": results}
    print(json.dumps(content, indent=1), flush=True)  # every row's comparison, in the stage's log
    for warning in parity.check(results, cfg.parity.min_identical, where="evaluate", key="evaluate.parity",
                                allow_mismatch=cfg.parity.allow_mismatch):
        say(f"warning: {warning}; going on because evaluate.parity.allow_mismatch is true")
    for name, result in results.items():
        say(f"[evaluate] parity: adapter {name}: {parity.describe(result)}")
    return content


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.evaluate
    check_library_fields(cfg)
    rows = load_rows(ctx, cfg)
    task = tasks.build(stage_task(cfg.task, ctx.upstream("ingest"), "evaluate"), training_outputs(ctx),
                       constrained=cfg.constrained_decoding, where=f"{ctx.recipe.path}: evaluate.task",
                       reference_outputs=[metrics_reference(row) for row in rows])
    table, reference = predict(ctx, cfg, rows, task)
    parity_result = check_parity(ctx, cfg, table, reference)
    results = report.score(table, task, bootstrap=cfg.bootstrap)
    names = list(task.metrics)
    files = ["predictions.parquet", "metrics.json", "report.md", "metrics.png"]
    if parity_result is not None:
        files.append(parity.FILE)
    with tempfile.TemporaryDirectory(prefix="workflow-evaluate-") as tmp:
        out = Path(tmp)
        import pyarrow.parquet as pq

        pq.write_table(table, out / "predictions.parquet")
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        report.chart(results, names, out / "metrics.png")
        if task.kind == "label":
            report.confusion_chart(results, out / "confusion.png")
            files.append("confusion.png")
        if parity_result is not None:
            (out / parity.FILE).write_text(json.dumps(parity_result, indent=2) + "\n")
        (out / "report.md").write_text(report.markdown_report(ctx.recipe.name, results, table, cfg, task,
                                                              parity_result))
        storage.upload_dir(out, ctx.out_uri, last=["metrics.json"])
    report.print_summary(results, names)
    outputs = {name: storage.join(ctx.out_uri, name) for name in files}
    summary = {"metrics": {v: r["metrics"] for v, r in results.items()},
               "errors": {v: r["errors"] for v, r in results.items()}, "rows": len(rows),
               "task": dump(task.config), "main_metric": task.main_metric,
               "metrics_sha256": manifest.hash_file(outputs["metrics.json"])}
    if parity_result is not None:
        summary["parity"] = {name: parity.describe(r) for name, r in parity_result["adapters"].items()}
    return StageResult(outputs=outputs, summary=summary)
