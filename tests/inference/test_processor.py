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


@pytest.mark.heavy
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


def test_a_cpu_engine_gets_vllms_offline_scheduler_limits_unless_the_recipe_sets_them():
    """Ray's engine stage builds vLLM's config without a usage context (128 sequences, 2,048 tokens a
    step); a CPU engine gets what vllm.LLM has on the CPU, per tensor/pipeline rank."""
    pytest.importorskip("vllm", reason="vLLM's defaults: serve environment")
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    cpu = {"placement_group_config": {"bundles": [{"CPU": 1}]}}
    tokens, seqs = EngineArgs.get_batch_defaults(2)
    assert processor.offline_scheduler_limits({"tensor_parallel_size": 2}, cpu) == {
        "max_num_seqs": seqs[UsageContext.LLM_CLASS], "max_num_batched_tokens": tokens[UsageContext.LLM_CLASS],
        "tensor_parallel_size": 2}
    assert seqs[UsageContext.LLM_CLASS] == 512 and tokens[UsageContext.LLM_CLASS] == 8192  # 256 / 4,096 a rank
    assert processor.offline_scheduler_limits({"max_num_seqs": 64}, cpu)["max_num_seqs"] == 64
    # A GPU engine (vLLM's limits depend on the device, not known here) is left to the recipe.
    for gpu in ({"placement_group_config": {"bundles": [{"GPU": 1, "CPU": 1}]}}, {"accelerator_type": "L4"}, {}):
        assert processor.offline_scheduler_limits({"dtype": "bfloat16"}, gpu) == {"dtype": "bfloat16"}


@pytest.mark.parametrize("avx512_bf16", [False, True])
def test_bfloat16_on_a_cpu_that_emulates_it_is_said_once_with_the_key_to_change(tmp_path, monkeypatch, capsys,
                                                                                  avx512_bf16):
    """The CPU's flags are this machine's: a /proc/cpuinfo of each kind stands in for them."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma" + (" avx512f avx512_bf16" if avx512_bf16 else "")
                       + "\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    monkeypatch.setattr(processor.platform, "machine", lambda: "x86_64")
    processor._x86_without_bfloat16.cache_clear()
    try:
        for kwargs in ({"dtype": "bfloat16"}, {}, {"dtype": "float32"}):
            processor.note_emulated_bfloat16(kwargs, "evaluate.processor.engine_kwargs.dtype")
    finally:
        processor._x86_without_bfloat16.cache_clear()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    if avx512_bf16:
        assert lines == []
    else:  # bfloat16 and auto (vLLM's bfloat16 on the CPU); float32 says nothing
        assert len(lines) == 2 and all(line.startswith("[evaluate] note: the engine computes in bfloat16") and
                                       "set evaluate.processor.engine_kwargs.dtype: float32" in line for line in lines)
