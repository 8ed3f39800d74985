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


def test_a_run_synced_to_a_bucket_reads_its_outputs_there(tmp_path, s3_bucket, capsys):
    from workflow.core import manifest
    from workflow.show import show

    run = str(tmp_path / "runs" / "moved")
    storage.write_text(f"{run}/ingest/test.jsonl", '{"instruction": "hi", "output": "x"}\n')
    storage.write_text(f"{run}/train/adapters/a/adapter_config.json", '{"r": 8}')
    common = dict(run="moved", config={}, inputs={}, started_at=manifest.now())
    manifest.write(f"{run}/ingest", stage="ingest", outputs={"test": f"{run}/ingest/test.jsonl"}, **common)
    manifest.write(f"{run}/model", stage="model", outputs={"model": "Qwen/Qwen2.5-0.5B-Instruct"}, **common)
    written = manifest.write(f"{run}/train", stage="train", outputs={
        "adapter": f"{run}/train/adapters/a", "adapters_dir": f"{run}/train/adapters",
        "rows": f"{run}/ingest/test.jsonl", "folder": f"{run}/train"}, **common)
    assert written["outputs"]["adapter"] == f"{run}/train/adapters/a"  # what the runner goes on with
    # On disk: relative to the stage folder; nothing names the folder the run was written in.
    for stage in ("ingest", "model", "train"):
        assert str(tmp_path) not in (tmp_path / "runs" / "moved" / stage / "manifest.json").read_text(), stage
    assert storage.read_json(f"{run}/train/manifest.json")["outputs"] == {
        "adapter": "./adapters/a", "adapters_dir": "./adapters", "rows": "../ingest/test.jsonl", "folder": "."}

    moved = f"{s3_bucket}/runs/moved"
    assert main(["sync", run, moved]) == 0
    outputs = manifest.read(f"{moved}/train")["outputs"]
    assert outputs == {"adapter": f"{moved}/train/adapters/a", "adapters_dir": f"{moved}/train/adapters",
                       "rows": f"{moved}/ingest/test.jsonl", "folder": f"{moved}/train"}
    assert storage.read_json(f"{outputs['adapter']}/adapter_config.json") == {"r": 8}
    assert storage.read_text(outputs["rows"]).startswith('{"instruction": "hi"')
    assert manifest.read(f"{moved}/model")["outputs"] == {"model": "Qwen/Qwen2.5-0.5B-Instruct"}  # outside the run
    capsys.readouterr()
    show(moved)
    shown = capsys.readouterr().out
    assert f"output adapter: {moved}/train/adapters/a" in shown and str(tmp_path) not in shown

    # A manifest written before outputs were relative (absolute paths) still reads as it was written.
    old = {**storage.read_json(f"{run}/ingest/manifest.json"), "outputs": {"test": f"{run}/ingest/test.jsonl"}}
    storage.write_json(f"{run}/ingest/manifest.json", old)
    assert manifest.read(f"{run}/ingest")["outputs"] == {"test": f"{run}/ingest/test.jsonl"}
