"""What a row carries into vLLM's sampling parameters (both the engine and the HTTP path read it)."""

import json

import pytest

from workflow.inference import processor


def test_a_rows_constraint_and_seed_reach_its_sampling_parameters():
    schema = {"type": "object", "properties": {"a": {"type": ["string", "null"]}}}
    found = processor._per_row({"__constraint": json.dumps({"json": schema}), "__seed": 7})
    # A schema travels as JSON text: nested dicts of mixed types are no single Arrow struct type.
    assert found == {"structured_outputs": {"json": json.dumps(schema)}, "seed": 7}
    assert processor._per_row({"__constraint": json.dumps({"choice": ["a", "b"]}), "__seed": None}) == {
        "structured_outputs": {"choice": ["a", "b"]}}
    assert processor._per_row({"__constraint": "", "seed": 3}) == {}


def test_the_generated_token_ids_are_kept_and_a_batch_of_failed_rows_gets_none():
    import pyarrow as pa

    answered = pa.table({"row_id": [0, 1], "generated_text": ["a", "b"], "num_input_tokens": [3, 4],
                         "num_generated_tokens": [2, 1], "generated_tokens": [[5, 6], [7]]})
    out = processor._select(answered, input_columns=["row_id"], http=False, extra_columns=("generated_tokens",))
    assert out.column("generated_tokens").to_pylist() == [[5, 6], [7]] and out.column("error").to_pylist() == ["", ""]
    failed = pa.table({"row_id": [2], "generated_text": [""], "num_input_tokens": [0], "num_generated_tokens": [0],
                       "__inference_error__": ["prompt too long"]})
    out = processor._select(failed, input_columns=["row_id"], http=False, extra_columns=("generated_tokens",))
    assert out.column("generated_tokens").to_pylist() == [None] and out.column("error").to_pylist() == ["prompt too long"]


def test_the_light_steps_run_one_task_at_a_time_per_engine(tmp_path):
    """Prompt rendering and column selection start no more worker processes at a time than there can
    be engines (each would start Python, Ray and a tokenizer beside the engine's own start)."""
    pytest.importorskip("vllm", reason="Ray's vLLM processor: serve environment")
    import ray

    started_here = not ray.is_initialized()
    try:  # building Ray's processor starts a local Ray when none runs
        built = {n: processor.engine_processor(str(tmp_path), {"batch_size": 8, "concurrency": c}, {}, {}, ["input"])
                 for n, c in ((1, 1), (3, (1, 3)))}
    finally:
        if started_here:
            ray.shutdown()
    for engines, proc in built.items():
        for kwargs in (proc.preprocess_map_kwargs, proc.postprocess_map_kwargs):
            assert kwargs == {"num_cpus": processor.LIGHT_TASK_CPUS, "concurrency": engines}
