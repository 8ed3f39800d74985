"""Metric functions on hand-written cases, prompt building, and the constrained-decoding regex."""

import re

import pytest
from conftest import INSTRUCTION

from workflow.core.errors import WorkflowError
from workflow.evaluation import constraints, metrics
from workflow.prompts import messages as prompts

REF = "inform(name[Tom Clancy's The Division], genres[role-playing, shooter], rating[average])"
REORDERED = "inform(rating[average], name[Tom Clancy's The Division], genres[role-playing, shooter])"


def test_parse_call_reads_function_and_slots_with_commas_in_values():
    call = metrics.parse_call(REF)
    assert call.name == "inform"
    assert call.slots == {("name", "Tom Clancy's The Division"), ("genres", "role-playing, shooter"),
                          ("rating", "average")}
    assert metrics.parse_call("request_attribute(player_perspective[])").slots == {("player_perspective", "")}


@pytest.mark.parametrize("text", ["", "inform", "inform(name[x]", "inform(name[x] rating[y])", "inform(name[x],)",
                                  "inform(name)", "'ll'll'll", "inform(name[x]) trailing"])
def test_parse_call_rejects_malformed(text):
    assert metrics.parse_call(text) is None


def test_exact_match_is_strict_and_normalized_forgives_case_and_space():
    expected = [REF, REF, REF]
    got = [REF, REF.upper(), REF.replace(", ", " ,  ")]
    assert metrics.exact_match(expected, got) == pytest.approx(1 / 3)
    assert metrics.normalized_exact_match(expected, got) == 1.0
    assert metrics.exact_match([REF], [REF + " "]) == 0.0


def test_slot_metrics_ignore_attribute_order():
    assert metrics.exact_match([REF], [REORDERED]) == 0.0
    assert metrics.slot_f1([REF], [REORDERED]) == 1.0
    assert metrics.function_accuracy([REF], [REORDERED]) == 1.0


def test_slot_precision_recall_f1_on_partial_answers():
    # 2 of 3 expected slots found, plus 2 wrong ones: P = 2/4, R = 2/3.
    got = "give_opinion(name[Tom Clancy's The Division], rating[average], esrb[M], platforms[PC])"
    assert metrics.slot_precision([REF], [got]) == pytest.approx(0.5)
    assert metrics.slot_recall([REF], [got]) == pytest.approx(2 / 3)
    assert metrics.slot_f1([REF], [got]) == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert metrics.function_accuracy([REF], [got]) == 0.0


def test_parse_failures_count_as_wrong_and_in_the_failure_rate():
    expected = [REF, REF, REF, REF]
    got = [REF, "inform(name[x]", "", "nonsense"]
    assert metrics.parse_failure_rate(expected, got) == 0.75
    assert metrics.function_accuracy(expected, got) == 0.25
    assert metrics.slot_recall(expected, got) == pytest.approx(0.25)
    assert metrics.slot_precision(expected, got) == 1.0


def test_registry_and_per_function_breakdown():
    other = "request(specifier[fun], genres[shooter])"
    names = ["exact_match", "slot_f1"]
    assert set(names) <= set(metrics.METRICS)
    out = metrics.per_function(names, [REF, other, other], [REF, other, "request(genres[shooter])"])
    assert out["inform"] == {"rows": 1, "exact_match": 1.0, "slot_f1": 1.0}
    assert out["request"]["rows"] == 2 and out["request"]["exact_match"] == 0.5
    with pytest.raises(WorkflowError, match="unknown metric"):
        metrics.get(["exact_match", "bleu"])


def test_allowed_names_come_from_the_viggo_instruction():
    functions, attributes = constraints.allowed_names(INSTRUCTION)
    assert functions[0] == "inform" and "request_attribute" in functions and len(functions) == 9
    assert attributes[0] == "name" and "specifier" in attributes and len(attributes) == 14
    with pytest.raises(WorkflowError, match="constrained_decoding"):
        constraints.allowed_names("no lists here")


def test_call_regex_accepts_valid_calls_only_and_every_match_parses():
    functions, attributes = constraints.allowed_names(INSTRUCTION)
    rx = re.compile(constraints.call_regex(functions, attributes, max_value_chars=40))
    assert rx.fullmatch(REF) and rx.fullmatch(REORDERED)
    for bad in ["inform()", "shout(name[x])", "inform(colour[red])", "inform(name[x],rating[y])", "inform(name[a[b]])"]:
        assert rx.fullmatch(bad) is None, bad
    assert rx.fullmatch("inform(name[" + "x" * 41 + "])") is None
    two = re.compile(constraints.call_regex(["f"], ["a", "b"]))
    assert two.fullmatch("f(a[1], b[2])") and not two.fullmatch("f(a[1], b[2], a[3])")
    assert metrics.parse_call("inform(name[ x ], rating[])") is not None


def test_alpaca_rows_become_the_messages_training_saw():
    assert prompts.row_messages({"instruction": "Do it.", "input": "text", "output": "x"}) == [
        {"role": "user", "content": "Do it.\ntext"}]
    assert prompts.row_messages({"instruction": "", "input": "only input"}) == [
        {"role": "user", "content": "only input"}]
    assert prompts.row_messages({"instruction": "Do it.", "input": "", "system": "Be terse."}) == [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Do it."}]


def test_sharegpt_rows_drop_the_expected_answer():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "system": "s"}
    assert prompts.row_messages(row) == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert prompts.expected_output(row) == "a"
    assert prompts.expected_output({"instruction": "i", "output": "o"}) == "o"
    with pytest.raises(ValueError, match="a row needs"):
        prompts.row_messages({"text": "nothing usable"})
