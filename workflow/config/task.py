"""`evaluate.task:` — what the model's answers are and how to score them.

A task binds together how an answer is parsed, which metrics are computed, which decoding
constraint the constrained variants get, how the report is laid out and which metric ranks
the worst errors and is the one the summary leads with. Built-in kinds:

- ``text``: free text; exact and normalised exact match, token F1, ROUGE-L, chrF;
- ``call``: a function call, ``fn(attr[value], ...)`` or any syntax ``syntax`` describes
  (``fn(attr=value;attr=value)``, names such as ``?compare``); function accuracy, slot
  precision/recall/F1, parse failures, per-function and per-attribute breakdowns; the
  constraint is a regex of the same syntax;
- ``json``: a JSON value; validity, exact match after canonicalisation, field P/R/F1 over
  flattened keys; the constraint is a JSON schema (``schema``, or inferred from training);
- ``label``: one label out of a set; accuracy, macro-F1, a confusion matrix; the constraint
  is a choice over the labels.

The vocabulary of a constraint (``functions``, ``attributes``, ``labels``, ``schema``) is the
task's own or learnt from the training split's outputs. A recipe writes the task inline, or
names a YAML file: ``task: viggo`` is ``tasks/viggo.yaml`` of the project, ``task: my.yaml`` a
file beside the recipe. ``metrics`` and ``parser`` also take ``module:function`` import paths.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from .base import Section

KINDS = ("text", "call", "json", "label")
# The built-in metrics of each kind, in report order. ``workflow/evaluation/metrics.py`` registers a
# function under each of these names; tests/test_layers.py checks that the two name the same metrics
# (the recipe is validated here, below the evaluation package, which it must not import).
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "text": ("exact_match", "normalized_exact_match", "token_f1", "rouge_l", "chrf"),
    "call": ("exact_match", "normalized_exact_match", "function_accuracy", "slot_precision", "slot_recall",
             "slot_f1", "parse_failure_rate"),
    "json": ("exact_match", "parse_failure_rate", "json_validity", "json_exact_match", "field_precision",
             "field_recall", "field_f1"),
    "label": ("exact_match", "accuracy", "macro_f1"),
}
# The metric the summary leads with and the worst errors are ranked by, per kind.
MAIN_METRIC = {"text": "rouge_l", "call": "slot_f1", "json": "field_f1", "label": "accuracy"}


def kind_metrics(kind: str) -> list[str]:
    return list(KIND_METRICS[kind])


def import_function(path: str):
    """``module:function`` -> the function; ValueError naming what is wrong."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{path!r}: cannot import {module_name} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{path!r}: {module_name} has no function {attr!r}")
    return fn


class CallSyntax(Section):
    """How a call is written. ViGGO's ``fn(attr[value], attr[value])`` is the default;
    ``fn(attr=value;attr=value)`` is ``{assign: "=", separator: ";"}``.

    The constraint writes exactly these strings; the parser also accepts whitespace around
    the separator and the assignment.
    """

    args_open: str = Field(default="(", min_length=1)
    args_close: str = Field(default=")", min_length=1)
    separator: str = Field(default=", ", min_length=1)
    # attr[value]: the value between value_open and value_close ...
    value_open: str = Field(default="[", min_length=1)
    value_close: str = Field(default="]", min_length=1)
    # ... or attr=value when ``assign`` is set (a value then holds no separator and no args_close).
    assign: str | None = Field(default=None, min_length=1)


class TaskConfig(Section):
    kind: Literal["text", "call", "json", "label"]
    # Metric names of the kind (default: all of the kind's) or ``module:function`` paths of your own
    # (``fn(expected: list[str], got: list[str]) -> float``).
    metrics: list[str] | None = None
    # The metric the summary leads with, the worst errors are ranked by and the smoke check reports.
    main_metric: str | None = None
    # ``module:function`` turning an answer into a value; None where it cannot (then a parse failure).
    parser: str | None = None
    syntax: CallSyntax | None = None          # call
    functions: list[str] | None = None        # call: the names the constraint allows (default: learnt)
    attributes: list[str] | None = None       # call
    labels: list[str] | None = None           # label
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # json: a JSON schema

    model_config = ConfigDict(**Section.model_config, populate_by_name=True)

    @field_validator("metrics")
    @classmethod
    def _metrics_of_the_kind(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        for name in v or []:
            if ":" in name:
                import_function(name)
        kind = info.data.get("kind")
        unknown = [m for m in v or [] if ":" not in m and kind and m not in kind_metrics(kind)]
        if unknown:
            raise ValueError(f"{unknown} are not metrics of kind {kind!r}; it has {kind_metrics(kind)} "
                             "(or give 'module:function')")
        return v

    @field_validator("main_metric")
    @classmethod
    def _one_of_the_metrics(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or "kind" not in info.data:
            return v
        names = info.data.get("metrics") or kind_metrics(info.data["kind"])
        if v not in names:
            raise ValueError(f"{v!r} is not one of the task's metrics {names}")
        return v

    @field_validator("parser")
    @classmethod
    def _parser_imports(cls, v: str | None) -> str | None:
        if v is not None:
            import_function(v)
        return v

    @field_validator("syntax", "functions", "attributes", "labels", "schema_")
    @classmethod
    def _of_the_kind(cls, v: Any, info: ValidationInfo) -> Any:
        owner = {"syntax": "call", "functions": "call", "attributes": "call", "labels": "label", "schema_": "json"}
        kind = info.data.get("kind")
        if v is not None and kind and owner[info.field_name] != kind:
            raise ValueError(f"applies to kind {owner[info.field_name]!r}, not {kind!r}")
        return v

    def metric_names(self) -> list[str]:
        return list(self.metrics) if self.metrics else kind_metrics(self.kind)

    @property
    def call_syntax(self) -> CallSyntax:
        return self.syntax or CallSyntax()

    def main(self) -> str:
        if self.main_metric:
            return self.main_metric
        preferred = MAIN_METRIC[self.kind]
        names = self.metric_names()
        return preferred if preferred in names else names[0]


def dump(task: TaskConfig) -> dict[str, Any]:
    """The task as a recipe would write it (for the line that says how to pin an inferred task)."""
    return task.model_dump(mode="json", by_alias=True, exclude_none=True)

