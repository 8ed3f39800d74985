"""Storage helpers on a local folder and on the loopback S3 server."""

import time

import pytest

from workflow.core import storage
from workflow.core.errors import WorkflowError


def test_atomic_write_leaves_no_temp_files(tmp_path):
    uri = str(tmp_path / "a" / "b.json")
    storage.write_json(uri, {"x": 1})
    storage.write_json(uri, {"x": 2})
    assert storage.read_json(uri) == {"x": 2}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def make_folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(b"w" * 1000)
    (root / "sub" / "tok.json").write_text("{}")
    (root / "adapter_config.json").write_text('{"r": 8}')
    return root


def test_upload_download_round_trip_on_s3(tmp_path, s3_bucket):
    src = make_folder(tmp_path / "src")
    uri = f"{s3_bucket}/adapters/a"
    storage.upload_dir(src, uri, last=["adapter_config.json"])
    assert storage.list_files(uri) == ["adapter_config.json", "sub/tok.json", "weights.bin"]
    back = storage.download_dir(uri, tmp_path / "back")
    assert (back / "weights.bin").read_bytes() == b"w" * 1000 and (back / "sub" / "tok.json").read_text() == "{}"
    storage.copy_dir(uri, str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "adapter_config.json").read_text() == '{"r": 8}'
    storage.remove(uri)
    assert storage.list_files(uri) == []


def test_local_upload_replaces_the_folder_whole(tmp_path):
    src = make_folder(tmp_path / "src")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    storage.upload_dir(src, str(dest))
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "sub", "weights.bin"]
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_transient_errors_are_retried_then_reported(capsys):
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("503 Slow Down")
        return "ok"

    assert storage.with_retries(flaky, what="upload x", base_delay=0.01) == "ok"
    assert len(attempts) == 3 and "retry 2 in" in capsys.readouterr().out

    def always():
        raise ConnectionError("down")

    with pytest.raises(WorkflowError, match=r"upload y: failed after 2 attempts in 0s: ConnectionError: down"):
        storage.with_retries(always, what="upload y", attempts=2, base_delay=0.01)


def test_retries_stop_when_the_next_would_start_past_the_budget(monkeypatch):
    calls = []

    def down():
        calls.append(time.monotonic())
        raise ConnectionError("refused")

    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "1.5")
    with pytest.raises(WorkflowError, match=r"read w: failed after \d+ attempts in \ds: ConnectionError: refused "
                                            r"\(.*WORKFLOW_STORAGE_RETRY_SECONDS \(now 1.5\)"):
        storage.with_retries(down, what="read w", base_delay=0.1)
    assert 3 <= len(calls) and calls[-1] - calls[0] <= 1.5
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "soon")
    with pytest.raises(WorkflowError, match="WORKFLOW_STORAGE_RETRY_SECONDS='soon': not a number of seconds"):
        storage.with_retries(down, what="read w")


def test_missing_files_are_not_retried():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing, what="read z", base_delay=0.01)
    assert len(calls) == 1


def test_download_of_nothing_says_so(tmp_path, s3_bucket):
    with pytest.raises(WorkflowError, match="nothing there to download"):
        storage.download_dir(f"{s3_bucket}/nope", tmp_path / "x")


def _bucket_with_a_climbing_key(s3_bucket: str, key: str) -> str:
    """``<bucket>/model``: a model's files and one object whose key, relative to the folder, is ``key``."""
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    s3 = boto3.client("s3")
    for name in ("config.json", "model.safetensors"):
        s3.put_object(Bucket=bucket, Key=f"model/{name}", Body=b"{}")
    s3.put_object(Bucket=bucket, Key=f"model/{key}", Body=b"planted")
    assert any(o["Key"] == f"model/{key}" for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    return f"{s3_bucket}/model"


@pytest.mark.parametrize("key", ["../escaped.txt", "sub/../../escaped.txt", "/escaped.txt"])
def test_a_key_that_climbs_out_is_refused_before_anything_is_written(tmp_path, s3_bucket, key):
    uri = _bucket_with_a_climbing_key(s3_bucket, key)
    dest = tmp_path / "a" / "dest"
    with pytest.raises(WorkflowError, match=r"object key '.*escaped.txt' is absolute or climbs out of the folder; "
                                            r"nothing was downloaded"):
        storage.download_dir(uri, dest)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a"]
    with pytest.raises(WorkflowError, match="climbs out"):
        storage.node_local_copy(uri, "k" * 12)


def test_workflow_sync_and_the_model_copy_refuse_it_in_one_line(tmp_path, s3_bucket):
    import subprocess
    import sys

    import yaml

    from workflow.core import envs

    uri = _bucket_with_a_climbing_key(s3_bucket, "../../escaped.txt")
    work = tmp_path / "work"
    work.mkdir()
    recipe = work / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "climb", "storage": str(work / "runs"),
                                      "model": {"source": uri, "mirror": True},
                                      "ingest": {"source": str(work / "d.jsonl"), "instruction": "x"}}))
    env = {**envs.stage_environment(envs.SERVE), "WORKFLOW_CACHE": str(work / "cache")}
    for args in (["sync", uri, str(work / "out" / "model")], ["model", str(recipe)]):
        proc = subprocess.run([sys.executable, "-m", "workflow", *args], env=env, capture_output=True, text=True,
                              timeout=300, cwd=work)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode != 0 and len(errors) == 1, (args, proc.stderr[-2000:])
        assert "object key '../../escaped.txt' is absolute or climbs out of the folder" in errors[0], errors
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.parent.glob("escaped.txt"))
    assert not (work / "out").exists() and not (work / "runs" / "climb" / "model" / "weights").exists()


def test_the_cache_folder_is_the_users_own(tmp_path, monkeypatch):
    import os
    import stat

    monkeypatch.delenv("WORKFLOW_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = storage.cache_root()
    assert root == tmp_path / "xdg" / "workflow" and stat.S_IMODE(root.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("WORKFLOW_CACHE", str(shared))
    assert storage.cache_root() == shared and stat.S_IMODE(shared.stat().st_mode) == 0o700  # made private
    monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 1)  # as another user would find it
    with pytest.raises(WorkflowError, match=r"shared: the workflow's cache folder belongs to another user"):
        storage.cache_root()


def test_a_marker_is_trusted_only_if_it_is_the_users_file(tmp_path, monkeypatch):
    import os

    marker = tmp_path / ".complete"
    assert not storage.owned_by_user(marker)
    marker.touch()
    assert storage.owned_by_user(marker)
    link = tmp_path / "link"
    link.symlink_to(marker)
    assert not storage.owned_by_user(link)
    monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 1)
    assert not storage.owned_by_user(marker)
