"""Metrics of every task kind on hand-worked cases, the parsers' edge cases, and the constraints."""

import json
import re

import pytest
from conftest import REPO

from workflow.config.task import CallSyntax, TaskConfig
from workflow.evaluation import constraints, metrics, tasks
from workflow.prompts import messages as prompts

REF = "inform(name[Tom Clancy's The Division], genres[role-playing, shooter], rating[average])"
REORDERED = "inform(rating[average], name[Tom Clancy's The Division], genres[role-playing, shooter])"
EQ = CallSyntax(assign="=", separator=";")


def call_scores(expected: list[str], got: list[str], syntax: CallSyntax | None = None) -> dict[str, float]:
    task = tasks.build(TaskConfig(kind="call", syntax=syntax), None)
    out = {}
    for name, metric in task.metrics.items():
        e, g = ([task.parse(x) for x in expected], [task.parse(x) for x in got]) if metric.parsed else (expected, got)
        out[name] = metrics.score(metric, e, g)
    return out


def kind_scores(kind: str, expected: list[str], got: list[str]) -> dict[str, float]:
    task = tasks.build(TaskConfig(kind=kind), None)
    return {name: metrics.score(m, [task.parse(x) for x in expected] if m.parsed else expected,
                                [task.parse(x) for x in got] if m.parsed else got) for name, m in task.metrics.items()}


# ---------------------------------------------------------------- call

def test_parse_call_reads_function_and_slots_with_commas_in_values():
    call = tasks.parse_call(REF)
    assert call.name == "inform" and call.complete
    assert call.slots == {("name", "Tom Clancy's The Division"), ("genres", "role-playing, shooter"),
                          ("rating", "average")}
    assert tasks.parse_call("request_attribute(player_perspective[])").slots == {("player_perspective", "")}
    assert tasks.parse_call("inform(name[ x ], rating[])").slots == {("name", "x"), ("rating", "")}


@pytest.mark.parametrize("text", ["", "inform", "'ll'll'll", "(name[x])", "two words(name[x])"])
def test_parse_call_without_a_readable_name_is_none(text):
    assert tasks.parse_call(text) is None


@pytest.mark.parametrize("text", ["inform(name[x]", "inform(name[x] rating[y])", "inform(name[x],)", "inform(name x)",
                                  "inform(name[x]) trailing", "inform(name[a[b]])"])
def test_a_malformed_slot_keeps_the_function_name_and_the_slots_before_it(text):
    call = tasks.parse_call(text)
    assert call.name == "inform" and not call.complete
    assert call.slots <= {("name", "x")}


def test_other_syntaxes_and_names_that_start_with_punctuation():
    call = tasks.parse_call("inform(name=Dirt: Showdown; esrb=E 10+ (for Everyone);genres=racing, sport)", EQ)
    assert call.complete and call.slots == {("name", "Dirt: Showdown"), ("esrb", "E 10+ (for Everyone)"),
                                            ("genres", "racing, sport")}
    assert tasks.parse_call("?compare(a=1;b=2)", EQ) == tasks.FunctionCall("?compare", frozenset({("a", "1"),
                                                                                                ("b", "2")}))
    assert not tasks.parse_call("inform(name[x])", EQ).complete
    assert tasks.parse_call("inform(name=x)").complete is False  # the bracket syntax does not read '='


def test_exact_match_is_strict_and_normalized_forgives_case_and_space():
    got = [REF, REF.upper(), REF.replace(", ", " ,  ")]
    scores = call_scores([REF] * 3, got)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["normalized_exact_match"] == 1.0
    assert call_scores([REF], [REF + " "])["exact_match"] == 0.0


def test_slot_metrics_ignore_attribute_order():
    scores = call_scores([REF], [REORDERED])
    assert scores["exact_match"] == 0.0 and scores["slot_f1"] == 1.0 and scores["function_accuracy"] == 1.0


def test_slot_precision_recall_f1_on_partial_answers():
    # 2 of 3 expected slots found, plus 2 wrong ones: P = 2/4, R = 2/3.
    got = "give_opinion(name[Tom Clancy's The Division], rating[average], esrb[M], platforms[PC])"
    scores = call_scores([REF], [got])
    assert scores["slot_precision"] == pytest.approx(0.5)
    assert scores["slot_recall"] == pytest.approx(2 / 3)
    assert scores["slot_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert scores["function_accuracy"] == 0.0


def test_parse_failures_count_in_the_failure_rate_but_a_readable_name_still_counts():
    got = [REF, "inform(name[Tom Clancy's The Division]", "", "nonsense"]
    scores = call_scores([REF] * 4, got)
    assert scores["parse_failure_rate"] == 0.75
    assert scores["function_accuracy"] == 0.5          # rows 1 and 2 name inform
    assert scores["slot_recall"] == pytest.approx(3 / 12)  # 3 of 12 expected slots; the cut-off row has none
    assert scores["slot_precision"] == 1.0


def test_the_same_scores_in_another_syntax():
    expected = ["inform(name=X;rating=good)", "request(specifier=fun)"]
    got = ["inform(rating=good;name=X)", "request(specifier=boring)"]
    scores = call_scores(expected, got, EQ)
    assert scores["function_accuracy"] == 1.0 and scores["slot_precision"] == pytest.approx(2 / 3)
    assert scores["slot_f1"] == pytest.approx(2 / 3) and scores["parse_failure_rate"] == 0.0
    # The default syntax reads none of these slots.
    assert call_scores(expected, got)["slot_f1"] == 0.0


def test_per_function_and_per_attribute_breakdowns():
    from workflow.evaluation import report

    other = "request(specifier[fun], genres[shooter])"
    task = tasks.build(TaskConfig(kind="call", metrics=["exact_match", "slot_f1"]), None)
    expected, got = [REF, other, other], [REF, other, "request(genres[shooter])"]
    out = report._breakdowns(task, [task.parse(e) for e in expected], [task.parse(g) for g in got], expected, got)
    assert out["per_function"]["inform"] == {"rows": 1, "exact_match": 1.0, "slot_f1": 1.0}
    assert out["per_function"]["request"]["rows"] == 2 and out["per_function"]["request"]["exact_match"] == 0.5
    assert out["per_attribute"]["specifier"] == {"expected": 2, "slot_f1": pytest.approx(2 / 3)}
    assert out["per_attribute"]["genres"] == {"expected": 3, "slot_f1": 1.0}


# ---------------------------------------------------------------- text, json, label

def test_text_metrics_by_hand():
    scores = kind_scores("text", ["the cat sat on the mat"], ["the cat on the mat"])
    # Tokens: 5 of 6 expected in 5 generated -> F1 = 2 * 1 * 5/6 / (1 + 5/6); ROUGE-L: LCS 5 -> the same.
    assert scores["token_f1"] == pytest.approx(2 * (5 / 6) / (1 + 5 / 6))
    assert scores["rouge_l"] == pytest.approx(2 * (5 / 6) / (1 + 5 / 6))
    assert scores["exact_match"] == 0.0 and scores["normalized_exact_match"] == 0.0
    assert 0.5 < scores["chrf"] < 1.0
    same = kind_scores("text", ["A sentence."], ["A sentence."])
    assert same["chrf"] == pytest.approx(1.0) and same["rouge_l"] == 1.0 and same["token_f1"] == 1.0
    assert kind_scores("text", ["abc"], ["xyz"])["chrf"] == 0.0


def test_json_metrics_by_hand():
    expected = json.dumps({"function": "inform", "attributes": {"name": "X", "rating": "good"}})
    reordered = '{"attributes": {"rating": "good", "name": "X"}, "function": "inform"}'
    partial = json.dumps({"function": "inform", "attributes": {"name": "X", "rating": "poor"}, "extra": 1})
    scores = kind_scores("json", [expected] * 3, [reordered, partial, "{not json"])
    assert scores["json_validity"] == pytest.approx(2 / 3) and scores["parse_failure_rate"] == pytest.approx(1 / 3)
    assert scores["json_exact_match"] == pytest.approx(1 / 3) and scores["exact_match"] == 0.0
    # Fields: 9 expected, 3 + 4 generated, 3 + 2 right.
    assert scores["field_precision"] == pytest.approx(5 / 7) and scores["field_recall"] == pytest.approx(5 / 9)
    assert tasks.parse_json('{"a": [1, {"b": null}]}').fields == {("a[0]", "1"), ("a[1].b", "null")}


def test_label_metrics_by_hand():
    scores = kind_scores("label", ["a", "a", "b", "c"], ["a", " b", "b ", ""])
    assert scores["accuracy"] == 0.5 and scores["exact_match"] == 0.25  # "b " is b once stripped
    # a: P 1, R 1/2; b: P 1/2, R 1; c: 0 -> macro-F1 = (2/3 + 2/3 + 0) / 3
    assert scores["macro_f1"] == pytest.approx(4 / 9)


def test_bootstrap_intervals_hold_the_estimate_and_are_seeded():
    metric = metrics.METRICS["call"]["slot_f1"]
    stats = [(1, 2, 2), (0, 1, 3), (2, 2, 2), (1, 1, 2)] * 10
    low, high = metrics.bootstrap_interval(metric, stats, samples=500)
    assert low < metric.aggregate(stats) < high
    assert (low, high) == metrics.bootstrap_interval(metric, stats, samples=500)
    exact = metrics.METRICS["text"]["exact_match"]
    assert metrics.bootstrap_interval(exact, [1.0] * 20, samples=100) == (1.0, 1.0)
    pairs = metrics.METRICS["label"]["macro_f1"]
    low, high = metrics.bootstrap_interval(pairs, [("a", "a"), ("b", "a"), ("b", "b")] * 5, samples=200)
    assert 0 <= low <= high <= 1


def test_user_metrics_and_parsers_by_import_path():
    cfg = TaskConfig(kind="text", metrics=["exact_match", "user_metrics:first_word_match"],
                     parser="user_metrics:upper")
    task = tasks.build(cfg, None)
    assert task.parse("abc") == "ABC"
    got = metrics.score(task.metrics["user_metrics:first_word_match"], ["a b", "c d"], ["a x", "y"])
    assert got == 0.5
    with pytest.raises(ValueError, match="cannot import no_such_module"):
        TaskConfig(kind="text", metrics=["no_such_module:f"])
    with pytest.raises(ValueError, match="are not metrics of kind 'label'"):
        TaskConfig(kind="label", metrics=["slot_f1"])
    with pytest.raises(ValueError, match=r"syntax\n.*applies to kind 'call', not 'json'"):
        TaskConfig(kind="json", syntax={"assign": "="})


# ---------------------------------------------------------------- inference of the kind, constraints

def bounds():
    from workflow.config.evaluate import ConstrainedDecoding

    return ConstrainedDecoding(max_value_chars=24)


def test_the_kind_is_inferred_from_the_training_outputs(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "data" / "viggo"))
    from make_variants import write

    write(tmp_path)
    found = {}
    for variant in ("text", "call-eq", "json", "label"):
        rows = [json.loads(line) for line in (tmp_path / variant / "train.jsonl").read_text().splitlines()]
        outputs = [r["output"] if isinstance(r["output"], str) else json.dumps(r["output"]) for r in rows]
        found[variant] = tasks.infer(outputs)
    assert {v: t.kind for v, t in found.items()} == {"text": "text", "call-eq": "call", "json": "json",
                                                      "label": "label"}
    assert found["call-eq"].call_syntax == EQ
    assert tasks.infer([REF, REORDERED, "request(specifier[fun])"]) == TaskConfig(kind="call")


def test_a_call_constraint_admits_only_calls_that_parse_with_the_learnt_names():
    outputs = ["inform(name=X;rating=good)", "?compare(name=Y;esrb=E 10+ (for Everyone))"]
    cfg = TaskConfig(kind="call", syntax=EQ)
    task = tasks.build(cfg, outputs, constrained=bounds())
    assert task.vocabulary == {"functions": ["?compare", "inform"], "attributes": ["esrb", "name", "rating"]}
    rx = re.compile(task.constraint["regex"])
    for good in outputs + ["inform(rating=)"]:
        assert rx.fullmatch(good), good
        assert tasks.parse_call(good, EQ).complete
    for bad in ["inform()", "shout(name=x)", "inform(colour=red)", "inform(name=x; rating=y)", "inform(name[x])",
                "inform(name=" + "x" * 25 + ")"]:
        assert rx.fullmatch(bad) is None, bad
    viggo = re.compile(constraints.call_regex(["inform"], ["name", "rating"], max_value_chars=40))
    assert viggo.fullmatch("inform(name[x], rating[y])") and not viggo.fullmatch("inform(name[a[b]])")


def test_a_json_constraint_is_the_schema_of_the_training_outputs_written_compact():
    import jsonschema

    values = [{"function": "inform", "attributes": {"name": "X", "rating": "good"}, "tags": [1, 2.5]},
              {"function": "request", "attributes": {"specifier": "fun"}, "tags": []}]
    outputs = [json.dumps(v) for v in values]
    schema = constraints.infer_schema(values, max_value_chars=24)
    for value in values:
        jsonschema.validate(value, schema)
    assert schema["required"] == ["attributes", "function", "tags"] and schema["additionalProperties"] is False
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"function": "inform", "attributes": {"colour": "red"}, "tags": []}, schema)

    task = tasks.build(TaskConfig(kind="json"), outputs, constrained=bounds())
    rx = re.compile(task.constraint["regex"])
    for value in values + [{"function": "x", "attributes": {}, "tags": [3, 4]}]:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
        assert rx.fullmatch(text), text
        assert tasks.parse_json(text) is not None
    for bad in ['{"attributes":{},"function":"x"}',                      # a required key missing
                '{"function":"x","attributes":{},"tags":[]}',            # keys out of order
                '{"attributes": {}, "function": "x", "tags": []}',       # whitespace
                '{"attributes":{"colour":"red"},"function":"x","tags":[]}',
                '{"attributes":{},"function":"' + "x" * 25 + '","tags":[]}',
                '{"attributes":{},"function":"x","tags":[1,2,3]}']:      # more items than seen
        assert rx.fullmatch(bad) is None, bad
    # A schema beyond the compact form's reach goes to the engine as a JSON schema.
    given = tasks.build(TaskConfig(kind="json", schema={"type": "object"}), outputs, constrained=bounds())
    assert given.constraint == {"json": {"type": "object"}}


def test_a_label_constraint_is_a_choice_and_text_has_none():
    task = tasks.build(TaskConfig(kind="label"), ["b", "a", "b"], constrained=bounds())
    assert task.constraint == {"choice": ["a", "b"]}
    with pytest.raises(Exception, match="a text task has no decoding constraint"):
        tasks.build(TaskConfig(kind="text"), ["x"], constrained=bounds())


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


# ---------------------------------------------------------------- the report

def predictions_table(rows: list[tuple[str, int | None, str, str]]):
    """(variant, seed, expected, generated) rows as the evaluate stage's predictions table."""
    import pyarrow as pa

    return pa.Table.from_pylist([{"row_id": i % 3, "variant": v, "seed": seed, "input": f"in {i}", "expected": e,
                                  "generated_text": g, "error": "", "num_generated_tokens": 5}
                                 for i, (v, seed, e, g) in enumerate(rows)])


def test_seeds_give_the_mean_and_spread_and_the_report_shows_intervals(tmp_path):
    from workflow.config.evaluate import EvaluateConfig
    from workflow.evaluation import report

    task = tasks.build(TaskConfig(kind="label"), None)
    a, b = "inform", "request"
    table = predictions_table([("m", 0, a, a), ("m", 0, b, b), ("m", 0, a, b),      # seed 0: accuracy 2/3
                               ("m", 1, a, a), ("m", 1, b, a), ("m", 1, a, b)])     # seed 1: accuracy 1/3
    results = report.score(table, task, bootstrap=200)
    m = results["m"]
    assert m["metrics"]["accuracy"] == pytest.approx(0.5) and m["rows"] == 3
    assert m["seeds"] == {"0": pytest.approx(m["seeds"]["0"]), "1": pytest.approx(m["seeds"]["1"])}
    assert m["seeds"]["0"]["accuracy"] == pytest.approx(2 / 3) and m["seeds"]["1"]["accuracy"] == pytest.approx(1 / 3)
    assert m["spread"]["accuracy"] == pytest.approx(((2 / 3 - 1 / 3) ** 2 / 2) ** 0.5)
    low, high = m["intervals"]["accuracy"]
    assert 0 <= low <= 0.5 <= high <= 1
    assert m["confusion"] == {a: {a: 2, b: 2}, b: {b: 1, a: 1}}
    cfg = EvaluateConfig(seeds=[0, 1], sampling_params={"temperature": 0.5}, bootstrap=200)
    text = report.markdown_report("r", results, table, cfg, task)
    assert "| accuracy | 0.500 ±0.236 [" in text and "seeds [0, 1]" in text and "confusion.png" in text
    report.confusion_chart(results, tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_worst_errors_are_ranked_by_the_main_metric():
    from workflow.evaluation import report

    task = tasks.build(TaskConfig(kind="call"), None)
    close = "inform(name[Tom Clancy's The Division], genres[role-playing, shooter], rating[poor])"
    table = predictions_table([("v", None, REF, close), ("v", None, REF, "garbage"), ("v", None, REF, REF)])
    worst = report.worst_errors(table, "v", task, 5)
    assert [w["got"] for w in worst] == ["garbage", close]
    assert worst[0]["slot_f1"] == 0.0 and worst[1]["slot_f1"] == pytest.approx(2 / 3)


def test_without_training_outputs_the_kind_is_read_off_the_references_and_constraints_need_training(capsys):
    task = tasks.build(None, None, reference_outputs=["inform(name[a])", "request(specifier[b])"])
    assert task.kind == "call" and "from 2 reference outputs" in capsys.readouterr().out
    with pytest.raises(Exception, match="no function or attribute names to constrain decoding to"):
        tasks.build(None, None, reference_outputs=["inform(name[a])"], constrained=bounds())
    with pytest.raises(Exception, match="no task given and no outputs to infer it from"):
        tasks.build(None, None)


# ---------------------------------------------------------------- every metric on edge cases, counted by hand

def test_an_empty_object_answered_with_an_empty_object_is_an_exact_match_and_no_field():
    # Rows: {} / {}; {} / {"a":1}; {"a":1,"b":{"c":[2,3]}} / {"a":1,"b":{"c":[3]}}; {"x":[]} / "not json"
    expected = ["{}", "{}", '{"a":1,"b":{"c":[2,3]}}', '{"x":[]}']
    got = ["{}", '{"a":1}', '{"a": 1, "b": {"c": [3]}}', "not json"]
    scores = kind_scores("json", expected, got)
    # Expected fields: 0 + 0 + 3 (a, b.c[0], b.c[1]) + 1 (x=[]) = 4; answered: 0 + 1 + 2 (a, b.c[0]=3) + 0 = 3;
    # right: a=1 only (b.c[0] is 2 expected, 3 answered) = 1.
    assert scores["field_precision"] == pytest.approx(1 / 3) and scores["field_recall"] == pytest.approx(1 / 4)
    assert scores["field_f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
    assert scores["json_exact_match"] == 0.25 and scores["exact_match"] == 0.25
    assert scores["json_validity"] == 0.75 and scores["parse_failure_rate"] == 0.25
    # A split of empty objects answered as such: every answer right, no field to count (0 by convention).
    empty = kind_scores("json", ["{}", "{}"], ["{}", " {} "])
    assert empty["json_exact_match"] == 1.0 and empty["exact_match"] == 0.5 and empty["field_f1"] == 0.0


def test_value_less_slots_are_slots_with_an_empty_value():
    expected = ["?request(area)", "inform(area=north;food=thai)", "bye()"]
    got = ["?request(area=)", "inform(area=north;food)", "bye()"]
    scores = call_scores(expected, got, EQ)
    # Slots expected: area='' ; area=north, food=thai -> 3. Answered: area='' ; area=north, food='' -> 3. Right: 2.
    assert scores["slot_precision"] == pytest.approx(2 / 3) and scores["slot_recall"] == pytest.approx(2 / 3)
    assert scores["function_accuracy"] == 1.0 and scores["parse_failure_rate"] == 0.0
    assert scores["exact_match"] == pytest.approx(1 / 3)


def test_an_expected_output_that_is_no_call_scores_as_a_row_with_no_slots():
    scores = call_scores(["bye", "inform(area=x)"], ["bye", "inform(area=x)"], EQ)
    # 'bye' reads as no call: no function to match (0), no slots; the answer 'bye' is a parse failure.
    assert scores["function_accuracy"] == 0.5 and scores["slot_f1"] == 1.0
    assert scores["parse_failure_rate"] == 0.5 and scores["exact_match"] == 1.0


def test_whitespace_counts_only_where_the_metric_says_so():
    text = kind_scores("text", ["A  b\n"], ["a b"])
    assert text["exact_match"] == 0.0 and text["normalized_exact_match"] == 1.0 and text["token_f1"] == 1.0
    label = kind_scores("label", ["yes", "no"], [" yes\n", "no "])
    assert label["accuracy"] == 1.0 and label["exact_match"] == 0.0 and label["macro_f1"] == 1.0
    call = call_scores(["inform(name[x], rating[y])"], ["inform( name[ x ] ,rating[y] )"])
    assert call["exact_match"] == 0.0 and call["normalized_exact_match"] == 1.0 and call["slot_f1"] == 1.0


def test_empty_outputs():
    both = kind_scores("text", [""], [""])
    assert both == {"exact_match": 1.0, "normalized_exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0, "chrf": 1.0}
    one = kind_scores("text", ["a cat"], [""])
    assert one == {"exact_match": 0.0, "normalized_exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0, "chrf": 0.0}
    # An empty answer is no label: a: P 1 R 1/2 -> 2/3; b: nothing answered, R 0 -> 0; macro (2/3 + 0) / 2.
    label = kind_scores("label", ["a", "a", "b"], ["a", "", ""])
    assert label["accuracy"] == pytest.approx(1 / 3) and label["macro_f1"] == pytest.approx(1 / 3)
    assert call_scores(["inform(a[x])"], [""])["parse_failure_rate"] == 1.0
    assert kind_scores("json", ["{}"], [""])["json_validity"] == 0.0


def test_unicode_text_is_scored_as_text():
    same = kind_scores("text", ["東京 大阪", "Αθήνα είναι"], ["東京 大阪", "αθήνα είναι"])
    assert same["rouge_l"] == 1.0 and same["token_f1"] == 1.0 and same["exact_match"] == 0.5
    # One of two words: LCS 1 over 2 and 2 words -> P = R = 1/2.
    assert kind_scores("text", ["東京 大阪"], ["東京 京都"])["rouge_l"] == pytest.approx(0.5)
    assert kind_scores("label", ["café"], ["café "])["accuracy"] == 1.0
    assert call_scores(["inform(name=Zoë)"], ["inform(name = Zoë)"], EQ)["slot_f1"] == 1.0


def test_rouge_l_and_token_f1_by_hand():
    # ROUGE-L: reference 'the cat sat on the mat' (6 words), answer 'on the mat the cat' (5): LCS 'the mat' or
    # 'the cat'... longest is 'on the mat' (3) -> P 3/5, R 3/6.
    scores = kind_scores("text", ["the cat sat on the mat"], ["on the mat the cat"])
    assert scores["rouge_l"] == pytest.approx(2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6))
    # Tokens: 'the' x2, cat, on, mat all in both -> 5 common of 5 answered, 6 expected.
    assert scores["token_f1"] == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))


@pytest.mark.parametrize("value, shown", [(0.5, "0.500"), (1, "1.000"), ("fine", "fine"), (None, "n/a"),
                                          (True, "true"), (float("nan"), "nan"), ({"a": [1, "é"]}, '{"a":[1,"é"]}'),
                                          ([0.25] * 30, "[" + "0.25," * 11 + "0.2…")])  # 59 characters and …
def test_any_metric_value_prints(value, shown):
    assert metrics.format_value(value) == shown


def test_metrics_that_are_not_numbers_reach_every_report_without_failing(tmp_path):
    from workflow.config.evaluate import EvaluateConfig
    from workflow.evaluation import report

    names = ["exact_match", "user_metrics:verdict", "user_metrics:breakdown", "user_metrics:nothing"]
    task = tasks.build(TaskConfig(kind="label", metrics=names), None)
    table = predictions_table([("m", None, "a", "a"), ("m", None, "b", "a"), ("m", None, "a", "a")])
    results = report.score(table, task, bootstrap=50)
    got = results["m"]["metrics"]
    assert got["exact_match"] == pytest.approx(2 / 3) and got["user_metrics:verdict"] == "some differ"
    assert got["user_metrics:breakdown"] == {"rows": 3, "equal": [True, False, True]}
    assert got["user_metrics:nothing"] is None and set(results["m"]["intervals"]) == {"exact_match"}
    text = report.markdown_report("r", results, table, EvaluateConfig(bootstrap=50), task)
    assert "| user_metrics:verdict | some differ |" in text and "| user_metrics:nothing | n/a |" in text
    assert '| user_metrics:breakdown | {"rows":3,"equal":[true,false,true]} |' in text
    assert "- `exact_match`: share of rows whose answer is the reference, character for character" in text
    report.print_summary(results, names)
    report.chart(results, names, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_run_summary_prints_any_metric_value(tmp_path):
    from conftest import ingest_only_recipe

    from workflow.config import load_recipe
    from workflow.core import manifest
    from workflow.show import run_summary

    recipe = load_recipe(ingest_only_recipe(tmp_path, "summary"))
    values = {"accuracy": 0.25, "verdict": "some differ", "nothing": None, "nested": {"a": [1, 2]}}
    manifest.write(f"{recipe.run_uri}/evaluate", stage="evaluate", run="summary", config={}, inputs={},
                   started_at=manifest.now(), outputs={}, summary={"metrics": {"base": values}})
    text = run_summary(recipe)
    row = next(line for line in text.splitlines() if line.strip().startswith("base"))
    assert row.split() == ["base", "0.250", "some", "differ", "n/a", '{"a":[1,2]}']
    assert "serve the" not in text and "lineage:" in text  # a recipe without a serve section has nothing to serve
