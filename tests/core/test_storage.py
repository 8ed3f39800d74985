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
