"""The evaluation report: per-variant scores, worst errors, ``report.md``, the chart, the console table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config.evaluate import EvaluateConfig
from ..core.console import say
from . import metrics


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


def markdown_report(run_name: str, results: dict[str, Any], table, cfg: EvaluateConfig) -> str:
    variants = list(results)
    lines = [f"# Evaluation: {run_name}", "",
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
    say("[evaluate] " + "variant".ljust(width) + "".join(n[:12].rjust(13) for n in names) + "   errors")
    for v, r in results.items():
        say("[evaluate] " + v.ljust(width) + "".join(f"{r['metrics'][n]:13.3f}" for n in names)
            + f"   {r['errors']:6d}")
