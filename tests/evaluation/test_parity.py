"""The parity comparison: which rows agree, how far, and the one-line failure (no engine, no model)."""

import pytest

from workflow.core.errors import WorkflowError
from workflow.evaluation import parity

WORDS = {1: "inform", 2: "(", 3: "name", 4: "[", 5: "]", 6: ")", 7: "<|im_end|>", 8: "give"}


def decode(token: int) -> str:
    return WORDS[token]


def test_identical_rows_agree_everywhere():
    result = parity.compare([[1, 2, 3], [8, 2, 7]], [[1, 2, 3], [8, 2, 7]], decode)
    assert result == {"rows": 2, "identical": 2, "share_identical": 1.0, "mean_common_prefix": 3.0,
                      "mismatches": []}
    assert parity.describe(result) == "2/2 rows identical to training"


def test_a_differing_token_is_named_at_its_first_position_with_both_tokens_decoded():
    result = parity.compare([[1, 2, 3, 4, 5], [1, 2, 7]], [[1, 2, 3, 4, 5], [1, 8, 3]], decode)
    assert result["identical"] == 1 and result["share_identical"] == 0.5
    assert result["mean_common_prefix"] == (5 + 1) / 2
    assert result["mismatches"] == [{"row": 1, "position": 1, "reference": "(", "engine": "give",
                                     "reference_tokens": 3, "engine_tokens": 3}]
    assert parity.describe(result).endswith("first difference: row 1 token 1: training '(', engine 'give'")


def test_an_answer_that_stops_early_or_runs_on_differs_where_the_shorter_one_ends():
    result = parity.compare([[1, 2, 7], [1, 2]], [[1, 2], [1, 2, 3]], decode)
    assert [(m["position"], m["reference"], m["engine"]) for m in result["mismatches"]] == [
        (2, "<|im_end|>", parity.END), (2, parity.END, "name")]
    assert result["mean_common_prefix"] == 2.0


def test_a_check_over_no_rows_fails_instead_of_passing():
    with pytest.raises(WorkflowError, match="parity: no rows to compare") as err:
        parity.compare([], [], decode)
    assert "\n" not in str(err.value) and "evaluate.parity: null" in str(err.value)


def test_unequal_row_counts_are_a_bug_not_a_result():
    with pytest.raises(ValueError, match="2 reference rows but 1 candidate rows"):
        parity.compare([[1], [2]], [[1]], decode)


def test_below_the_threshold_fails_in_one_line_naming_adapter_row_token_and_override():
    results = {"good": parity.compare([[1, 2]], [[1, 2]], decode),
               "bad": parity.compare([[1, 2], [1, 2, 3], [8]], [[1, 2], [1, 2, 4], [8]], decode)}
    with pytest.raises(WorkflowError) as err:
        parity.check(results, 0.9, where="evaluate", key="evaluate.parity", allow_mismatch=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("evaluate: adapter 'bad' answers differently from training: 2/3 rows identical")
    assert "row 1 token 2: training 'name', engine '['" in message
    assert "evaluate.parity.min_identical is 0.9 (see parity.json" in message
    assert "evaluate.parity.allow_mismatch: true" in message


def test_at_the_threshold_passes_and_the_override_turns_failures_into_warnings():
    results = {"a": parity.compare([[1], [2], [3], [4]], [[1], [2], [3], [5]], decode)}
    assert parity.check(results, 0.75, where="evaluate", key="evaluate.parity", allow_mismatch=False) == []
    warnings = parity.check(results, 1.0, where="serve", key="serve.smoke.parity", allow_mismatch=True)
    assert len(warnings) == 1 and warnings[0].startswith("serve: adapter 'a' answers differently")


def test_only_greedy_sampling_is_comparable_and_vllms_default_temperature_samples():
    assert parity.is_greedy({"temperature": 0.0, "max_tokens": 8}) and parity.is_greedy({"temperature": 0})
    assert not parity.is_greedy({"temperature": 0.3}) and not parity.is_greedy({"max_tokens": 8})


def test_the_peft_reference_is_computed_once_per_run_then_read_back(tiny_model, tiny_adapter, tmp_path):
    """The train environment decodes once (serve reuses what evaluate computed); its prompt ids are the ones the
    serve environment's tokenizer renders (the prompt-format guard's claim, across the two environments)."""
    from transformers import AutoTokenizer

    from workflow.prompts.guard import chat_template_prompt_ids

    rows = [[{"role": "user", "content": "Dirt: Showdown from 2012 is a sport racing game."}]]
    settings = {"model_manifest": {"fingerprint": "m" * 64, "outputs": {"model": str(tiny_model)}},
                "train_manifest": {"fingerprint": "t" * 64}, "rows": rows, "template": "qwen", "dtype": "float32",
                "max_tokens": 8, "cache_uri": str(tmp_path / "cache"), "scratch": tmp_path / "scratch"}
    first = parity.stored_reference(adapters={"viggo": str(tiny_adapter)}, **settings)
    found = first["viggo"]
    assert found["dtype"] == "float32" and found["template"] == "qwen" and found["versions"]["peft"]
    assert len(found["rows"]) == 1 and 0 < len(found["rows"][0]["generated_ids"]) <= 8
    assert found["rows"][0]["prompt_ids"] == chat_template_prompt_ids(AutoTokenizer.from_pretrained(tiny_model),
                                                                      rows[0])
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # Read back, not decoded again: the adapter folder is not even opened.
    assert parity.stored_reference(adapters={"viggo": str(tmp_path / "gone")}, **settings) == first


def test_for_an_engine_on_gpus_the_reference_is_a_ray_task_that_reads_the_bucket_on_its_node(
        tiny_model, tiny_adapter, s3_bucket, tmp_path):
    """The evaluate stage's path for an engine on GPUs, with 0 GPUs so that it runs here: a Ray task in the train
    environment's interpreter (the serve environment has no PEFT) reads the model and the adapter from the
    bucket on its own node, nothing of them lands in the driver's scratch folder, and its tokens are those of
    the reference computed on this machine."""
    import ray

    from workflow.core import storage

    storage.upload_dir(tiny_model, f"{s3_bucket}/model")
    storage.upload_dir(tiny_adapter, f"{s3_bucket}/adapter")
    rows = [[{"role": "user", "content": "Dirt: Showdown from 2012 is a sport racing game."}],
            [{"role": "user", "content": "What do you think of Tomb Raider?"}]]
    settings = {"train_manifest": {"fingerprint": "t" * 64}, "rows": rows, "template": "qwen", "dtype": "float32",
                "max_tokens": 8, "scratch": tmp_path / "scratch"}
    try:
        in_task = parity.stored_reference(
            model_manifest={"fingerprint": "m" * 64, "outputs": {"model": f"{s3_bucket}/model"}},
            adapters={"viggo": f"{s3_bucket}/adapter"}, cache_uri=f"{s3_bucket}/cache", gpus=0, **settings)["viggo"]
    finally:
        ray.shutdown()
    assert in_task["versions"]["peft"] and in_task["device"] == "cpu" and in_task["dtype"] == "float32"
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]
    here = parity.stored_reference(model_manifest={"fingerprint": "m" * 64, "outputs": {"model": str(tiny_model)}},
                                   adapters={"viggo": str(tiny_adapter)}, cache_uri=str(tmp_path / "cache"),
                                   **settings)["viggo"]
    assert in_task["rows"] == here["rows"] and len(here["rows"]) == 2
