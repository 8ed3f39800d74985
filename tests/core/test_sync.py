"""workflow sync: folders between local disk and S3 (round trip, atomic replace), and the hub's error line."""

from __future__ import annotations

import pytest

from workflow.cli import main
from workflow.core import storage
from workflow.core.errors import WorkflowError
from workflow.core.sync import publish_dir, sync


def _folder(path, files: dict[str, str]):
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def _read(path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def test_sync_round_trip_local_s3_local(tmp_path, s3_bucket):
    files = {"adapter_config.json": '{"r": 8}', "adapter_model.safetensors": "weights", "sub/tokenizer.json": "{}"}
    src = _folder(tmp_path / "src", files)
    assert main(["sync", str(src), f"{s3_bucket}/lora/viggo"]) == 0
    assert storage.list_files(f"{s3_bucket}/lora/viggo") == sorted(files)
    sync(f"{s3_bucket}/lora/viggo", str(tmp_path / "back"))
    assert _read(tmp_path / "back") == files


def test_publish_replaces_an_old_folder_without_leftovers(tmp_path, s3_bucket):
    uri = f"{s3_bucket}/adapters/a"
    publish_dir(_folder(tmp_path / "v1", {"adapter_config.json": "v1", "old.bin": "x", "w.safetensors": "v1"}), uri)
    publish_dir(_folder(tmp_path / "v2", {"adapter_config.json": "v2", "w.safetensors": "v2"}), uri)
    assert storage.list_files(uri) == ["adapter_config.json", "w.safetensors"]
    assert storage.read_text(f"{uri}/adapter_config.json") == "v2" and storage.read_text(f"{uri}/w.safetensors") == "v2"
    local = tmp_path / "local-dest"
    publish_dir(tmp_path / "v1", str(local))
    publish_dir(tmp_path / "v2", str(local))
    assert _read(local) == {"adapter_config.json": "v2", "w.safetensors": "v2"}
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_sync_from_an_unreachable_hub_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "3")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "3")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    with pytest.raises(WorkflowError) as err:
        sync("hf://Qwen/Qwen2.5-0.5B-Instruct", str(tmp_path / "qwen"))
    message = str(err.value)
    assert message.startswith("hf://Qwen/Qwen2.5-0.5B-Instruct: cannot download from the Hugging Face hub (")
    assert "network access" in message and "\n" not in message
    assert not (tmp_path / "qwen").exists()


def test_sync_rejects_a_missing_source_and_a_hub_destination(tmp_path):
    with pytest.raises(WorkflowError, match="no such folder"):
        sync(str(tmp_path / "nope"), str(tmp_path / "out"))
    with pytest.raises(WorkflowError, match="uploading to the Hugging Face hub is not supported"):
        sync(str(tmp_path), "hf://me/model")
