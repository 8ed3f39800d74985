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

from . import inference, manifest, metrics, prompt_format, storage
from .config.evaluate import EvaluateConfig, check_library_fields
from .envs import SERVE
from .errors import WorkflowError
from .stage import StageContext, StageResult

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
    found = {rel.split("/")[0] for rel in storage.list_files(adapters_dir) if rel.endswith("adapter_config.json")
             and rel.count("/") == 1}
    wanted = cfg.adapters if cfg.adapters is not None else sorted(found)
    missing = [a for a in wanted if a not in found]
    if missing:
        raise WorkflowError(f"evaluate.adapters: {missing} not in {adapters_dir}; it has {sorted(found)}")
    return {name: storage.join(adapters_dir, name) for name in wanted}


def constraint_regex(row: dict[str, Any], cfg: EvaluateConfig) -> str:
    cd = cfg.constrained_decoding
    if cd.functions and cd.attributes:
        functions, attributes = cd.functions, cd.attributes
    else:
        listed = metrics.allowed_names(row.get("instruction", ""))
        functions, attributes = cd.functions or listed[0], cd.attributes or listed[1]
    return metrics.call_regex(functions, attributes, max_value_chars=cd.max_value_chars, max_slots=cd.max_slots)


def expand_rows(rows: list[dict[str, Any]], variants: list[tuple[str, dict[str, Any]]],
                cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """One row per (test row, variant, constrained or not); ``__`` columns steer inference."""
    modes = [False, True] if cfg.constrained_decoding else [False]
    out = []
    for name, steer in variants:
        for constrained in modes:
            for i, row in enumerate(rows):
                out.append({"row_id": i, "variant": name + (CONSTRAINED if constrained else ""), "model": name,
                            "constrained": constrained, "instruction": row.get("instruction", ""),
                            "input": row.get("input", ""), "system": row.get("system", ""),
                            "messages": row.get("messages"),
                            "expected": metrics_reference(row), **steer,
                            "__regex": constraint_regex(row, cfg) if constrained else ""})
    return out


def metrics_reference(row: dict[str, Any]) -> str:
    from .prompts import expected_output

    expected = expected_output(row)
    if expected is None:
        raise WorkflowError("evaluate: a test row has no expected output ('output' or a final assistant turn)")
    return expected


# ---------------------------------------------------------------- inference

def predict(ctx: StageContext, cfg: EvaluateConfig, rows: list[dict[str, Any]]):
    """All variants' predictions for the rows, as one Arrow table."""
    import pyarrow as pa

    if cfg.endpoint is not None:
        variants = [(m, {"__endpoint_model": m}) for m in cfg.endpoint.models]
        adapters: dict[str, str] = {}
    else:
        model_source = model_for_engine(ctx)
        adapters = inference.local_adapters(run_adapters(ctx, cfg), ctx.scratch("adapters"))
        for path in adapters.values():
            prompt_format.check_adapter(path, model_source, where="evaluate", allow_mismatch=cfg.allow_prompt_mismatch)
        inference.lora_engine_kwargs(cfg.processor.get("engine_kwargs") or {}, adapters, "evaluate.processor")
        variants = ([("base", {"__adapter": ""})] if cfg.base else []) + [
            (name, {"__adapter": path}) for name, path in adapters.items()]
        if not variants:
            raise WorkflowError("evaluate: nothing to evaluate (base: false and the run has no adapters)")
    items = expand_rows(rows, variants, cfg)
    if all(r["messages"] is None for r in items):
        for r in items:
            del r["messages"]
    if not any(r["system"] for r in items):
        for r in items:
            del r["system"]
    columns = [c for c in items[0] if not c.startswith("__")]
    inference.init_ray()
    print(f"[evaluate] {len(rows)} rows x {len(items) // len(rows)} variants "
          f"({', '.join(sorted({r['variant'] for r in items}))})", flush=True)
    if cfg.endpoint is not None:
        # One pass per request shape: Ray Data cannot merge blocks whose payload structs differ
        # (with and without structured_outputs). Passes are cheap here: no engine to start.
        passes = [[r for r in items if r["constrained"] == c] for c in (False, True)]
        batches = []
        for part in (p for p in passes if p):
            processor = inference.http_processor(cfg.endpoint.processor, cfg.sampling_params, columns)
            batch_size = cfg.endpoint.processor.get("batch_size", 64)
            out = inference.run(inference.from_rows(part, batch_size), processor, columns, http=True)
            batches += inference.with_progress(out.iter_batches(batch_format="pyarrow", batch_size=None),
                                               total=len(part), what="evaluate")
    else:
        processor = inference.engine_processor(model_source, cfg.processor, cfg.sampling_params, adapters, columns)
        out = inference.run(inference.from_rows(items, cfg.processor.get("batch_size", 32)), processor, columns)
        batches = list(inference.with_progress(out.iter_batches(batch_format="pyarrow", batch_size=None),
                                               total=len(items), what="evaluate"))
    n = sum(b.num_rows for b in batches)
    if n != len(items):
        raise WorkflowError(f"evaluate: {len(items)} rows went in but {n} came out")
    return pa.concat_tables(batches).sort_by([("variant", "ascending"), ("row_id", "ascending")])


def model_for_engine(ctx: StageContext) -> str:
    """The base model as vLLM loads it: a local folder (downloaded from s3/gs) or a hub id."""
    model = ctx.upstream("model")["outputs"]["model"]
    if storage.is_local(model):  # a local folder, or a hub id (which has no scheme either)
        return str(storage.local_path(model))
    return str(storage.materialize(model, ctx.scratch("model")))


# ---------------------------------------------------------------- metrics and report

def score(table, names: list[str]) -> dict[str, Any]:
    """Per variant: the metrics, the per-function breakdown, row and error counts, token totals."""
    df = table.to_pandas()
    results = {}
    for variant, group in df.groupby("variant", sort=True):
        expected, got = group["expected"].tolist(), group["generated_text"].tolist()
        results[variant] = {
            "metrics": metrics.compute(names, expected, got),
            "per_function": metrics.per_function(names, expected, got),
            "rows": len(group),
            "errors": int((group["error"] != "").sum()),
            "generated_tokens": int(group["num_generated_tokens"].sum()),
        }
    return results


def worst_errors(table, variant: str, limit: int) -> list[dict[str, Any]]:
    """The variant's wrong answers, worst first (unparseable, then lowest slot F1)."""
    df = table.to_pandas()
    df = df[(df["variant"] == variant) & (df["expected"] != df["generated_text"])]
    ranked = []
    for row in df.itertuples():
        unparseable = metrics.parse_call(row.generated_text) is None
        f1 = metrics.slot_f1([row.expected], [row.generated_text])
        ranked.append((not unparseable, f1, row.row_id, row))
    ranked.sort(key=lambda t: t[:3])
    return [{"row_id": int(r.row_id), "input": r.input, "expected": r.expected, "got": r.generated_text,
             "error": r.error} for *_, r in ranked[:limit]]


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown_report(ctx: StageContext, results: dict[str, Any], table, cfg: EvaluateConfig) -> str:
    variants = list(results)
    lines = [f"# Evaluation: {ctx.recipe.name}", "",
             f"Split `{cfg.split}`, {results[variants[0]]['rows']} rows per variant; sampling "
             f"`{json.dumps(cfg.sampling_params)}`.", "", "## Metrics", "",
             "| metric | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for name in cfg.metrics:
        lines.append(f"| {name} | " + " | ".join(f"{results[v]['metrics'][name]:.3f}" for v in variants) + " |")
    lines.append("| error rows | " + " | ".join(str(results[v]["errors"]) for v in variants) + " |")
    lines.append("| generated tokens | " + " | ".join(str(results[v]["generated_tokens"]) for v in variants) + " |")
    functions = sorted({fn for v in variants for fn in results[v]["per_function"]})
    shown = [m for m in ("function_accuracy", "slot_f1", "exact_match") if m in cfg.metrics] or cfg.metrics[:2]
    lines += ["", "## Per function", "", f"Each cell: {' / '.join(shown)} (rows).", "",
              "| function | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for fn in functions:
        cells = []
        for v in variants:
            got = results[v]["per_function"].get(fn)
            cells.append(" / ".join(f"{got[m]:.2f}" for m in shown) + f" ({got['rows']})" if got else "-")
        lines.append(f"| {fn} | " + " | ".join(cells) + " |")
    lines += ["", "## Worst errors", ""]
    for v in variants:
        worst = worst_errors(table, v, cfg.worst_errors)
        lines += [f"### {v}", ""]
        if not worst:
            lines += ["No wrong answers.", ""]
            continue
        lines += ["| row | input | expected | got |", "|---|---|---|---|"]
        for w in worst:
            got = w["got"] if not w["error"] else f"(error: {w['error']})"
            lines.append(f"| {w['row_id']} | {_cell(w['input'])} | {_cell(w['expected'])} | {_cell(got)} |")
        lines.append("")
    lines += ["![metrics](metrics.png)", ""]
    return "\n".join(lines)


def chart(results: dict[str, Any], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results)
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names)), 4))
    for i, v in enumerate(variants):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [results[v]["metrics"][n] for n in names], width, label=v)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("Evaluation metrics by variant")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(results: dict[str, Any], names: list[str]) -> None:
    width = max(len(v) for v in results) + 2
    print("[evaluate] " + "variant".ljust(width) + "".join(n[:12].rjust(13) for n in names) + "   errors", flush=True)
    for v, r in results.items():
        print("[evaluate] " + v.ljust(width) + "".join(f"{r['metrics'][n]:13.3f}" for n in names)
              + f"   {r['errors']:6d}", flush=True)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.recipe.evaluate
    check_library_fields(cfg)
    rows = load_rows(ctx, cfg)
    table = predict(ctx, cfg, rows)
    results = score(table, cfg.metrics)
    with tempfile.TemporaryDirectory(prefix="workflow-evaluate-") as tmp:
        out = Path(tmp)
        import pyarrow.parquet as pq

        pq.write_table(table, out / "predictions.parquet")
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        chart(results, cfg.metrics, out / "metrics.png")
        (out / "report.md").write_text(markdown_report(ctx, results, table, cfg))
        storage.upload_dir(out, ctx.out_uri, last=["metrics.json"])
    print_summary(results, cfg.metrics)
    outputs = {name: storage.join(ctx.out_uri, name)
               for name in ("predictions.parquet", "metrics.json", "report.md", "metrics.png")}
    summary = {"metrics": {v: r["metrics"] for v, r in results.items()},
               "errors": {v: r["errors"] for v, r in results.items()}, "rows": len(rows),
               "metrics_sha256": manifest.hash_file(outputs["metrics.json"])}
    return StageResult(outputs=outputs, summary=summary)
