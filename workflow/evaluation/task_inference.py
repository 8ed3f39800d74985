"""The task a dataset's training outputs read as, as the ingest stage records it, and the check of a recipe's
evaluate section against it (the ingest stage runs it right after reading the data; ``workflow/preflight.py``
at the start of a run whose ingest stage is up to date and will not run).

The record is ``tasks.infer_with_evidence(outputs).as_dict()`` (the task as a recipe writes it, the kind, the
share of outputs that fit, a few that do not, the rule's reason and thresholds) plus ``from``: the split it
was read from.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import Recipe
from ..config.task import TaskConfig
from ..core.console import say
from . import tasks


def task_record(outputs: list[str], source: str = "training") -> tuple[dict[str, Any], list[str]]:
    """(the record for ingest's stats.json and manifest, the console lines saying it) for the outputs."""
    inferred = tasks.infer_with_evidence(outputs)
    return {**inferred.as_dict(), "from": source}, inferred.lines(source)


def recorded_task(record: dict[str, Any]) -> TaskConfig:
    """The task a record holds, as ``evaluate.task`` would."""
    return TaskConfig.model_validate(record["task"])


def stage_task(pinned: TaskConfig | None, ingest_manifest: dict[str, Any], stage: str) -> TaskConfig | None:
    """The task a stage scores with: the recipe's ``evaluate.task`` (``pinned``), else the one the ingest stage
    recorded (and one line saying so); None for an ingest stage that recorded none (then ``tasks.build`` infers
    it from the training outputs). The evaluate stage and the serve stage's smoke check both call it, so they
    score with the same task."""
    if pinned is not None:
        return pinned
    record = ingest_manifest.get("summary", {}).get("task")
    if record is None:
        return None
    say(f"[{stage}] task: {describe_task(record)}")
    return recorded_task(record)


def describe_task(record: dict[str, Any]) -> str:
    """One line for a stage that uses the ingest stage's record instead of inferring again."""
    text = (f"kind {record['kind']!r}, as the ingest stage read {record['outputs']} {record['from']} outputs "
            f"({record['reason']})")
    if record["misfits"]:
        text += f"; {record['misfits']} do not fit and are scored as parse failures"
    return text + f"; to pin it, set evaluate.task: {json.dumps(record['task'])}"


def check_task(recipe: Recipe, record: dict[str, Any] | None, train_outputs: list[str] | None) -> None:
    """The recipe's evaluate section against the task: the explicit ``evaluate.task`` (a line says so where the
    data reads as another kind), else the one the data reads as (``record``). Builds the task as the evaluate stage will (its metrics, main metric and decoding
    constraint with the vocabulary learnt from ``train_outputs``), so what would fail there fails here."""
    evaluate = recipe.evaluate
    if evaluate is None or (evaluate.task is None and record is None):
        return
    where = f"{recipe.path or 'recipe'}: evaluate"
    if evaluate.task is not None and record is not None and evaluate.task.kind != record["kind"]:
        say(f"[ingest] warning: evaluate.task is a {evaluate.task.kind} task, and the {record['from']} outputs read "
            f"as {record['kind']!r} ({record['reason']}); going on with evaluate.task")
    cfg = evaluate.task or recorded_task(record)
    said = "" if evaluate.task else f" (inferred from the {record['from']} outputs, which read as {record['kind']!r})"
    tasks.build(cfg, train_outputs, constrained=evaluate.constrained_decoding, where=f"{where}.task{said}",
                stage="ingest")
