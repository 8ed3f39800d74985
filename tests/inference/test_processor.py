"""What a row carries into vLLM's sampling parameters (both the engine and the HTTP path read it)."""

import json

from workflow.inference import processor


def test_a_rows_constraint_and_seed_reach_its_sampling_parameters():
    schema = {"type": "object", "properties": {"a": {"type": ["string", "null"]}}}
    found = processor._per_row({"__constraint": json.dumps({"json": schema}), "__seed": 7})
    # A schema travels as JSON text: nested dicts of mixed types are no single Arrow struct type.
    assert found == {"structured_outputs": {"json": json.dumps(schema)}, "seed": 7}
    assert processor._per_row({"__constraint": json.dumps({"choice": ["a", "b"]}), "__seed": None}) == {
        "structured_outputs": {"choice": ["a", "b"]}}
    assert processor._per_row({"__constraint": "", "seed": 3}) == {}
