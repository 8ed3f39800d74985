"""The evaluate stage on the CPU: tiny model + a real LoRA adapter in one engine, metrics, report, http mode.

One stage run (one vLLM engine) answers 12 ViGGO test rows four ways: base, adapter, and
each again with constrained decoding. The http test points the same stage at vLLM's
OpenAI-compatible server on loopback.
"""

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, with_lm_head_lora

from workflow.config.task import TaskConfig
from workflow.core import envs
from workflow.evaluation import metrics, tasks

ROWS = 12
# Short values and few slots keep a random model's constrained answers inside max_tokens.
CONSTRAINED = {"max_value_chars": 10, "max_slots": 3}
SAMPLING = {"temperature": 0.0, "max_tokens": 96}
# Rows the parity check decodes with PEFT (the default threshold; fewer rows than the default 16 keep it short).
PARITY_ROWS = 4


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [envs.python_for(envs.SERVE), "-m", "workflow.cli", *args]
    return subprocess.run(cmd, env=envs.stage_environment(envs.SERVE), capture_output=True, text=True,
                          timeout=timeout, check=False)


def predictions(run_dir: Path):
    import pyarrow.parquet as pq

    return pq.read_table(run_dir / "evaluate" / "predictions.parquet").to_pandas()


@pytest.fixture(scope="module")
def evaluated(make_run, tiny_adapter):
    recipe = make_run("eval-engine", rows=ROWS, adapters={"viggo": tiny_adapter},
                      evaluate={"constrained_decoding": CONSTRAINED, "sampling_params": SAMPLING,
                                "parity": {"rows": PARITY_ROWS}})
    proc = run_cli("evaluate", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, recipe.parent / "runs" / "eval-engine", proc


def test_every_variant_answers_every_row_in_one_run(evaluated):
    _, run_dir, proc = evaluated
    df = predictions(run_dir)
    assert sorted(df["variant"].unique()) == ["base", "base+constrained", "viggo", "viggo+constrained"]
    assert len(df) == 4 * ROWS
    assert (df.groupby("variant")["row_id"].nunique() == ROWS).all()
    assert (df["error"] == "").all()
    assert (df["num_input_tokens"] > 100).all() and (df["num_generated_tokens"] > 0).all()
    assert "[evaluate] base+constrained" in proc.stdout
    assert "[evaluate] task: inferred kind 'call' from" in proc.stdout and 'evaluate.task: {"kind": "call"}' in proc.stdout


def test_adapter_rows_answer_differently_from_base_rows(evaluated):
    """Each row's adapter variant was answered with the adapter and its base variant without, in one engine:
    the two answers differ on every row, and on the parity rows the adapter variant's token ids are those
    PEFT decodes with the adapter loaded (the train environment's reference), which the base's are not."""
    _, run_dir, _ = evaluated
    df = predictions(run_dir).set_index(["variant", "row_id"])["generated_tokens"]
    tokens = {variant: [list(df[variant][i]) for i in range(ROWS)] for variant in ("base", "viggo")}
    assert [i for i in range(ROWS) if tokens["base"][i] == tokens["viggo"][i]] == []
    (cached,) = (run_dir / "cache" / "parity").glob("reference-*.json")
    peft = [row["generated_ids"] for row in json.loads(cached.read_text())["rows"]]
    assert len(peft) == PARITY_ROWS and tokens["viggo"][:PARITY_ROWS] == peft
    assert [i for i in range(PARITY_ROWS) if tokens["base"][i] == peft[i]] == []


def test_constrained_outputs_always_parse_and_use_the_names_of_the_training_split(evaluated, viggo_alpaca):
    df = predictions(evaluated[1])
    training = [json.loads(line)["output"] for line in (viggo_alpaca / "train.jsonl").read_text().splitlines()]
    functions = {tasks.parse_call(o).name for o in training}
    attributes = {a for o in training for a, _ in tasks.parse_call(o).slots}
    constrained = df[df["constrained"]]
    assert len(constrained) == 2 * ROWS
    for text in constrained["generated_text"]:
        call = tasks.parse_call(text)
        assert call is not None and call.complete, text
        assert call.name in functions and {a for a, _ in call.slots} <= attributes
        assert len(call.slots) <= CONSTRAINED["max_slots"]
    free = df[~df["constrained"] & (df["variant"] == "base")]["generated_text"]
    assert not all(tasks.parse_call(t) and tasks.parse_call(t).complete for t in free)  # the random base, left free


def test_metrics_json_matches_predictions_and_report_has_every_part(evaluated):
    _, run_dir, _ = evaluated
    out = run_dir / "evaluate"
    results = json.loads((out / "metrics.json").read_text())
    df = predictions(run_dir)
    task = tasks.build(TaskConfig(kind="call"), None)
    for variant, group in df.groupby("variant"):
        expected, got = group["expected"].tolist(), group["generated_text"].tolist()
        for name in ("exact_match", "slot_f1", "parse_failure_rate"):
            metric = task.metrics[name]
            value = metrics.score(metric, [task.parse(e) for e in expected] if metric.parsed else expected,
                                  [task.parse(g) for g in got] if metric.parsed else got)
            assert results[variant]["metrics"][name] == pytest.approx(value)
            low, high = results[variant]["intervals"][name]
            assert low <= value + 1e-9 and value - 1e-9 <= high
    assert results["base+constrained"]["metrics"]["parse_failure_rate"] == 0.0
    report = (out / "report.md").read_text()
    for part in ("| metric | base | base+constrained | viggo | viggo+constrained |", "## Per function",
                 "| verify_attribute |", "## Per attribute", "## Worst errors", "### viggo+constrained",
                 "metrics.png", 'Task: `{"kind": "call"}`'):
        assert part in report, part
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stage_manifest = json.loads((out / "manifest.json").read_text())
    assert set(stage_manifest["outputs"]) == {"predictions.parquet", "metrics.json", "report.md", "metrics.png",
                                              "parity.json"}
    assert stage_manifest["summary"]["metrics"]["viggo"] == results["viggo"]["metrics"]


def test_the_adapter_gives_trainings_tokens_at_the_default_parity_threshold(evaluated):
    from workflow.config.evaluate import ParityConfig

    _, run_dir, proc = evaluated
    out = run_dir / "evaluate"
    checked = json.loads((out / "parity.json").read_text())
    assert set(checked["adapters"]) == {"viggo"} and checked["rows"] == PARITY_ROWS
    result = checked["adapters"]["viggo"]
    assert result["share_identical"] >= ParityConfig().min_identical
    assert checked["reference"]["dtype"] == "float32" and checked["reference"]["template"] is None
    # The engine's token ids are in the predictions, and parity compared them, not the text.
    df = predictions(run_dir)
    adapter_rows = df[df["variant"] == "viggo"].sort_values("row_id")
    engine = adapter_rows["generated_tokens"].map(list).tolist()
    assert [len(ids) for ids in engine] == adapter_rows["num_generated_tokens"].tolist()
    if not result["mismatches"]:
        assert result["mean_common_prefix"] == pytest.approx(sum(map(len, engine[:PARITY_ROWS])) / PARITY_ROWS)
    line = f"parity: {result['identical']}/{PARITY_ROWS} rows identical to training"
    assert f"[evaluate] {line.replace('parity:', 'parity: adapter viggo:')}" in proc.stdout
    report = (out / "report.md").read_text()
    assert "## Parity" in report and f"- viggo: {line}" in report
    assert f"| parity with training |  |  | {result['identical']}/{PARITY_ROWS} |  |" in report
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["parity"]["viggo"].startswith(f"{result['identical']}/{PARITY_ROWS} rows identical to training")


def test_parity_is_left_out_in_one_line_when_the_engine_samples(make_run, tiny_adapter, capsys):
    """Sampled answers differ from greedy decoding by design: no reference is computed (no model is loaded for
    it, no GPU taken), and the check says so once."""
    from workflow.config import load_recipe
    from workflow.core.stage import StageContext
    from workflow.stages import evaluate

    sampling = {"sampling_params": {"temperature": 0.7, "max_tokens": 16}, "seeds": [3], "parity": {"rows": 4}}
    recipe = load_recipe(make_run("eval-not-greedy", rows=4, adapters={"viggo": tiny_adapter}, evaluate=sampling))
    ctx = StageContext(recipe=recipe, stage="evaluate")
    rows = evaluate.load_rows(ctx, recipe.evaluate)
    reference = evaluate.parity_reference(ctx, recipe.evaluate, rows, evaluate.run_adapters(ctx, recipe.evaluate))
    assert reference is None and evaluate.check_parity(ctx, recipe.evaluate, None, reference) is None
    said = [line for line in capsys.readouterr().out.splitlines() if "parity" in line]
    assert len(said) == 1 and (
        "[evaluate] parity: left out: the engine samples (evaluate.sampling_params.temperature 0.7), so its tokens "
        "cannot be held against greedy decoding") in said[0], said
    assert not (recipe.path.parent / "runs" / "eval-not-greedy" / "cache").exists()


def test_rerun_with_same_inputs_is_skipped(evaluated):
    recipe, _, _ = evaluated
    proc = run_cli("evaluate", str(recipe))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "up to date" in proc.stdout


def test_over_rank_adapter_is_refused_before_any_engine_starts(make_run, tiny_adapter, tmp_path):
    import shutil

    big = tmp_path / "rank16"
    shutil.copytree(tiny_adapter, big)
    cfg = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    processor = {"batch_size": 16, "engine_kwargs": {"max_model_len": 512, "max_lora_rank": 8},
                 "placement_group_config": {"bundles": [{"CPU": 1}]}}
    recipe = make_run("eval-over-rank", rows=2, adapters={"big": big}, evaluate={"processor": processor})
    started = time.monotonic()
    proc = run_cli("evaluate", str(recipe))
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "rank 16" in line and "evaluate.processor.engine_kwargs.max_lora_rank" in line and "16" in line
    assert time.monotonic() - started < 120  # no engine start-up


def test_adapters_the_engine_would_serve_differently_are_refused_before_it_starts(make_run, tiny_adapter, tmp_path):
    import shutil

    from workflow.core import manifest

    saved = tmp_path / "saved"
    shutil.copytree(tiny_adapter, saved)
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    proc = run_cli("evaluate", str(make_run("eval-saved-modules", rows=2, adapters={"saved": saved})))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "adapter 'saved' saves full modules ['lm_head'] (modules_to_save)" in line and "additional_target" in line

    # LoRA weights on the LM head, which vLLM does not adapt in a Qwen2 model.
    planted = with_lm_head_lora(tiny_adapter, tmp_path / "lm-head")
    proc = run_cli("evaluate", str(make_run("eval-lm-head", rows=2, adapters={"lm-head": planted})))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "has LoRA weights on ['lm_head'], which vLLM does not adapt in Qwen2ForCausalLM" in line, line

    # The model stage ran again after training (another base), the train stage did not.
    recipe = make_run("eval-other-base", rows=2, adapters={"viggo": tiny_adapter})
    train_dir = recipe.parent / "runs" / "eval-other-base" / "train"
    trained = json.loads((train_dir / "manifest.json").read_text())
    manifest.write(str(train_dir), stage="train", run=trained["run"], config={}, inputs={"model": "f" * 64},
                   outputs=trained["outputs"], summary=trained["summary"], started_at=trained["started_at"])
    proc = run_cli("evaluate", str(recipe))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "evaluate: the run's adapters were trained on another base model" in line and "train stage again" in line
    assert not (recipe.parent / "runs" / "eval-other-base" / "evaluate" / "manifest.json").exists()


@pytest.mark.parametrize("section, message", [
    ({"processor": {"batch_size": 4, "bogus_key": 1}}, "evaluate.processor: bogus_key: unknown key"),
    ({"processor": {"engine_kwargs": {"max_model_length": 512}}}, "unknown vLLM engine argument(s) ['max_model_length']"),
    ({"sampling_params": {"temperature": 0.0, "max_new_tokens": 8}}, "evaluate.sampling_params"),
])
def test_library_sections_are_checked_against_the_libraries(section, message):
    from workflow.config import EvaluateConfig
    from workflow.config.evaluate import check_library_fields
    from workflow.core.errors import WorkflowError

    with pytest.raises(WorkflowError) as err:
        check_library_fields(EvaluateConfig(**section))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def openai_server(tiny_model, tiny_adapter, tmp_path_factory):
    """vLLM's OpenAI-compatible server on loopback: the tiny model as ``tiny``, the adapter as ``viggo``."""
    port = free_port()
    log = tmp_path_factory.mktemp("openai-server") / "server.log"
    env = {**envs.stage_environment(envs.SERVE), "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [envs.python_for(envs.SERVE), "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
           "--dtype", "float32", "--enforce-eager", "--enable-lora", "--max-lora-rank", "8",
           "--lora-modules", f"viggo={tiny_adapter}"]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(2)
        else:
            raise AssertionError("the OpenAI server did not start: " + log.read_text()[-3000:])
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_http_mode_scores_an_openai_endpoint_with_the_same_prompts(make_run, openai_server, evaluated):
    endpoint = {"processor": {"url": openai_server + "/v1/chat/completions", "batch_size": 8, "qps": 50},
                "models": ["tiny", "viggo"]}
    recipe = make_run("eval-http", rows=ROWS, evaluate={"endpoint": endpoint, "sampling_params": SAMPLING,
                                                        "constrained_decoding": CONSTRAINED})
    proc = run_cli("evaluate", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = predictions(recipe.parent / "runs" / "eval-http")
    assert sorted(df["variant"].unique()) == ["tiny", "tiny+constrained", "viggo", "viggo+constrained"]
    assert len(df) == 4 * ROWS and (df["error"] == "").all()
    assert all(tasks.parse_call(t).complete for t in df[df["constrained"]]["generated_text"])
    # The server renders the chat template itself: same prompt token counts as the engine path.
    engine = predictions(evaluated[1])
    engine_tokens = engine[engine["variant"] == "base"].set_index("row_id")["num_input_tokens"]
    http_tokens = df[df["variant"] == "tiny"].set_index("row_id")["num_input_tokens"]
    assert (engine_tokens == http_tokens).all()
    results = json.loads((recipe.parent / "runs" / "eval-http" / "evaluate" / "metrics.json").read_text())
    assert results["tiny+constrained"]["metrics"]["parse_failure_rate"] == 0.0


@pytest.fixture(scope="module")
def viggo_variants(tmp_path_factory) -> dict[str, Path]:
    """data/viggo/make_variants.py's four variants as the ingest stage writes them (Alpaca rows, JSON as text)."""
    import sys

    from conftest import REPO

    from workflow.dataset.formats import canonical_json

    sys.path.insert(0, str(REPO / "data" / "viggo"))
    from make_variants import INSTRUCTIONS, write

    out = tmp_path_factory.mktemp("variants")
    write(out / "raw")
    for variant, instruction in INSTRUCTIONS.items():
        (out / variant).mkdir()
        for split in ("train", "test"):
            rows = [json.loads(line) for line in (out / "raw" / variant / f"{split}.jsonl").read_text().splitlines()]
            (out / variant / f"{split}.jsonl").write_text("".join(json.dumps(
                {"instruction": instruction, "input": r["input"],
                 "output": r["output"] if isinstance(r["output"], str) else canonical_json(r["output"])}) + "\n"
                for r in rows))
    return {variant: out / variant for variant in INSTRUCTIONS}


@pytest.mark.parametrize("variant,kind", [("call-eq", "call"), ("json", "json")])
def test_a_new_syntax_and_json_by_yaml_alone_and_their_constrained_answers_parse(make_run, openai_server,
                                                                                 viggo_variants, variant, kind):
    """No task in the recipe: the stage infers the kind from the training split, scores with the kind's
    metrics and intervals, and every constrained answer parses: the call regex of another syntax, and the
    compact-JSON regex of the inferred schema. Through the OpenAI server of the http test: no engine of
    its own to start. (The text and label kinds: their inference, metrics and constraint in
    tests/evaluation/test_metrics.py; a stage run costs CI a minute each.)"""
    endpoint = {"processor": {"url": openai_server + "/v1/chat/completions", "batch_size": 8, "qps": 50},
                "models": ["tiny"]}
    # JSON: room for every optional member of the schema at its longest.
    sampling = {"temperature": 0.0, "max_tokens": 320 if kind == "json" else 96}
    evaluate = {"endpoint": endpoint, "sampling_params": sampling, "bootstrap": 200,
                "constrained_decoding": {"max_value_chars": 8, "max_slots": 2}}
    recipe = make_run(f"eval-{variant}", rows=6, data=viggo_variants[variant], evaluate=evaluate)
    proc = run_cli("evaluate", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[evaluate] task: inferred kind '{kind}'" in proc.stdout
    run_dir = recipe.parent / "runs" / f"eval-{variant}"
    results = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert set(results["tiny"]["metrics"]) == set(metrics.kind_metrics(kind))
    assert set(results["tiny"]["intervals"]) == set(metrics.kind_metrics(kind))
    df = predictions(run_dir)
    task = tasks.build(tasks.infer([json.loads(line)["output"] for line in
                                    (viggo_variants[variant] / "train.jsonl").read_text().splitlines()]), None)
    assert len(df[df["constrained"]]) == 6
    for text in df[df["constrained"]]["generated_text"]:
        parsed = task.parse(text)
        assert parsed is not None and getattr(parsed, "complete", True), text
    assert results["tiny+constrained"]["metrics"]["parse_failure_rate"] == 0.0


def test_with_storage_in_a_bucket_the_engine_loads_the_model_and_adapter_itself(make_run, tiny_adapter, s3_bucket,
                                                                                tmp_path):
    """Nothing of the model's weights or the adapters goes through the driver's disk: the engine loads
    them from the bucket on its own node (ray.data.llm), the prompt tasks copy the tokenizer files."""
    import io

    import pyarrow.parquet as pq

    from workflow.core import storage

    recipe = make_run("eval-bucket", rows=4, adapters={"viggo": tiny_adapter}, storage=f"{s3_bucket}/runs",
                      evaluate={"sampling_params": {"temperature": 0.0, "max_tokens": 24}})
    cache = tmp_path / "cache"
    proc = subprocess.run([envs.python_for(envs.SERVE), "-m", "workflow.cli", "evaluate", str(recipe)],
                          env={**envs.stage_environment(envs.SERVE), "WORKFLOW_CACHE": str(cache)},
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = f"{s3_bucket}/runs/eval-bucket/evaluate"
    df = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/predictions.parquet"))).to_pandas()
    assert sorted(df["variant"].unique()) == ["base", "viggo"] and len(df) == 8 and (df["error"] == "").all()
    answers = df.set_index(["variant", "row_id"])["generated_text"]
    assert any(answers["viggo"][i] != answers["base"][i] for i in range(4))  # the adapter was applied
    cached = [p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()]
    # The one exception: the parity check's PEFT reference runs in the train environment on this machine.
    reference = [p for p in cached if p.startswith("eval-bucket/evaluate/parity/")]
    assert any(p.endswith("adapter_model.safetensors") for p in reference), cached
    assert not any(p.endswith(".safetensors") for p in cached if p not in reference), cached
    assert any(p.startswith("downloads/") and p.endswith("/tokenizer.json") for p in cached), cached  # prompt tasks
