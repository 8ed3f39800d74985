"""A user's own metric and parser, named by import path in tests/evaluation/test_metrics.py."""


def first_word_match(expected: list[str], got: list[str]) -> float:
    return sum(e.split()[:1] == g.split()[:1] for e, g in zip(expected, got, strict=True)) / len(expected)


def upper(text: str) -> str:
    return text.upper()


def verdict(expected: list[str], got: list[str]) -> str:
    """A metric whose value is a string (the report and the summary print it as it is)."""
    return "all equal" if expected == got else "some differ"


def breakdown(expected: list[str], got: list[str]) -> dict:
    """A metric whose value is nested."""
    return {"rows": len(expected), "equal": [e == g for e, g in zip(expected, got, strict=True)]}


def nothing(expected: list[str], got: list[str]) -> None:
    """A metric with no value."""
    return None
