"""The batch job on the CPU: any dataset in, every input column plus generations out, one row per row."""

import json
import shutil
import subprocess

import pytest
from conftest import INSTRUCTION

from workflow.core import envs
from workflow.core.errors import WorkflowError
from workflow.inference import adapters, io, processor

SENTENCES = [
    "Little Big Adventure is an average game on PlayStation.",
    "Do you like third person shooters?",
    "Tom Clancy's The Division is rated M.",
    "Have you played any games by Ubisoft?",
    "Is there a Mac release of Portal 2?",
]
TOO_LONG = "word " * 700  # far past max_model_len 512


def run_batch(recipe, *args: str) -> subprocess.CompletedProcess:
    cmd = [envs.python_for(envs.SERVE), "-m", "workflow.cli", "batch", str(recipe), *args]
    return subprocess.run(cmd, env=envs.stage_environment(envs.SERVE), capture_output=True, text=True, timeout=900,
                          check=False)


def test_batch_from_s3_parquet_to_s3_jsonl_with_two_adapters_and_a_too_long_row(make_run, tiny_adapter, s3_bucket,
                                                                                tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflow.core import storage

    rows = [{"id": i, "instruction": INSTRUCTION, "input": s, "source": "hand-written"}
            for i, s in enumerate(SENTENCES)]
    rows.append({"id": 99, "instruction": INSTRUCTION, "input": TOO_LONG, "source": "too long"})
    local = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), local)
    storage.write_bytes(f"{s3_bucket}/data/in.parquet", local.read_bytes())
    second = tmp_path / "second"
    shutil.copytree(tiny_adapter, second)
    recipe = make_run("batch-s3", evaluate={"sampling_params": {"temperature": 0.0, "max_tokens": 16}})

    proc = run_batch(recipe, "--input", f"{s3_bucket}/data/in.parquet", "--output", f"{s3_bucket}/out/preds.jsonl",
                     "--adapter", str(tiny_adapter), "--adapter", str(second), "--max-errors", "1")
    # The too-long row fails once per adapter: 2 failed rows, more than --max-errors allows; the output is written.
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: batch: 2 of {2 * len(rows)} rows failed, more than --max-errors 1 allows "
                           "(first: "), line
    assert "maximum context length" in line and f"every row is in {s3_bucket}/out/preds.jsonl" in line, line
    assert f"[batch] 2 of {2 * len(rows)} rows failed" in proc.stdout
    out = [json.loads(line) for line in storage.read_text(f"{s3_bucket}/out/preds.jsonl").splitlines()]
    assert len(out) == 2 * len(rows)
    assert set(out[0]) == {"id", "instruction", "input", "source", "model", "generated_text", "num_input_tokens",
                           "num_generated_tokens", "error"}
    assert sorted({r["model"] for r in out}) == sorted([tiny_adapter.name, "second"])
    failed = [r for r in out if r["error"]]
    assert sorted(r["id"] for r in failed) == [99, 99]
    assert all("maximum context length" in r["error"] and r["generated_text"] == "" for r in failed)
    ok = [r for r in out if not r["error"]]
    assert all(r["num_generated_tokens"] > 0 and r["num_input_tokens"] > 100 and r["generated_text"] for r in ok)
    assert {r["input"] for r in ok} == set(SENTENCES)
    assert f"wrote {2 * len(rows)} rows" in proc.stdout


def test_batch_refuses_an_output_it_cannot_write_before_starting(make_run, tmp_path):
    recipe = make_run("batch-bad-out")
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    proc = run_batch(recipe, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.csv"))
    assert proc.returncode == 2
    assert "must end in .parquet or .jsonl" in proc.stderr.strip().splitlines()[-1]


def test_lora_settings_come_from_the_adapter_and_an_over_rank_pin_is_refused(tiny_adapter, tmp_path):
    derived = adapters.lora_engine_kwargs({"max_model_len": 512}, {"a": str(tiny_adapter)}, "evaluate.processor")
    assert derived == {"max_model_len": 512, "enable_lora": True, "max_lora_rank": 8, "max_loras": 1}
    big = tmp_path / "big"
    shutil.copytree(tiny_adapter, big)
    cfg = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**cfg, "r": 12}))
    assert adapters.lora_engine_kwargs({}, {"big": str(big)}, "x")["max_lora_rank"] == 16
    with pytest.raises(WorkflowError, match=r"rank 12, above evaluate.processor.engine_kwargs.max_lora_rank=8 "
                                            r"\(set evaluate.processor.engine_kwargs.max_lora_rank to 16"):
        adapters.lora_engine_kwargs({"max_lora_rank": 8}, {"big": str(big)}, "evaluate.processor")


@pytest.mark.heavy
def test_any_format_is_read_locally_and_from_s3(tmp_path, s3_bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from workflow.core import storage

    rows = [{"prompt": f"p{i}", "n": i} for i in range(7)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.csv").write_text("prompt,n\n" + "".join(f"p{i},{i}\n" for i in range(7)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    storage.write_bytes(f"{s3_bucket}/a.parquet", (tmp_path / "a.parquet").read_bytes())
    processor.init_ray()
    try:
        for uri in (tmp_path / "a.jsonl", tmp_path / "a.csv", f"{s3_bucket}/a.parquet"):
            ds = io.read_dataset(str(uri))
            assert sorted(ds.columns()) == ["n", "prompt"] and ds.count() == 7, uri
    finally:
        ray.shutdown()
    (tmp_path / "a.txt").write_text("prompt\n")
    with pytest.raises(WorkflowError, match="cannot tell the format"):
        io.read_dataset(str(tmp_path / "a.txt"))
    with pytest.raises(WorkflowError, match="names the output uses"):
        processor.check_input_columns(["prompt", "generated_text"], "in.jsonl")


def test_row_errors_are_counted_and_fail_the_job_past_max_errors(capsys):
    from workflow.stages.batch import check_row_errors

    check_row_errors(0, 10, "", 0, "out.jsonl")
    assert capsys.readouterr().out == ""
    check_row_errors(3, 10, "too long", 3, "out.jsonl")  # allowed: counted and printed
    assert "[batch] 3 of 10 rows failed (their error column in out.jsonl says why); first: too long" in \
        capsys.readouterr().out
    with pytest.raises(WorkflowError, match=r"^batch: 4 of 10 rows failed, more than --max-errors 3 allows"):
        check_row_errors(4, 10, "too long", 3, "out.jsonl")


def test_input_and_adapters_on_this_disk_go_where_every_node_reads_them(tiny_adapter, s3_bucket, tmp_path):
    """What a batch on a cluster of several nodes does first (no cluster needed to check the copies)."""
    from workflow.core import storage
    from workflow.stages.batch import _where_every_node_reads

    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    given = {tiny_adapter.name: str(tiny_adapter)}
    lora = adapters.engine_adapters(given, tmp_path / "cache")
    assert lora.loading_path is None  # a folder on this machine: engines elsewhere cannot load it
    uploads = f"{s3_bucket}/runs/r/batch/uploads/job"
    source, shared = _where_every_node_reads(str(tmp_path / "in.jsonl"), given, lora, uploads)
    assert source == f"{uploads}/input/in.jsonl" and storage.read_text(source) == (tmp_path / "in.jsonl").read_text()
    assert shared == adapters.EngineAdapters({tiny_adapter.name: tiny_adapter.name}, f"{uploads}/adapters")
    assert storage.list_files(f"{uploads}/adapters/{tiny_adapter.name}") == sorted(
        p.relative_to(tiny_adapter).as_posix() for p in tiny_adapter.rglob("*") if p.is_file())
    # Already in storage, named by their folders: left where they are.
    remote = {"a": f"{s3_bucket}/lora/a"}
    storage.upload_dir(tiny_adapter, remote["a"])
    kept = adapters.engine_adapters(remote, tmp_path / "cache")
    assert _where_every_node_reads(f"{s3_bucket}/in.jsonl", remote, kept, uploads) == (f"{s3_bucket}/in.jsonl", kept)
