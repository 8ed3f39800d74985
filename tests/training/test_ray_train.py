"""workflow.training: the run_exp arguments, the pre-training corpus, the key check, and Ray Train over two nodes with S3 storage."""

from __future__ import annotations

import pytest

from workflow.core.errors import WorkflowError
from workflow.training.llamafactory_args import DEFAULTS, llamafactory_args


def test_llamafactory_args_fill_in_paths_over_recipe_keys_over_defaults():
    recipe = {"stage": "sft", "lora_rank": 8, "logging_steps": 1, "report_to": "none"}
    args = llamafactory_args(recipe, model="/m", dataset_dir="/d", output_dir="/o", eval_dataset="val")
    assert args == {**DEFAULTS, **recipe, "model_name_or_path": "/m", "dataset_dir": "/d", "dataset": "train",
                    "eval_dataset": "val", "output_dir": "/o"}
    assert "eval_dataset" not in llamafactory_args({}, model="m", dataset_dir="d", output_dir="o")
    assert recipe == {"stage": "sft", "lora_rank": 8, "logging_steps": 1, "report_to": "none"}  # not mutated


def test_llamafactory_args_refuse_keys_the_pipeline_fills_in():
    with pytest.raises(WorkflowError, match=r"llamafactory\.dataset_dir: filled in by the pipeline"):
        llamafactory_args({"dataset_dir": "/x"}, model="m", dataset_dir="d", output_dir="o")


@pytest.mark.train_env
def test_unknown_key_is_named_with_the_closest_known_one():
    from workflow.training.llamafactory_args import check_llamafactory_keys, llamafactory_arg_names

    known = llamafactory_arg_names()
    assert {"lora_rank", "cutoff_len", "learning_rate", "template", "enable_liger_kernel", "packing"} <= known
    check_llamafactory_keys({"lora_rank": 8, "bf16": True}, "r.yaml: train.llamafactory")
    with pytest.raises(WorkflowError) as err:
        check_llamafactory_keys({"lora_rank": 8, "learning_rat": 1e-4}, "r.yaml: train.llamafactory")
    assert str(err.value) == ("r.yaml: train.llamafactory.learning_rat: not a LLaMA-Factory argument "
                              "(did you mean 'learning_rate'?)")


@pytest.mark.heavy
@pytest.mark.train_env
def test_two_nodes_strict_spread_with_checkpoints_on_s3(tiny_model, viggo_alpaca, s3_bucket):
    """Workers on two Ray nodes read the model and data from the bucket and write checkpoints there."""
    import ray
    from ray.cluster_utils import Cluster

    from workflow.core import storage
    from workflow.training.ray_train import latest_checkpoint_step, run_training

    storage.upload_dir(tiny_model, f"{s3_bucket}/model", last=["config.json"])
    storage.upload_dir(viggo_alpaca, f"{s3_bucket}/ingest")
    args = llamafactory_args(
        {"stage": "sft", "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "template": "qwen",
         "cutoff_len": 512, "max_samples": 16, "per_device_train_batch_size": 4, "max_steps": 4, "save_steps": 2,
         "logging_steps": 1, "use_cpu": True, "ddp_backend": "gloo", "preprocessing_num_workers": 1},
        model=f"{s3_bucket}/model", dataset_dir=f"{s3_bucket}/ingest", output_dir="unused")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        summary = run_training(
            args, experiment="two-nodes", checkpoints_uri=f"{s3_bucket}/checkpoints",
            export_uri=f"{s3_bucket}/adapters/viggo", export_last=["adapter_config.json"],
            model_key="m1", data_key="d1",
            scaling_config={"num_workers": 2, "resources_per_worker": {"CPU": 1}, "placement_strategy": "STRICT_SPREAD"},
            failure_config={"max_failures": 0}, checkpoint_config={"num_to_keep": 1},
            tensorboard_uri=f"{s3_bucket}/tensorboard")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary["nodes"] == 2 and summary["workers"] == 2 and summary["global_step"] == 4
    assert latest_checkpoint_step(f"{s3_bucket}/checkpoints", "two-nodes") == 4
    ckpt = storage.list_files(f"{s3_bucket}/checkpoints/two-nodes/checkpoint-000004")
    assert {"adapter_model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"} <= set(ckpt)
    adapter = storage.list_files(f"{s3_bucket}/adapters/viggo")
    assert {"adapter_config.json", "adapter_model.safetensors", "training_loss.png", "tokenizer.json"} <= set(adapter)
    assert not any(f.startswith("checkpoint-") for f in adapter)
    assert any("events.out.tfevents" in f for f in storage.list_files(f"{s3_bucket}/tensorboard"))


@pytest.mark.heavy
@pytest.mark.train_env
def test_workers_without_room_on_the_cluster_fail_in_one_line_after_the_configured_tries(s3_bucket, monkeypatch):
    """As after a lost node with none to replace it: 2 one-CPU workers on a cluster of one CPU. Ray Train
    waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S per try; controller_failure_limit 1 gives up after 2 tries."""
    import time

    import ray
    from ray.cluster_utils import Cluster

    from workflow.training.ray_train import run_training

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray.init(address=cluster.address)
        started = time.monotonic()
        with pytest.raises(WorkflowError) as err:
            run_training({"stage": "sft"}, experiment="no-room", checkpoints_uri=f"{s3_bucket}/checkpoints",
                         export_uri=f"{s3_bucket}/adapters/x", export_last=[], model_key="m", data_key="d",
                         scaling_config={"num_workers": 2, "resources_per_worker": {"CPU": 1}},
                         failure_config={"max_failures": 1, "controller_failure_limit": 1},
                         checkpoint_config={"num_to_keep": 1})
        took = time.monotonic() - started
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert str(err.value) == (
        "training failed: the cluster had no room for 2 worker(s) ({'CPU': 1} each) in 2 tries of 3 s (add nodes "
        "(a lost node must be replaced), lower train.scaling_config, or wait longer: "
        "train.failure_config.controller_failure_limit (-1 waits for ever) and RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)")
    assert 6 <= took < 120, took


def test_checkpoint_storage_away_is_one_line_naming_the_uri():
    from workflow.training.ray_train import _storage_failure

    # The last line of the WorkerGroupError that bench/faults.py's train-storage-outage-long got (2026-11-27).
    cause = ("WorkerGroupError: OSError: When getting information for key 'runs/o/train/checkpoints/o-a9/checkpoint-000004'"
             " in bucket 'outage-51395': AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could "
             "not connect to server; Details: Failed to connect to 127.0.0.1:51395 after 0 ms: Could not connect to server")
    assert str(_storage_failure(cause)) == (
        "training failed: s3://outage-51395/runs/o/train/checkpoints/o-a9/checkpoint-000004: HeadObject failed "
        "(AWS Error NETWORK_CONNECTION) (check that the storage endpoint is up; a rerun resumes from the last "
        "checkpoint in storage, and train.failure_config.max_failures restarts ride out shorter outages)")
    assert _storage_failure("ValueError: lora_rank must be positive") is None


def test_pretrain_corpus_is_plain_text_documents_not_the_task():
    from workflow.training.pretrain_corpus import pretrain_corpus

    rows = [{"instruction": "Given a target sentence ...", "input": "Halo is a shooter.", "output": "inform(name[Halo])"},
            {"instruction": "Given a target sentence ...", "input": "Halo is a shooter.", "output": "verify(name[Halo])"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}]
    docs = pretrain_corpus(rows, ["input", "output"], order="documents", seed=0)
    assert sorted(docs) == ["Halo is a shooter.", "inform(name[Halo])", "verify(name[Halo])"]  # deduplicated
    assert pretrain_corpus(rows, ["messages"], order="documents", seed=0) == ["hi"]
    assert not any("Given a target" in d for d in docs)


def test_pretrain_corpus_in_row_order_keeps_each_sentence_before_its_mr():
    from workflow.training.pretrain_corpus import pretrain_corpus

    rows = [{"input": f"sentence {i}", "output": f"inform(name[g{i}])"} for i in range(50)]
    docs = pretrain_corpus(rows, ["input", "output"], order="rows", seed=3)
    assert len(docs) == 100 and [d[-1] for d in docs[0::2]] == [d[-3] for d in docs[1::2]]
    assert docs[0::2] != [r["input"] for r in rows]  # rows are shuffled as units


@pytest.mark.train_env
def test_loss_plot_is_titled_with_the_published_folders_name(tmp_path):
    """LLaMA-Factory titles its plot with the temporary folder it trained into; the published one names the adapter."""
    import json

    from PIL import Image

    from workflow.training.ray_train import LOSS_PLOT, title_loss_plot

    logs = [{"step": s, "loss": 3.0 / s} for s in range(1, 7)] + [{"step": 6, "train_loss": 1.2}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": logs}))
    title_loss_plot(tmp_path, "viggo-cpu")
    with Image.open(tmp_path / LOSS_PLOT) as image:
        assert image.format == "PNG" and image.text["Title"] == "training loss of viggo-cpu"


def test_the_trained_adapters_loss_plot_names_the_adapter(trained_run):
    from PIL import Image

    with Image.open(trained_run["adapter"] / "training_loss.png") as image:
        assert image.text["Title"] == "training loss of trained"
