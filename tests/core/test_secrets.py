"""Planted tokens and keys never show up in what a run leaves behind.

The shared end-to-end run (conftest.ci_run: every stage, serve and evaluate included, with
CI_SECRETS in its environment) is searched whole: the console, every file of the run (stage logs,
manifests, endpoint.json, report.html), the workflow's cache and Ray's session folders of its
jobs (the train stage's workers receive the storage and hub variables) and of its serving
cluster. Separately, a secret that reaches a recipe value (``${HF_TOKEN}`` in a URL) is masked in
the manifest and in the error line, and masking is by value and whole secret names.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import CI_SECRETS

from workflow.core import envs
from workflow.core.secrets import REDACTED, redact, redact_mapping, register_secret_env

SECRETS = {
    "HF_TOKEN": "hf_plantedHubToken000000000001",
    "HUGGING_FACE_HUB_TOKEN": "hf_plantedHubToken000000000002",
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED000000003",
    "AWS_SECRET_ACCESS_KEY": "plantedAwsSecretAccessKey000000004",
    "AWS_SESSION_TOKEN": "plantedAwsSessionToken000000005",
    "OPENAI_API_KEY": "sk-plantedOpenAiKey000000006",
    "WORKFLOW_API_KEY": "plantedServeApiKey000000007",
}


def leaks_in(root: Path, secrets: dict[str, str] = SECRETS) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 200_000_000:
            data = path.read_bytes()
            found += [f"{name} in {path}" for name, value in secrets.items() if value.encode() in data]
    return found


def test_no_planted_secret_anywhere_the_end_to_end_run_wrote(ci_run):
    run = Path(ci_run["recipe"].run_uri)
    proc = ci_run["proc"]
    # The places searched hold what they should (so the search is not over empty folders).
    for written in ("report.html", "serve/endpoint.json", "serve/manifest.json", "evaluate/manifest.json",
                    "logs/evaluate.log", "logs/serve.log"):
        assert (run / written).is_file(), written
    sessions = [s.parent.parent.name for s in ci_run["ray_tmp"].glob("**/session_*/logs")]
    assert any(s.startswith("wf-ray-") for s in sessions) and "ray" in sessions, sessions  # serving cluster, jobs
    leaks = [f"{name} in the console" for name, value in CI_SECRETS.items() if value in proc.stdout + proc.stderr]
    for root in (run, ci_run["cache"], ci_run["ray_tmp"]):
        leaks += leaks_in(root, CI_SECRETS)
    assert not leaks, leaks


def test_max_tokens_stays_readable_in_the_end_to_end_runs_manifests(ci_run):
    serve = ci_run["manifests"]["serve"]["config"]
    assert serve["smoke"]["max_tokens"] == ci_run["recipe"].serve.smoke.max_tokens
    assert serve["api_key_env"] == "WORKFLOW_API_KEY"  # the variable's name, not its value
    evaluate = ci_run["manifests"]["evaluate"]["config"]
    assert REDACTED not in str(evaluate) and REDACTED not in str(serve)


def test_masking_is_by_value_and_by_secret_names_not_by_words(monkeypatch):
    from workflow.core import secrets

    monkeypatch.setattr(secrets, "_registered", set())
    monkeypatch.setenv("MY_SERVE_KEY_VAR", "a-served-key-0123456789")
    monkeypatch.setenv("MAX_TOKENS", "4096")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/home/u/.ray/auth_token")
    assert redact("key a-served-key-0123456789") == "key a-served-key-0123456789"  # not a secret's name
    register_secret_env("MY_SERVE_KEY_VAR")  # as the recipe's serve.api_key_env does
    assert redact("key a-served-key-0123456789 and 4096") == "key *** and 4096"
    assert redact("/home/u/.ray/auth_token") == "/home/u/.ray/auth_token"
    record = {"max_tokens": 4096, "max_new_tokens": 64, "eos_token": "<|im_end|>", "api_key_env": "MY_KEY",
              "token": "abc", "hf_token": "x", "password": "p", "Authorization": "Bearer x",
              "url": "s3://b/x?sig=a-served-key-0123456789", "nested": [{"api_key": "k"}]}
    assert redact_mapping(record) == {"max_tokens": 4096, "max_new_tokens": 64, "eos_token": "<|im_end|>",
                                      "api_key_env": "MY_KEY", "token": REDACTED, "hf_token": REDACTED,
                                      "password": REDACTED, "Authorization": REDACTED,
                                      "url": "s3://b/x?sig=***", "nested": [{"api_key": REDACTED}]}


def test_a_secret_in_a_recipe_value_is_masked_in_the_manifest_and_the_error_line(tmp_path, http_server):
    served = tmp_path / "served"
    served.mkdir()
    (served / "data.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": "d"}\n')
    base = http_server(served)
    env = {**envs.stage_environment(envs.SERVE), **SECRETS}

    def ingest(name: str, source: str) -> subprocess.CompletedProcess:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({"name": name, "storage": str(tmp_path / "runs"), "model": {"source": "tiny"},
                                          "ingest": {"source": source, "file_format": "jsonl", "instruction": "Parse.",
                                                     "split_ratios": {"train": 1.0}}}))
        return subprocess.run([sys.executable, "-m", "workflow", "ingest", str(recipe)], env=env, capture_output=True,
                              text=True, timeout=300)

    ok = ingest("good", base + "/data.jsonl?token=${HF_TOKEN}")
    assert ok.returncode == 0, ok.stderr
    written = (tmp_path / "runs" / "good" / "ingest" / "manifest.json").read_text()
    assert "/data.jsonl?token=***" in written and SECRETS["HF_TOKEN"] not in written

    bad = ingest("bad", base + "/missing.jsonl?token=${HF_TOKEN}")
    assert bad.returncode == 2
    assert "/missing.jsonl?token=***" in bad.stderr and SECRETS["HF_TOKEN"] not in bad.stderr + bad.stdout
