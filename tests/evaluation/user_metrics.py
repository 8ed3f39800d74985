"""A user's own metric and parser, named by import path in tests/evaluation/test_metrics.py."""


def first_word_match(expected: list[str], got: list[str]) -> float:
    return sum(e.split()[:1] == g.split()[:1] for e, g in zip(expected, got, strict=True)) / len(expected)


def upper(text: str) -> str:
    return text.upper()
