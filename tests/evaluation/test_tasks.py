"""Reading the task off the training outputs: the rule's thresholds at their edges, the misfits, the
value-less slot forms, the syntax chosen. Every expected value is worked out here from the rule as
tasks.py's comment states it."""

import json

import pytest

from workflow.config.task import CallSyntax
from workflow.evaluation import tasks

EQ = CallSyntax(assign="=", separator=";")


def calls(n: int) -> list[str]:
    return [f"inform(area=a{i};food=f{i})" for i in range(n)]


def test_the_rule_constants_are_the_documented_ones():
    assert (tasks.MIN_SHARE_THAT_FIT, tasks.LABEL_MAX_DISTINCT_SHARE, tasks.LABEL_MAX_WORDS) == (0.98, 0.10, 5)


def test_98_of_100_outputs_that_read_as_calls_make_a_call_task_and_the_2_misfits_are_counted():
    outputs = calls(98) + ["see you later", "inform(area=x;food"]
    found = tasks.infer_with_evidence(outputs)
    assert found.kind == "call" and found.syntax == EQ
    assert (found.outputs, found.fit, found.misfits) == (100, 98, 2)
    assert found.misfit_examples == ["see you later", "inform(area=x;food"]
    assert found.lines()[1].startswith("task: 2 of 100 outputs do not read as calls, e.g. 'see you later', ")
    assert tasks.infer(outputs) == found.config
    assert json.loads(json.dumps(found.as_dict()))["share_that_fit"] == 0.98


def test_97_of_100_are_too_few_for_a_call_task():
    found = tasks.infer_with_evidence(calls(97) + ["see you later", "bye now", "not a call"])
    assert found.kind == "text"  # 100 distinct outputs: no label task either
    assert found.shares["call"] == 0.97 and found.misfits == 0


def test_value_less_slots_in_every_common_form():
    for text in ("?request(area)", "?request(area=)", "?request(area[])"):
        assert tasks.parse_call(text, EQ) == tasks.FunctionCall("?request", frozenset({("area", "")})), text
    assert tasks.parse_call("request_attribute(player_perspective[])").slots == {("player_perspective", "")}
    assert tasks.parse_call("inform(player, name[x], rating)") == tasks.FunctionCall(
        "inform", frozenset({("player", ""), ("name", "x"), ("rating", "")}))
    # The bracket syntax does not read 'attr=value' as a value-less slot named 'attr=value'.
    assert tasks.parse_call("inform(name=x)").complete is False
    assert tasks.parse_call("inform(two words)").complete is False


def test_a_dataset_with_value_less_requests_and_punctuated_act_names_is_a_call_task():
    outputs = calls(50) + ["?request(area)", "!deny(food=thai)", "hello()"] * 10
    found = tasks.infer_with_evidence(outputs)
    assert found.kind == "call" and found.syntax == EQ and found.misfits == 0


def test_of_two_syntaxes_that_read_every_output_the_one_that_reads_values_wins():
    # 'inform(area)' reads in both the bracket and the '=' syntaxes; 'inform(area=x)' only in the second.
    found = tasks.infer_with_evidence(["inform(area)"] * 10 + ["inform(area=x;food=y)"] * 90)
    assert found.syntax == EQ


def test_label_by_shape_not_by_a_fixed_count():
    labels = [f"intent_{i}" for i in range(150)]
    assert tasks.infer(labels * 10).kind == "label"  # 150 distinct of 1,500 rows: 10%
    assert tasks.infer(labels * 9).kind == "text"    # 150 of 1,350: 11.1%
    assert tasks.infer(["one two three four five"] * 10 + ["yes"] * 90).kind == "label"
    assert tasks.infer(["one two three four five six"] * 10 + ["yes"] * 90).kind == "text"  # a 6-word output


def test_json_by_share_with_empty_objects_and_nested_values():
    outputs = ["{}"] * 33 + ['{"a":{"b":[1,{"c":null}]}}'] * 65 + ["not json", '"a string"']
    found = tasks.infer_with_evidence(outputs)
    assert found.kind == "json" and (found.fit, found.misfits) == (98, 2)
    assert found.misfit_examples == ["not json", '"a string"']
    assert "do not read as JSON objects or arrays" in found.lines()[1]


def test_no_outputs_is_text_with_no_evidence():
    found = tasks.infer_with_evidence([])
    assert found.kind == "text" and found.outputs == 0 and found.lines()[0].startswith("task: inferred kind 'text'")


@pytest.mark.parametrize("text, fields", [
    ("{}", set()), ("[]", set()),
    ('{"a": {}}', {("a", "{}")}), ('{"a": []}', {("a", "[]")}),
    ('{"a": [1, [2, "é"]], "b": {"c": null}}', {("a[0]", "1"), ("a[1][0]", "2"), ("a[1][1]", '"é"'), ("b.c", "null")}),
    ("3", {("", "3")}),
])
def test_the_fields_of_a_json_value(text, fields):
    assert tasks.parse_json(text).fields == fields


def test_a_stage_scores_with_the_pinned_task_else_the_ingested_one_else_none(capsys):
    from workflow.config.task import TaskConfig
    from workflow.evaluation.task_inference import stage_task, task_record

    record, _ = task_record(calls(50))
    ingest = {"summary": {"task": record}}
    pinned = TaskConfig(kind="text")
    assert stage_task(pinned, ingest, "serve") is pinned and capsys.readouterr().out == ""
    found = stage_task(None, ingest, "serve")
    assert found.kind == "call" and found.syntax == EQ
    assert capsys.readouterr().out.startswith("[serve] task: kind 'call', as the ingest stage read 50 training outputs")
    assert stage_task(None, {"summary": {}}, "serve") is None
