"""Evaluation metrics: plain functions in a registry, grouped by task kind.

A metric is a per-row statistic and an aggregate over rows (the mean, or a ratio of sums for
micro-averaged slot and field scores, or macro-F1 over the rows' label pairs): the score on
the whole split is ``aggregate([per_row(e, g) for each row])``, and the bootstrap interval
resamples the rows' statistics without recomputing them. ``parsed`` metrics read what the
task's parser made of each answer (``None`` where it could not parse), the others the raw
strings. ``exact_match`` is the reference tutorial's metric as it defines it
(``output == generated_text``, no normalisation).
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    per_row: Callable[[Any, Any], Any]
    aggregate: Callable[[list], float]
    parsed: bool = False
    # The per-row statistics are numbers (or tuples of numbers) and the aggregate of any rows equals
    # the aggregate of their mean statistic alone (a mean, a ratio of sums): resampled with numpy.
    by_mean: bool = True
    # One line for the report's legend: what the score is.
    definition: str = ""


METRICS: dict[str, dict[str, Metric]] = {"text": {}, "call": {}, "json": {}, "label": {}}
# A recipe names these metrics; it is validated against workflow.config.task.KIND_METRICS, which lists
# each kind's names (and MAIN_METRIC, the one the summary leads with): a new metric goes there too.


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def register(name: str, kinds: Sequence[str], *, aggregate: Callable[[list], float] = mean, parsed: bool = False,
             by_mean: bool = True, definition: str = ""):
    """Add ``per_row`` as the metric ``name`` of each of ``kinds`` (``definition``: its line in the report's legend)."""
    def add(per_row: Callable[[Any, Any], Any]):
        for kind in kinds:
            if name in METRICS[kind]:
                raise ValueError(f"metric {name!r} of kind {kind!r} is registered twice")
            METRICS[kind][name] = Metric(per_row, aggregate, parsed, by_mean, definition)
        return per_row

    return add


def kind_metrics(kind: str) -> list[str]:
    return list(METRICS[kind])


def from_function(fn: Callable[[list[str], list[str]], Any], path: str = "") -> Metric:
    """A user's ``fn(expected, got)`` over the whole split (raw strings) as a Metric; a number it returns is
    a float, anything else (a string, None, a dict) is kept as it is and shown as it is."""
    def aggregate(pairs: list) -> Any:
        value = fn([e for e, _ in pairs], [g for _, g in pairs])
        return float(value) if is_number(value) else value

    return Metric(per_row=lambda e, g: (e, g), aggregate=aggregate, by_mean=False,
                  definition=f"your function {path}(expected, got) over the split's raw strings" if path else "")


def is_number(value: Any) -> bool:
    """A real number a score can be (not a bool, not NaN)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def format_value(value: Any, digits: int = 3) -> str:
    """A metric value as the console and the reports print it, whatever it is: a number to ``digits``
    places, None as ``n/a``, a string as it is, anything else as compact JSON (cut at 60 characters)."""
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value).lower()
    if isinstance(value, numbers.Real):
        return f"{value:.{digits}f}"
    if isinstance(value, str):
        return value
    try:
        text = json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
    except (TypeError, ValueError):
        text = str(value)
    return text if len(text) <= 60 else text[:59] + "…"


def score(metric: Metric, expected: list, got: list) -> float:
    return metric.aggregate([metric.per_row(e, g) for e, g in zip(expected, got, strict=True)])


def bootstrap_interval(metric: Metric, stats: list, *, samples: int, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile interval of ``metric.aggregate`` over ``samples`` resamplings of the rows (seeded)."""
    import numpy as np

    if not stats or samples <= 0:
        return (float("nan"), float("nan"))
    picks = np.random.default_rng(seed).integers(0, len(stats), size=(samples, len(stats)))
    if metric.by_mean:
        means = np.asarray(stats, dtype=float)[picks].mean(axis=1)
        values = [metric.aggregate([tuple(m) if np.ndim(m) else float(m)]) for m in means]
    else:
        values = [metric.aggregate([stats[i] for i in row]) for row in picks]
    values = [v for v in values if is_number(v)]
    if not values:  # a metric whose value is not a number has no interval
        return (float("nan"), float("nan"))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


# ---------------------------------------------------------------- text (every kind has these)

def normalize(text: str) -> str:
    """Lower case, runs of whitespace collapsed, no space around brackets, commas and the like."""
    text = " ".join((text or "").lower().split())
    return re.sub(r"\s*([()\[\]{},;:=])\s*", r"\1", text)


@register("exact_match", ("text", "call", "json", "label"),
          definition="share of rows whose answer is the reference, character for character (no normalisation)")
def exact_match(expected: str, got: str) -> float:
    return float(expected == got)


@register("normalized_exact_match", ("text", "call"),
          definition="share of rows equal after lower-casing, collapsing whitespace and dropping it around "
                     "brackets, commas, colons, semicolons and '='")
def normalized_exact_match(expected: str, got: str) -> float:
    return float(normalize(expected) == normalize(got))


@register("token_f1", ("text",),
          definition="mean over rows of SQuAD's token F1 (lower-cased whitespace tokens as a multiset; 1 where "
                     "both are empty)")
def token_f1(expected: str, got: str) -> float:
    """SQuAD's token F1: lower-cased whitespace tokens, counted as a multiset."""
    e, g = (expected or "").lower().split(), (got or "").lower().split()
    if not e or not g:
        return float(e == g)
    common = sum((Counter(e) & Counter(g)).values())
    if not common:
        return 0.0
    p, r = common / len(g), common / len(e)
    return 2 * p * r / (p + r)


class _WordTokenizer:
    """rouge-score's tokenizer for any script: lower-cased runs of letters and digits (rouge-score's own keeps
    a-z0-9 only, so two identical sentences in Greek or Japanese scored 0), Porter-stemmed past 3 characters
    as rouge-score stems them."""

    def __init__(self):
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words = re.findall(r"[^\W_]+", text.lower())
        return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


_ROUGE = None  # (rouge-score's scorer, the word tokenizer it was given), made on first use


@register("rouge_l", ("text",),
          definition="mean over rows of the ROUGE-L F-measure (longest common word subsequence; words of any script, "
                     "stemmed; 1 where both have no word and are equal)")
def rouge_l(expected: str, got: str) -> float:
    """ROUGE-L F-measure of the answer against the reference (Google's rouge-score, stemmed, any script)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        words = _WordTokenizer()
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=words), words
    scorer, words = _ROUGE
    if not words.tokenize(expected or "") and not words.tokenize(got or ""):
        return float((expected or "").strip() == (got or "").strip())
    return scorer.score(expected or "", got or "")["rougeL"].fmeasure


_CHRF = None


@register("chrf", ("text",),
          definition="mean over rows of sentence chrF (sacrebleu's defaults: character 6-grams, beta 2) scaled to "
                     "0-1; 1 where both are empty")
def chrf(expected: str, got: str) -> float:
    """Sentence chrF (sacrebleu's defaults), scaled to 0-1; the split's score is the rows' mean."""
    global _CHRF
    if _CHRF is None:
        from sacrebleu.metrics import CHRF

        _CHRF = CHRF()
    if not (expected or "").strip() and not (got or "").strip():
        return 1.0
    return _CHRF.sentence_score(got or "", [expected or ""]).score / 100


# ---------------------------------------------------------------- call: FunctionCall values (tasks.parse_call)

def _ratio_f1(kind: str) -> Callable[[list], float]:
    def aggregate(counts: list) -> float:
        tp, n_got, n_expected = (sum(c[i] for c in counts) for i in range(3))
        p = tp / n_got if n_got else 0.0
        r = tp / n_expected if n_expected else 0.0
        return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}[kind]

    return aggregate


def slot_counts(expected, got) -> tuple[int, int, int]:
    """(true positives, generated slots, expected slots) of one row; unparseable = no slots."""
    e = expected.slots if expected is not None else frozenset()
    g = got.slots if got is not None else frozenset()
    return len(e & g), len(g), len(e)


@register("function_accuracy", ("call",), parsed=True,
          definition="share of rows whose answer names the reference's function (an answer with no readable name "
                     "is wrong)")
def function_accuracy(expected, got) -> float:
    """The generated function name is the expected one (an answer with no readable name is wrong)."""
    return float(expected is not None and got is not None and expected.name == got.name)


_RATIO_DEFINITIONS = {
    "precision": "{what}s answered that the reference has / {what}s answered, over all rows",
    "recall": "{what}s of the references that were answered / {what}s of the references, over all rows",
    "f1": "harmonic mean of {what} precision and recall (micro-averaged over all rows)",
}
_ZERO = "; 0 where nothing is counted"

for _part in ("precision", "recall", "f1"):
    register(f"slot_{_part}", ("call",), aggregate=_ratio_f1(_part), parsed=True,
             definition=_RATIO_DEFINITIONS[_part].format(what="slot") + " (a slot: attribute and value, a "
             "value-less slot has value ''; an unparseable call has none)" + _ZERO)(slot_counts)


@register("parse_failure_rate", ("call", "json"), parsed=True,
          definition="share of rows whose answer does not parse in full (a call with a malformed slot, invalid JSON)")
def parse_failure_rate(expected, got) -> float:
    """The answer does not parse in full (a call with a malformed slot, invalid JSON)."""
    return float(got is None or getattr(got, "complete", True) is False)


# ---------------------------------------------------------------- json: canonical JSON values (tasks.parse_json)

@register("json_validity", ("json",), parsed=True, definition="share of rows whose answer is valid JSON")
def json_validity(expected, got) -> float:
    return float(got is not None)


@register("json_exact_match", ("json",), parsed=True,
          definition="share of rows whose answer is the reference's JSON value (key order and whitespace aside)")
def json_exact_match(expected, got) -> float:
    """Equal after canonicalisation (key order and whitespace do not count)."""
    return float(got is not None and expected is not None and got.canonical == expected.canonical)


def field_counts(expected, got) -> tuple[int, int, int]:
    e = expected.fields if expected is not None else frozenset()
    g = got.fields if got is not None else frozenset()
    return len(e & g), len(g), len(e)


for _part in ("precision", "recall", "f1"):
    register(f"field_{_part}", ("json",), aggregate=_ratio_f1(_part), parsed=True,
             definition=_RATIO_DEFINITIONS[_part].format(what="field") + " (a field: a leaf's path and value; "
             "an empty object or array as the whole value has none)" + _ZERO)(field_counts)


# ---------------------------------------------------------------- label: stripped strings

@register("accuracy", ("label",), parsed=True,
          definition="share of rows whose answer, stripped of surrounding whitespace, is the reference's label")
def accuracy(expected, got) -> float:
    return float(expected == got)


def macro_f1_of_pairs(pairs: list) -> float:
    """Macro-F1 over the labels that occur as expected or predicted (an unparseable answer is no label)."""
    labels = {e for e, _ in pairs} | {g for _, g in pairs if g is not None}
    scores = []
    for label in labels:
        tp = sum(1 for e, g in pairs if e == label and g == label)
        n_got = sum(1 for _, g in pairs if g == label)
        n_expected = sum(1 for e, _ in pairs if e == label)
        p = tp / n_got if n_got else 0.0
        r = tp / n_expected if n_expected else 0.0
        scores.append(2 * p * r / (p + r) if p + r else 0.0)
    return mean(scores)


@register("macro_f1", ("label",), aggregate=macro_f1_of_pairs, parsed=True, by_mean=False,
          definition="mean over the labels that occur as reference or answer of each label's F1 (an empty answer "
                     "is no label)")
def label_pair(expected, got):
    return (expected, got)
