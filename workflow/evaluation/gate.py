"""The promotion gate (``serve.require``): which adapters the evaluate stage's scores allow to be served.

Read from ``metrics.json`` (``evaluation/report.py``'s ``score``: per variant its ``metrics`` and 95%
``intervals``): an adapter is judged on its unconstrained variant, the one named like the adapter, which
is what a client gets that sends no decoding constraint; the base model's variant is ``base``.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import WorkflowError
from . import metrics

BASE = "base"


def _score(results: dict[str, Any], variant: str, metric: str) -> str:
    """``0.815 [0.800, 0.829]``: the score and its interval, as report.md shows them."""
    entry = results[variant]
    text = metrics.format_value(entry["metrics"][metric])
    interval = (entry.get("intervals") or {}).get(metric)
    if interval and all(metrics.is_number(x) for x in interval):
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def shortfalls(require, results: dict[str, Any], adapter: str, where: str) -> list[str]:
    """What keeps ``adapter`` from being served under ``require`` (a ``RequireConfig``): one phrase per
    unmet threshold, naming the metric, its value and its interval; empty when it passes."""
    if adapter not in results:
        return [f"it has no scores in the evaluate stage's metrics.json (variants: {', '.join(results)})"]
    known = results[adapter]["metrics"]
    for metric in require.metrics:
        if metric not in known:
            raise WorkflowError(f"{where}: serve.require names {metric!r}, which the evaluation does not score",
                                hint=f"use one of {', '.join(known)} (the task's metrics)")
    found = []
    for metric, lowest in require.at_least.items():
        value = known[metric]
        if not metrics.is_number(value) or value < lowest:
            found.append(f"{metric} {_score(results, adapter, metric)} is below serve.require.at_least.{metric}: "
                         f"{lowest}")
    for metric, margin in require.beats_base_by.items():
        if BASE not in results:
            raise WorkflowError(f"{where}: serve.require.beats_base_by needs the base model's scores, which the "
                                "evaluate stage did not record", hint="remove beats_base_by, or evaluate the base too")
        value, base = known[metric], results[BASE]["metrics"][metric]
        if not (metrics.is_number(value) and metrics.is_number(base)) or value - base < margin:
            found.append(f"{metric} {_score(results, adapter, metric)} against the base's "
                         f"{_score(results, BASE, metric)} is short of serve.require.beats_base_by.{metric}: {margin}")
    return found


def gate(require, results: dict[str, Any], adapters: list[str], where: str) -> tuple[list[str], list[str]]:
    """(adapters that pass, one line for each that does not)."""
    passed, refused = [], []
    for adapter in adapters:
        found = shortfalls(require, results, adapter, where)
        if found:
            refused.append(f"adapter {adapter!r} is not served: " + "; ".join(found))
        else:
            passed.append(adapter)
    return passed, refused
