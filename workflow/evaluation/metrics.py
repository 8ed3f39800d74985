"""Evaluation metrics: small plain functions in a registry, picked by name in the recipe.

Each metric takes the expected outputs and the generated ones (equal-length lists of
strings) and returns one number. ``exact_match`` is the reference tutorial's metric as it
defines it (``output == generated_text``, no normalisation). The function-call metrics read
ViGGO-style meaning representations, ``fn(attr[value], attr[value], ...)``: the function
name, and the slots as a set of (attribute, value) pairs, so attribute order does not count.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..core.errors import WorkflowError

Metric = Callable[[list[str], list[str]], float]
METRICS: dict[str, Metric] = {}

_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)
_SLOT = re.compile(r"\s*([A-Za-z_]\w*)\s*\[([^\[\]]*)\]\s*")


def register(name: str) -> Callable[[Metric], Metric]:
    def add(fn: Metric) -> Metric:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        METRICS[name] = fn
        return fn

    return add


def get(names: list[str]) -> dict[str, Metric]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise WorkflowError(f"evaluate.metrics: unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    return {n: METRICS[n] for n in names}


@dataclass(frozen=True)
class FunctionCall:
    name: str
    slots: frozenset[tuple[str, str]]


def parse_call(text: str) -> FunctionCall | None:
    """``fn(a[x], b[y, z])`` -> FunctionCall; None when the text is not of that form."""
    m = _CALL.match(text or "")
    if m is None:
        return None
    body = m.group(2).strip()
    slots = []
    pos = 0
    while pos < len(body):
        s = _SLOT.match(body, pos)
        if s is None:
            return None
        slots.append((s.group(1), s.group(2).strip()))
        pos = s.end()
        if pos < len(body):
            if body[pos] != ",":
                return None
            pos += 1
            if pos == len(body):  # a trailing comma
                return None
    return FunctionCall(m.group(1), frozenset(slots))


def normalize(text: str) -> str:
    """Lower case, runs of whitespace collapsed, no space around brackets and commas."""
    text = " ".join((text or "").lower().split())
    return re.sub(r"\s*([()\[\],])\s*", r"\1", text)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@register("exact_match")
def exact_match(expected: list[str], got: list[str]) -> float:
    return _mean([float(e == g) for e, g in zip(expected, got, strict=True)])


@register("normalized_exact_match")
def normalized_exact_match(expected: list[str], got: list[str]) -> float:
    return _mean([float(normalize(e) == normalize(g)) for e, g in zip(expected, got, strict=True)])


@register("function_accuracy")
def function_accuracy(expected: list[str], got: list[str]) -> float:
    """Share of rows whose generated function name is the expected one (unparseable = wrong)."""
    hits = []
    for e, g in zip(expected, got, strict=True):
        pe, pg = parse_call(e), parse_call(g)
        hits.append(float(pe is not None and pg is not None and pe.name == pg.name))
    return _mean(hits)


def slot_counts(expected: list[str], got: list[str]) -> tuple[int, int, int]:
    """(true positives, generated slots, expected slots), summed over rows (micro-averaged)."""
    tp = n_got = n_expected = 0
    for e, g in zip(expected, got, strict=True):
        pe, pg = parse_call(e), parse_call(g)
        exp_slots = pe.slots if pe else frozenset()
        got_slots = pg.slots if pg else frozenset()
        tp += len(exp_slots & got_slots)
        n_got += len(got_slots)
        n_expected += len(exp_slots)
    return tp, n_got, n_expected


@register("slot_precision")
def slot_precision(expected: list[str], got: list[str]) -> float:
    tp, n_got, _ = slot_counts(expected, got)
    return tp / n_got if n_got else 0.0


@register("slot_recall")
def slot_recall(expected: list[str], got: list[str]) -> float:
    tp, _, n_expected = slot_counts(expected, got)
    return tp / n_expected if n_expected else 0.0


@register("slot_f1")
def slot_f1(expected: list[str], got: list[str]) -> float:
    p, r = slot_precision(expected, got), slot_recall(expected, got)
    return 2 * p * r / (p + r) if p + r else 0.0


@register("parse_failure_rate")
def parse_failure_rate(expected: list[str], got: list[str]) -> float:
    """Share of generated outputs that are not of the form ``fn(attr[value], ...)``."""
    return _mean([float(parse_call(g) is None) for g in got])


def compute(names: list[str], expected: list[str], got: list[str]) -> dict[str, float]:
    return {name: fn(expected, got) for name, fn in get(names).items()}


def per_function(names: list[str], expected: list[str], got: list[str]) -> dict[str, dict[str, float]]:
    """The metrics for each expected function name separately, plus its row count."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(expected):
        call = parse_call(e)
        groups.setdefault(call.name if call else "(unparseable reference)", []).append(i)
    return {fn: {"rows": len(idx), **compute(names, [expected[i] for i in idx], [got[i] for i in idx])}
            for fn, idx in sorted(groups.items())}
