"""Each bench script runs a tiny real measurement and writes its result file with the figures bench/README.md quotes.

Shrunk to the least that still measures: the tiny model, a few rows, a few seconds of load. The CPU benches run
here; the GPU ones (train_throughput, train_scaling) need CUDA and run in `make test-gpu`. Two runs leave out
what does not fit CI's budget, and say so: serve_latency and serve_soak compare plain vLLM with vLLM's own
placement / soak plain vLLM's server instead of the Ray Serve app (its deploy and 35 s drain are 2 minutes;
the serve stage's tests deploy it), and faults, which needs root, network namespaces and minutes per scenario,
is checked on a hand-written record of its events.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from workflow.core import envs

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
# The figures each benchmark's file must hold (issue 35; the README's tables read them).
REQUIRED = {
    "train_throughput": ("mfu", "rows_per_s", "tokens_per_s", "x_reference", "loss", "reference_loss"),
    "train_scaling": ("efficiency", "rows_per_s"),
    "serve_latency": ("req_per_s_vs_vllm", "ttft_p50_vs_vllm", "ttft_p99_vs_vllm"),
    "batch_throughput": ("steady_vs_vllm", "job_vs_vllm"),
    "demo": ("seconds", "stage_seconds", "adapter_metrics"),
    "serve_soak": ("requests", "failed_requests", "rss_growth_pct", "stop_s"),
    "cpu_train": ("step_s", "speedup"),
    "cpu_lora_ops": ("adapter_s", "base_s", "speedup"),
}
FAULT_FIGURES = ("rows_lost", "recovery_s", "failed_requests")


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    sys.path.insert(0, str(BENCH))  # the scripts import bench/record.py as `record`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved  # what the script put on the path too
    return module


record = load_bench("record")


def run_bench(script: str, *args: str, timeout: int = 600, env: dict | None = None) -> None:
    proc = subprocess.run([envs.python_for(envs.SERVE), str(BENCH / script), *args], capture_output=True, text=True,
                          env={**envs.stage_environment(envs.SERVE), **(env or {})}, timeout=timeout, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def check_schema(doc: dict, benchmark: str) -> dict:
    """The file's keys and their forms; returns the figures."""
    assert list(doc)[:6] == list(record.KEYS) and doc["benchmark"] == benchmark
    date = datetime.fromisoformat(doc["date"])
    assert date.utcoffset() == timedelta(0), doc["date"]
    assert re.fullmatch(r"[0-9a-f]{7,40}\+?", doc["commit"]), doc["commit"]
    assert re.fullmatch(r"cpu-avx512|cpu-avx2|[a-z]+\d+(x\d+)?", doc["machine"]), doc["machine"]
    assert doc["command"] and isinstance(doc["figures"], dict)
    missing = [k for k in REQUIRED.get(benchmark, ()) if k not in doc["figures"]]
    assert not missing, f"{benchmark}: no {missing}"
    return doc["figures"]


def written(path: Path, benchmark: str, script: str) -> dict:
    """A result file the test's run wrote: the schema, this machine, this command."""
    doc = json.loads(path.read_text())
    figures = check_schema(doc, benchmark)
    assert doc["machine"] == record.machine_kind()
    assert f"bench/{script}" in doc["command"] and str(path) in doc["command"]
    return figures


# ---------------------------------------------------------------- the committed files and the README

def test_every_result_file_has_the_schema_and_the_quoted_figures():
    files = sorted((BENCH / "results").glob("*/*.json"))
    assert {p.parent.name for p in files} >= set(REQUIRED) | {"faults"}
    for path in files:
        if path.name.endswith(".raw.json"):
            continue
        doc = json.loads(path.read_text())
        figures = check_schema(doc, path.parent.name)
        assert path.stem == doc["machine"], path
        if doc["benchmark"] == "faults":
            for scenario, values in figures.items():
                assert all(k in values for k in FAULT_FIGURES), (path, scenario)
    assert not [p for p in (BENCH / "results").iterdir() if p.is_file()], "a file outside the benchmarks' folders"
    assert all(p.stat().st_size <= record.RAW_LIMIT for p in (BENCH / "results").glob("*/*")), "a file over 1 MB"


def test_readme_tables_are_the_result_files():
    proc = subprocess.run([sys.executable, str(BENCH / "table.py"), "--check"], capture_output=True, text=True,
                          cwd=BENCH, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_machine_kinds_of_gpus():
    assert record.gpu_kind(["NVIDIA H100 80GB HBM3"]) == "h100"
    assert record.gpu_kind(["NVIDIA H100 80GB HBM3"] * 2) == "h100x2"
    assert record.gpu_kind(["NVIDIA H200"] * 4) == "h200x4"
    assert record.gpu_kind(["NVIDIA A10G"]) == "a10g"


def test_a_result_file_appears_complete_with_its_raw_data_beside_it(tmp_path):
    out = tmp_path / "x" / "cpu-avx2.json"
    record.write("demo", {"seconds": 1.5}, out, raw={"steps": [1, 2]}, machine="cpu-avx2")
    assert json.loads(out.read_text())["figures"] == {"seconds": 1.5}
    assert json.loads((tmp_path / "x" / "cpu-avx2.raw.json").read_text()) == {"steps": [1, 2]}
    record.write("demo", {"seconds": 2}, out, raw={"big": "x" * record.RAW_LIMIT}, machine="cpu-avx2")
    assert json.loads((tmp_path / "x" / "cpu-avx2.raw.json").read_text()) == {"steps": [1, 2]}  # not replaced
    assert sorted(p.name for p in out.parent.iterdir()) == ["cpu-avx2.json", "cpu-avx2.raw.json"]  # no temp left


# ---------------------------------------------------------------- the CPU benches, each a tiny real run

@pytest.mark.heavy  # starts vLLM (and Ray) itself
def test_batch_throughput(tiny_model, tmp_path):
    out = tmp_path / "batch.json"
    run_bench("batch_throughput.py", "--modes", "vllm,stage", "--rows", "8", "--max-tokens", "4", "--batch-size", "8",
              "--model", str(tiny_model), "--out", str(out))
    figures = written(out, "batch_throughput", "batch_throughput.py")
    assert set(figures["rows_per_s_steady"]) == {"vllm", "stage"}
    assert 0 < figures["steady_vs_vllm"] and 0 < figures["job_vs_vllm"] < 1  # the stage starts Ray: a longer job
    assert len(figures["steady_vs_vllm_pairs"]) == 1 and figures["rows"] == 8


@pytest.mark.heavy  # starts vLLM (and Ray) itself
def test_serve_latency(tiny_model, tmp_path):
    out = tmp_path / "serve.json"
    run_bench("serve_latency.py", "--model", str(tiny_model), "--variants", "vllm,vllm-stock", "--clients", "2",
              "--duration", "1", "--warmup", "0.5", "--rounds", "1", "--max-tokens", "4", "--out", str(out))
    figures = written(out, "serve_latency", "serve_latency.py")
    assert figures["app"] == "vllm-stock" and figures["errors"] == 0
    for key in REQUIRED["serve_latency"]:
        assert list(figures[key]) == ["2"] and figures[key]["2"] > 0, key
    rows = json.loads(out.with_name("serve.raw.json").read_text())["rows"]
    assert [(r["variant"], r["clients"]) for r in rows] == [("vllm", 2), ("vllm-stock", 2)]


@pytest.mark.heavy  # starts vLLM (and Ray) itself
def test_serve_soak(tiny_model, tmp_path):
    out = tmp_path / "soak.json"
    run_bench("serve_soak.py", "--model", str(tiny_model), "--app", "vllm", "--clients", "2", "--duration", "1",
              "--warmup", "0.5", "--max-tokens", "4", "--sample-every", "0.25", "--out", str(out))
    figures = written(out, "serve_soak", "serve_soak.py")
    assert figures["requests"] > 0 and figures["failed_requests"] == 0
    assert figures["processes_left"] == 0 and figures["port_open_after"] is False


@pytest.mark.heavy  # starts vLLM (and Ray) itself
def test_cpu_lora_ops(tiny_model, tiny_adapter, viggo_alpaca, tmp_path):
    out = tmp_path / "ops.json"
    run_bench("cpu_lora_ops.py", "--model", str(tiny_model), "--adapter", str(tiny_adapter), "--test",
              str(viggo_alpaca / "test.jsonl"), "--rows", "4", "--max-tokens", "4", "--out", str(out))
    figures = written(out, "cpu_lora_ops", "cpu_lora_ops.py")
    assert set(figures["adapter_s"]) == set(figures["base_s"]) == {"vllm", "workflow"} and figures["rows"] == 4
    assert figures["speedup"] == round(figures["adapter_s"]["vllm"] / figures["adapter_s"]["workflow"], 2)


@pytest.mark.heavy  # the train stage: Ray Train
def test_cpu_train(trained_run, tmp_path):
    from workflow.config import load_recipe

    out = tmp_path / "train.json"
    run_bench("cpu_train.py", "--run", load_recipe(trained_run["recipe"]).run_uri, "--variants", "all",
              "--steps", "3", "--skip", "1", "--out", str(out))
    figures = written(out, "cpu_train", "cpu_train.py")
    assert list(figures["step_s"]) == ["all"] and figures["step_s"]["all"] > 0 and figures["speedup"] == 1.0
    steps = json.loads(out.with_name("train.raw.json").read_text())["results"]["all"][0]["steps"]
    assert [s[0] for s in steps] == [1, 2, 3]


def test_demo_times_the_pipeline_stage_by_stage(tmp_path):
    from conftest import ingest_only_recipe

    out = tmp_path / "demo.json"
    run_bench("demo.py", "--recipe", str(ingest_only_recipe(tmp_path, "bench-demo")), "--stages", "ingest",
              "--out", str(out))
    figures = written(out, "demo", "demo.py")
    assert list(figures["stage_seconds"]) == ["ingest"]
    assert figures["seconds"] >= figures["stage_seconds"]["ingest"]
    assert figures["adapter_metrics"] == {} and figures["parity"] is None  # no evaluate stage in this recipe


def test_demo_figures_of_the_shared_end_to_end_run(ci_run):
    """bench/demo.py's reading of a whole run (the CI recipe's, every stage), against the run's own manifests."""
    demo = load_bench("demo")
    seconds = demo.stage_seconds(ci_run["proc"].stdout)
    assert list(seconds) == ["ingest", "model", "train", "evaluate", "serve"] and all(s >= 0 for s in seconds.values())
    metrics, parity = demo.adapter_results(ci_run["recipe"].run_uri)
    adapter = ci_run["manifests"]["train"]["summary"]["adapter_name"]
    assert metrics == {adapter: ci_run["manifests"]["evaluate"]["summary"]["metrics"][adapter]}
    assert {"function_accuracy", "slot_f1", "exact_match"} <= set(metrics[adapter])
    assert re.fullmatch(r"\d+/\d+", parity[adapter])


def test_demo_reads_the_adapters_metrics_and_parity(tmp_path):
    from workflow.core import manifest

    demo = load_bench("demo")
    adapter = {"function_accuracy": 0.92, "slot_f1": 0.815, "exact_match": 0.444}
    summary = {"metrics": {"base": {"slot_f1": 0.0}, "base+constrained": {"slot_f1": 0.1}, "viggo": adapter,
                           "viggo+constrained": {"slot_f1": 0.82}},
               "parity": {"viggo": "16/16 rows identical to training"}}
    manifest.write(str(tmp_path / "run" / "evaluate"), stage="evaluate", run="run", config={}, inputs={}, outputs={},
                   started_at=manifest.now(), summary=summary)
    assert demo.adapter_results(str(tmp_path / "run")) == ({"viggo": adapter}, {"viggo": "16/16"})


def test_faults_figures_from_a_record_of_events():
    """The figures of each kind of scenario, from a hand-written record shaped as bench/faults.py records them."""
    faults = load_bench("faults")
    requests = {"before": {"ok": 40}, "in_flight_at_fault": {"ok": 3, "error RemoteProtocolError": 2},
                "started_during_outage": {"ok": 8, "error ConnectError": 5}, "started_after_recovery": {"ok": 10},
                "total": 68}
    results = {"scenarios": {
        "baseline": {"exit_code": 0, "seconds": 60.0},
        "train-node-lost": {"exit_code": 0, "seconds": 120.0, "killed_at_s": 65.0, "resumed_at_s": 95.5,
                            "checkpoint_step_before_kill": 4, "manifest": {"summary": {"resumed_from_step": 4}}},
        "train-node-lost-no-replacement": {"exit_code": 2, "seconds": 122.4, "killed_at_s": 47.5,
                                           "failed_at_s": 122.4, "resumed_at_s": None, "manifest": None},
        "evaluate-node-lost": {"exit_code": 0, "seconds": 290.0, "killed_at_s": 138.9,
                               "rows": {"base": {"rows": 10, "missing": 0}, "eval": {"rows": 9, "missing": 1}}}},
        "serve": {"serve-node-lost": {"recovery_s": 160.0, "requests": requests},
                  "head-restart": {"killed_at_s": 16.0, "ok_again_at_s": {"via_head": 150.5, "via_node": 46.0},
                                   "requests_head": requests, "requests_replica_node": {"before": {"ok": 5},
                                                                                         "total": 5}}}}
    figures = faults.scenario_figures(results)
    assert "baseline" not in figures
    assert figures["train-node-lost"] == {"rows_lost": None, "recovery_s": 30.5, "failed_requests": None,
                                          "exit_code": 0, "steps_redone": 0}
    assert figures["train-node-lost-no-replacement"]["failed_after_s"] == pytest.approx(74.9)
    assert figures["train-node-lost-no-replacement"]["recovery_s"] is None
    assert figures["evaluate-node-lost"]["rows_lost"] == 1
    # Failed: the 2 streams cut; the 5 refused connections are counted apart (clients retry them).
    assert figures["serve-node-lost"] == {"rows_lost": None, "recovery_s": 160.0, "failed_requests": 2,
                                          "refused_connections": 5, "requests": 68}
    assert figures["head-restart"]["recovery_s"] == 134.5 and figures["head-restart"]["requests"] == 73


# ---------------------------------------------------------------- the GPU benches (make test-gpu)

def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.heavy
@pytest.mark.skipif(_cuda_devices() == 0, reason="a GPU bench: runs in make test-gpu")
def test_train_throughput_on_a_gpu(tmp_path):
    out = tmp_path / "tt.json"
    proc = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--rows", "128", "--variants",
                           "fast,reference", "--warmup", "", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    doc = json.loads(out.read_text())
    figures = check_schema(doc, "train_throughput")
    assert 0 < figures["mfu"] < 1 and figures["x_reference"] > 1 and set(figures["variants"]) == {"fast", "reference"}


@pytest.mark.gpu
@pytest.mark.heavy
@pytest.mark.skipif(_cuda_devices() == 0, reason="a GPU bench: runs in make test-gpu")
def test_train_scaling_on_gpus(tmp_path):
    workers = "1,2" if _cuda_devices() >= 2 else "1"
    out = tmp_path / "ts.json"
    env = {**os.environ, "WORKFLOW_TRAIN_PYTHON": sys.executable, "WORKFLOW_SERVE_PYTHON": sys.executable}
    proc = subprocess.run([sys.executable, str(BENCH / "train_scaling.py"), "--workers", workers, "--rows", "256",
                           "--work", str(tmp_path / "work"), "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=1200, check=False)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    figures = check_schema(json.loads(out.read_text()), "train_scaling")
    assert list(figures["rows_per_s"]) == workers.split(",") and not figures["failed"]
    assert list(figures["efficiency"]) == workers.split(",")[1:]


@pytest.mark.heavy  # starts vLLM itself
def test_serve_adapters(tiny_model, tiny_adapter, tmp_path):
    """Plain vLLM's side only: the workflow app's deploy and drain are 2 minutes (the serve stage's tests deploy it,
    and tests/stages/test_serve.py reads the per-adapter metrics this bench reads)."""
    out = tmp_path / "adapters.json"
    run_bench("serve_adapters.py", "--model", str(tiny_model), "--adapter", str(tiny_adapter), "--servers", "vllm",
              "--adapters", "1,4", "--ranks", "8", "--clients", "4", "--duration", "3", "--max-tokens", "4",
              "--out", str(out))
    figures = written(out, "serve_adapters", "serve_adapters.py")
    import yaml

    recipe = yaml.safe_load((REPO / "recipes" / "viggo-cpu.yaml").read_text())
    assert figures["failed_requests"] == 0
    assert figures["max_loras"] == recipe["serve"]["llm_config"]["lora_config"]["max_num_adapters_per_replica"]
    for key in ("req_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "cold_load_p50_ms", "peak_rss_mb"):
        assert list(figures[key]) == ["vllm@r8"] and list(figures[key]["vllm@r8"]) == ["1", "4"], key
        assert all(v > 0 for v in figures[key]["vllm@r8"].values()), (key, figures[key])
    assert figures["req_per_s_vs_n1"]["vllm@r8"]["1"] == 1.0
    assert figures["tokens_per_s"]["vllm@r8"]["4"] == pytest.approx(4 * figures["req_per_s"]["vllm@r8"]["4"], rel=0.02)
    rows = json.loads(out.with_name("adapters.raw.json").read_text())["rows"]["vllm@r8"]
    assert {r[1] for r in rows["1"]} == {0} and {r[1] for r in rows["4"]} <= {0, 1, 2, 3}
    served = len({r[1] for r in rows["4"]})
    assert figures["evictions_lru_model"]["vllm@r8"]["4"] >= served - 2 and figures["app_vs_vllm_req_per_s"] == {"r8": {}}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_adapters_makes_adapters_of_any_rank_that_differ(tiny_adapter, tmp_path):
    from safetensors.numpy import load_file

    bench = load_bench("serve_adapters")
    bench.make_adapters(tiny_adapter, tmp_path, ["a", "b"], 16, base_name="base")
    trained = load_file(str(tiny_adapter / "adapter_model.safetensors"))
    config = json.loads((tiny_adapter / "adapter_config.json").read_text())
    a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "ab")
    assert set(a) == set(trained)
    for key, w in trained.items():
        grown = (16, w.shape[1]) if ".lora_A." in key else (w.shape[0], 16)
        assert a[key].shape == grown and not (a[key] == b[key]).all(), key
    made = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert made["r"] == 16 and made["lora_alpha"] / 16 == config["lora_alpha"] / config["r"]
    assert made["base_model_name_or_path"] == "base"
