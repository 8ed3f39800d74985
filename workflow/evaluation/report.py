"""The evaluation report: per-variant scores with intervals, the task's breakdowns, worst errors,
``report.md``, the charts and the console table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..config.evaluate import EvaluateConfig
from ..config.task import dump
from ..core.console import say
from . import metrics
from .parity import describe
from .tasks import Task


def _rows_scores(task: Task, expected: list[str], got: list[str], bootstrap: int) -> dict[str, Any]:
    """The task's metrics on these rows, each with its bootstrap interval, and the parsed answers."""
    parsed_expected, parsed_got = [task.parse(e) for e in expected], [task.parse(g) for g in got]
    scores, intervals = {}, {}
    for name, metric in task.metrics.items():
        e, g = (parsed_expected, parsed_got) if metric.parsed else (expected, got)
        stats = [metric.per_row(a, b) for a, b in zip(e, g, strict=True)]
        scores[name] = metric.aggregate(stats)
        if bootstrap and metrics.is_number(scores[name]):
            intervals[name] = list(metrics.bootstrap_interval(metric, stats, samples=bootstrap))
    return {"metrics": scores, "intervals": intervals, "parsed": (parsed_expected, parsed_got)}


def _breakdowns(task: Task, parsed_expected: list, parsed_got: list, expected: list[str],
                got: list[str]) -> dict[str, Any]:
    """Call: per function and per attribute; label: per label and the confusion counts."""
    if task.kind == "call":
        groups: dict[str, list[int]] = {}
        for i, call in enumerate(parsed_expected):
            groups.setdefault(call.name if call else "(unparseable reference)", []).append(i)
        per_function = {}
        for fn, idx in sorted(groups.items()):
            per_function[fn] = {"rows": len(idx)}
            for name, metric in task.metrics.items():
                e, g = (parsed_expected, parsed_got) if metric.parsed else (expected, got)
                per_function[fn][name] = metrics.score(metric, [e[i] for i in idx], [g[i] for i in idx])
        per_attribute: dict[str, list[int]] = {}
        for e, g in zip(parsed_expected, parsed_got, strict=True):
            e_slots = e.slots if e else frozenset()
            g_slots = g.slots if g else frozenset()
            for attr in {a for a, _ in e_slots | g_slots}:
                mine_e = {s for s in e_slots if s[0] == attr}
                mine_g = {s for s in g_slots if s[0] == attr}
                counts = per_attribute.setdefault(attr, [0, 0, 0])
                counts[0] += len(mine_e & mine_g)
                counts[1] += len(mine_g)
                counts[2] += len(mine_e)
        f1 = metrics.METRICS["call"]["slot_f1"].aggregate
        return {"per_function": per_function,
                "per_attribute": {a: {"expected": c[2], "slot_f1": f1([tuple(c)])} for a, c in sorted(per_attribute.items())}}
    if task.kind == "label":
        confusion: dict[str, dict[str, int]] = {}
        for e, g in zip(parsed_expected, parsed_got, strict=True):
            row = confusion.setdefault(str(e), {})
            row[str(g)] = row.get(str(g), 0) + 1
        return {"confusion": confusion}
    return {}


def score(table, task: Task, *, bootstrap: int = 1000) -> dict[str, Any]:
    """Per variant: the metrics (the mean over seeds where there are several, and their spread),
    95% intervals, the task's breakdowns, row and error counts, token totals."""
    df = table.to_pandas()
    results = {}
    for variant, group in df.groupby("variant", sort=True):
        seeds = sorted(group["seed"].dropna().unique()) if "seed" in group else []
        passes = [group[group["seed"] == s] for s in seeds] if len(seeds) > 1 else [group]
        pooled = _rows_scores(task, group["expected"].tolist(), group["generated_text"].tolist(), bootstrap)
        per_pass = [pooled] if len(passes) == 1 else [
            _rows_scores(task, p["expected"].tolist(), p["generated_text"].tolist(), 0) for p in passes]
        entry: dict[str, Any] = {
            "metrics": {m: _mean_over_passes([p["metrics"][m] for p in per_pass]) for m in task.metrics},
            "intervals": pooled["intervals"],
            "rows": len(passes[0]),
            "errors": int((group["error"] != "").sum()),
            "generated_tokens": int(group["num_generated_tokens"].sum()),
            **_breakdowns(task, *pooled["parsed"], group["expected"].tolist(), group["generated_text"].tolist()),
        }
        if len(passes) > 1:
            entry["seeds"] = {str(int(s)): p["metrics"] for s, p in zip(seeds, per_pass, strict=True)}
            entry["spread"] = {m: statistics.stdev(p["metrics"][m] for p in per_pass) for m in task.metrics
                               if all(metrics.is_number(p["metrics"][m]) for p in per_pass)}
        results[variant] = entry
    return results


def _mean_over_passes(values: list) -> Any:
    """The mean of one metric over the seeds' passes; a value that is not a number is kept from the first pass."""
    return statistics.fmean(values) if all(metrics.is_number(v) for v in values) else values[0]


def worst_errors(table, variant: str, task: Task, limit: int) -> list[dict[str, Any]]:
    """The variant's wrong answers, worst first by the task's main metric on each row."""
    df = table.to_pandas()
    df = df[(df["variant"] == variant) & (df["expected"] != df["generated_text"])]
    if "seed" in df and df["seed"].notna().any():
        df = df[df["seed"] == df["seed"].min()]
    ranked = [(task.row_score(row.expected, row.generated_text), row.row_id, row) for row in df.itertuples()]
    # A row whose score is not a number (a user's metric) ranks with the worst.
    ranked.sort(key=lambda t: (t[0] if metrics.is_number(t[0]) else float("-inf"), t[1]))
    return [{"row_id": int(r.row_id), "input": r.input, "expected": r.expected, "got": r.generated_text,
             "error": r.error, task.main_metric: value} for value, _, r in ranked[:limit]]


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def score_text(result: dict[str, Any], name: str) -> str:
    """A metric of one variant as a cell shows it: the score, ±sd over seeds where there are several,
    and its 95% bootstrap interval (report.md and the run's report page)."""
    text = metrics.format_value(result["metrics"].get(name))
    if name in result.get("spread", {}):
        text += f" ±{metrics.format_value(result['spread'][name])}"
    interval = result.get("intervals", {}).get(name)
    if interval and all(metrics.is_number(x) for x in interval):
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def markdown_report(run_name: str, results: dict[str, Any], table, cfg: EvaluateConfig, task: Task,
                    parity: dict[str, Any] | None = None) -> str:
    """``parity``: the content of parity.json (evaluation/parity.py), or None when it was not checked."""
    variants = list(results)
    names = list(task.metrics)
    first = results[variants[0]]
    seeds = f"; seeds {cfg.seeds} (each cell: mean ±sd over seeds)" if cfg.seeds else ""
    lines = [f"# Evaluation: {run_name}", "",
             f"Split `{cfg.split}`, {first['rows']} rows per variant; sampling `{json.dumps(cfg.sampling_params)}`"
             f"{seeds}.", "",
             f"Task: `{json.dumps(dump(task.config))}`; main metric `{task.main_metric}`."
             + (f" Constraint vocabulary: `{json.dumps(task.vocabulary)}`." if task.vocabulary else ""), "",
             "## Metrics", "",
             (f"95% intervals: bootstrap over rows ({cfg.bootstrap} resamplings)." if cfg.bootstrap else ""), "",
             "| metric | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_cell(score_text(results[v], name)) for v in variants) + " |")
    lines.append("| error rows | " + " | ".join(str(results[v]["errors"]) for v in variants) + " |")
    lines.append("| generated tokens | " + " | ".join(str(results[v]["generated_tokens"]) for v in variants) + " |")
    if parity is not None:
        checked = parity["adapters"]
        lines.append("| parity with training | " + " | ".join(
            f"{checked[v]['identical']}/{checked[v]['rows']}" if v in checked else "" for v in variants) + " |")
    lines += _legend(task)
    if task.kind == "call":
        lines += _per_function(results, variants, names) + _per_attribute(results, variants)
    if task.kind == "label":
        lines += ["", "## Per label", "", "Confusion matrices: ![confusion](confusion.png)", ""]
    if parity is not None:
        lines += _parity(parity)
    lines += ["", "## Worst errors", "", f"Ranked by `{task.main_metric}` on the row, lowest first.", ""]
    for v in variants:
        worst = worst_errors(table, v, task, cfg.worst_errors)
        lines += [f"### {v}", ""]
        if not worst:
            lines += ["No wrong answers.", ""]
            continue
        lines += [f"| row | input | expected | got | {task.main_metric} |", "|---|---|---|---|---|"]
        for w in worst:
            got = w["got"] if not w["error"] else f"(error: {w['error']})"
            lines.append(f"| {w['row_id']} | {_cell(w['input'])} | {_cell(w['expected'])} | {_cell(got)} | "
                         f"{_cell(metrics.format_value(w[task.main_metric], 2))} |")
        lines.append("")
    lines += ["![metrics](metrics.png)", ""]
    return "\n".join(lines)


def _legend(task: Task) -> list[str]:
    """One line per metric: what its score is."""
    lines = ["", "Metrics, as computed here:", ""]
    for name, metric in task.metrics.items():
        lines.append(f"- `{name}`: {metric.definition or 'a metric of your own'}")
    return lines


def _parity(parity: dict[str, Any]) -> list[str]:
    ref = parity["reference"]
    lines = ["", "## Parity", "",
             f"The first {parity['rows']} rows, decoded greedily by each adapter as trained ({ref['by']}, "
             f"{ref['dtype']} on {ref['device']}) against the engine's answers ({parity['engine']['dtype']}, "
             f"sampling `{json.dumps(parity['engine']['sampling_params'])}`); threshold "
             f"{parity['min_identical']} of the rows identical.", ""]
    for name, result in parity["adapters"].items():
        lines.append(f"- {name}: parity: {describe(result)}")
        for m in result["mismatches"]:
            lines.append(f"  - row {m['row']}: token {m['position']}: training {m['reference']!r}, engine "
                         f"{m['engine']!r} ({m['reference_tokens']} vs {m['engine_tokens']} tokens)")
    return lines


def _per_function(results: dict[str, Any], variants: list[str], names: list[str]) -> list[str]:
    functions = sorted({fn for v in variants for fn in results[v]["per_function"]})
    shown = [m for m in ("function_accuracy", "slot_f1", "exact_match") if m in names] or names[:2]
    lines = ["", "## Per function", "", f"Each cell: {' / '.join(shown)} (rows).", "",
             "| function | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for fn in functions:
        cells = []
        for v in variants:
            got = results[v]["per_function"].get(fn)
            cells.append(" / ".join(_cell(metrics.format_value(got[m], 2)) for m in shown) + f" ({got['rows']})"
                         if got else "-")
        lines.append(f"| {fn} | " + " | ".join(cells) + " |")
    return lines


def _per_attribute(results: dict[str, Any], variants: list[str]) -> list[str]:
    attributes = sorted({a for v in variants for a in results[v]["per_attribute"]})
    lines = ["", "## Per attribute", "", "Each cell: slot F1 of the attribute (expected slots).", "",
             "| attribute | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for attr in attributes:
        cells = []
        for v in variants:
            got = results[v]["per_attribute"].get(attr)
            cells.append(f"{metrics.format_value(got['slot_f1'], 2)} ({got['expected']})" if got else "-")
        lines.append(f"| {attr} | " + " | ".join(cells) + " |")
    return lines


def chart(results: dict[str, Any], names: list[str], path: Path) -> None:
    """Bars per metric and variant, with the 95% intervals as error bars (metrics whose value is a number
    in every variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results)
    names = [n for n in names if all(metrics.is_number(results[v]["metrics"].get(n)) for v in variants)]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names)), 4))
    for i, v in enumerate(variants):
        xs = [j + i * width for j in range(len(names))]
        values = [results[v]["metrics"][n] for n in names]
        intervals = results[v].get("intervals", {})
        errors = None
        if all(n in intervals and all(metrics.is_number(x) for x in intervals[n]) for n in names):
            errors = [[max(0.0, val - intervals[n][0]) for n, val in zip(names, values, strict=True)],
                      [max(0.0, intervals[n][1] - val) for n, val in zip(names, values, strict=True)]]
        ax.bar(xs, values, width, label=v, yerr=errors, capsize=2)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title("Evaluation metrics by variant (95% intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_chart(results: dict[str, Any], path: Path) -> None:
    """One confusion matrix per variant (rows: expected label, columns: answer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results)
    labels = sorted({e for v in variants for e in results[v]["confusion"]})
    answers = labels + sorted({g for v in variants for row in results[v]["confusion"].values() for g in row}
                              - set(labels))
    fig, axes = plt.subplots(1, len(variants), figsize=(4.5 * len(variants), 4.2), squeeze=False)
    for ax, v in zip(axes[0], variants, strict=True):
        matrix = [[results[v]["confusion"].get(e, {}).get(g, 0) for g in answers] for e in labels]
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(answers)), [a[:14] for a in answers], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), [a[:14] for a in labels], fontsize=7)
        for i, row in enumerate(matrix):
            for j, n in enumerate(row):
                if n:
                    ax.text(j, i, str(n), ha="center", va="center", fontsize=6)
        ax.set_title(v, fontsize=9)
        ax.set_xlabel("answer", fontsize=8)
        ax.set_ylabel("expected", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(results: dict[str, Any], names: list[str]) -> None:
    width = max(len(v) for v in results) + 2
    say("[evaluate] " + "variant".ljust(width) + "".join(n[:12].rjust(13) for n in names) + "   errors")
    for v, r in results.items():
        say("[evaluate] " + v.ljust(width) + "".join(metrics.format_value(r["metrics"].get(n))[:12].rjust(13)
                                                     for n in names) + f"   {r['errors']:6d}")
