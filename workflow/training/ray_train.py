"""LLaMA-Factory inside Ray Train: the code the model stage (pre-training) and the train stage share.

``run_training`` runs ``llamafactory.train.tuner.run_exp`` as the ``train_loop_per_worker``
of a ``ray.train.torch.TorchTrainer``. Every Hugging Face checkpoint is reported to Ray Train,
which merges the workers' files into ``<storage_path>/<name>/checkpoint-<step>/`` in the
run's storage; a rerun with the same name (or a worker retry) resumes from the latest one.
Rank 0 publishes the final model folder (adapter or full weights) with its marker file last.

Only the standard library is imported at module level; torch, ray and llamafactory are
imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ..core import ray_cluster, storage
from ..core.console import say
from ..core.errors import WorkflowError
from ..core.secrets import is_secret_name
from ..patches import ray_train_controller_state
from ..patches.labelled_logits import labelled_logits_callback
from ..patches.packed_attention import packed_attention_callback
from ..patches.peft_lora_fast_path import lora_fast_path_callback

# Files of a finished run that are not part of the published model folder.
NOT_PUBLISHED = re.compile(r"^(checkpoint-\d+|runs|tensorboard)(/|$)")

LOSS_PLOT = "training_loss.png"  # LLaMA-Factory's plot_loss

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")

RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of reported checkpoints


def _checkpoint_step(path: str) -> int:
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    return int(state["global_step"])


def _make_callbacks(rank: int, tensorboard_dir: Path, tensorboard_uri: str | None, args: dict):
    """Hugging Face callbacks: report checkpoints to Ray Train; print progress on rank 0."""
    import ray.train
    from transformers import TrainerCallback

    class ReportCheckpointToRay(TrainerCallback):
        """After each save, hand this worker's part of ``checkpoint-<step>`` to Ray Train.

        Every worker reports (``ray.train.report`` is a barrier); Ray merges the parts
        (rank 0's weights and optimizer, every rank's RNG state) into one checkpoint folder
        in the run's storage, named after the step so that reruns can say where they resumed.
        """

        def on_save(self, args, state, control, **kwargs):
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            checkpoint = ray.train.Checkpoint.from_directory(str(local)) if local.is_dir() else None
            metrics = {"step": state.global_step, "epoch": state.epoch}
            losses = [log["loss"] for log in state.log_history if "loss" in log]
            if losses:
                metrics["loss"] = losses[-1]
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{state.global_step:06d}")
            if rank == 0:
                say(f"[training] checkpoint at step {state.global_step} is in storage")
            if rank == 0 and tensorboard_uri and tensorboard_dir.is_dir():
                storage.upload_dir(tensorboard_dir, tensorboard_uri)

    class PrintProgress(TrainerCallback):
        """One line per log on rank 0: step, loss, learning rate, epoch, time spent and left."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first_step = time.monotonic(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if rank != 0 or not logs or "loss" not in logs:
                return
            done = state.global_step - self.first_step
            elapsed = time.monotonic() - self.started
            left = elapsed / done * (state.max_steps - state.global_step) if done else 0.0
            say(f"[training] step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                f"lr {logs.get('learning_rate', 0):.2e} epoch {logs.get('epoch', 0):.2f} "
                f"elapsed {elapsed:.1f}s left ~{left:.0f}s")

    return [ReportCheckpointToRay(), PrintProgress(), lora_fast_path_callback(), packed_attention_callback(),
            labelled_logits_callback(args)]


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train's worker function: run LLaMA-Factory, resume from Ray's checkpoint, publish the result."""
    import ray.train
    from llamafactory.train.tuner import run_exp

    from ..prompts.guard import write_record

    rank = ray.train.get_context().get_world_rank()
    work = Path(tempfile.mkdtemp(prefix=f"workflow-train-rank{rank}-"))
    try:
        os.environ.update(config["secret_env"])  # kept out of the runtime_env: see run_training
        args = dict(config["args"])
        args["output_dir"] = str(work / "output")
        if not storage.is_local(args["model_name_or_path"]):  # s3:// or gs://; a hub id or a path stays
            args["model_name_or_path"] = storage.node_local_copy(args["model_name_or_path"], config["model_key"])
        args["dataset_dir"] = storage.node_local_copy(args["dataset_dir"], config["data_key"])
        tensorboard_dir = work / "tensorboard"
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir)

        resumed_from = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            local = checkpoint.to_directory(str(work / "resume"))
            resumed_from = _checkpoint_step(local)
            args["resume_from_checkpoint"] = local
            say(f"[training] rank {rank}: resuming from step {resumed_from} ({checkpoint.path})")

        nodes = _count_nodes()
        run_exp(args=args, callbacks=_make_callbacks(rank, tensorboard_dir, config.get("tensorboard_uri"), args))

        if rank != 0:
            return None
        output = Path(args["output_dir"])
        publish = work / "publish"
        for f in output.rglob("*"):
            rel = f.relative_to(output).as_posix()
            if f.is_file() and not NOT_PUBLISHED.match(rel):
                (publish / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, publish / rel)
        if (publish / LOSS_PLOT).is_file():
            title_loss_plot(publish, config["export_uri"].rstrip("/").rsplit("/", 1)[-1])
        if args.get("stage", "sft") == "sft" and args.get("finetuning_type", "lora") == "lora" and args.get("template"):
            # Evaluate and serve compare their rendering of this sample with training's.
            write_record(output, args["dataset_dir"], args["dataset"], args["template"], publish)
        from ..core.sync import publish_dir

        publish_dir(publish, config["export_uri"], last=config["export_last"])
        if config.get("tensorboard_uri") and tensorboard_dir.is_dir():
            storage.upload_dir(tensorboard_dir, config["tensorboard_uri"])
        return {**_summary(output, resumed_from), "workers": ray.train.get_context().get_world_size(), "nodes": nodes}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def title_loss_plot(folder: Path, name: str) -> None:
    """Draw ``folder``'s loss plot again, titled with ``name`` (the adapter's, the published folder's).

    LLaMA-Factory's ``plot_loss`` titles it with the folder it trained into, here a temporary one
    (``training loss of /tmp/workflow-train-rank0-.../output``). Drawn as it draws it (its smoothing),
    from the same ``trainer_state.json``; the title is also the PNG's ``Title`` text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from llamafactory.extras.ploting import smooth

    state = json.loads((folder / "trainer_state.json").read_text())
    points = [(log["step"], log["loss"]) for log in state.get("log_history", []) if "loss" in log]
    if not points:
        return
    steps, losses = (list(values) for values in zip(*points, strict=True))
    title = f"training loss of {name}"
    fig = plt.figure()
    plt.plot(steps, losses, color="#1f77b4", alpha=0.4, label="original")
    plt.plot(steps, smooth(losses), color="#1f77b4", label="smoothed")
    plt.title(title)
    plt.xlabel("step")
    plt.ylabel("loss")
    plt.legend()
    fig.savefig(folder / LOSS_PLOT, format="png", dpi=100, metadata={"Title": title})
    plt.close(fig)


def _count_nodes() -> int:
    """How many Ray nodes the worker group spans (gathered over the group's process group)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized():
        return 1
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def _summary(output: Path, resumed_from: int) -> dict:
    results = json.loads((output / "all_results.json").read_text()) if (output / "all_results.json").exists() else {}
    state = json.loads((output / "trainer_state.json").read_text()) if (output / "trainer_state.json").exists() else {}
    losses = [log["loss"] for log in state.get("log_history", []) if "loss" in log]
    return {
        "global_step": state.get("global_step"),
        "resumed_from_step": resumed_from,
        "epochs": results.get("epoch"),
        "train_loss": results.get("train_loss"),
        "final_loss": losses[-1] if losses else None,
        "train_runtime_s": results.get("train_runtime"),
        "train_samples_per_second": results.get("train_samples_per_second"),
        "eval_loss": results.get("eval_loss"),
    }


# ---------------------------------------------------------------- the driver

# Environment variables the workers need (storage endpoints and credentials, hub access).
WORKER_ENV_PREFIXES = ("AWS_", "GOOGLE_", "HF_", "HUGGING_FACE_", "WORKFLOW_", "LLAMAFACTORY_", "RAY_TRAIN_",
                       "DISABLE_VERSION_CHECK", "PYTORCH_CUDA_ALLOC_CONF")

WORKER_ENV_DEFAULTS = {
    "DISABLE_VERSION_CHECK": "1",  # the train lock file pins LLaMA-Factory's requirements
    # Unpadded packs (workflow/patches/packed_attention.py) change shape every step: with fixed-size
    # segments the caching allocator reserved 78 GiB of an H100 for 48 GiB in use; 48 with these.
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "LLAMAFACTORY_VERBOSITY": "WARN",  # keeps transformers' INFO dumps out of the log; progress still prints
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # Ray Train V2's print patch shows every printed line twice
}


def use_the_node_interface_for_gloo() -> None:
    """On a cluster (part of every train worker process's setup hook): gloo's own address on the
    interface that carries this node's Ray IP, unless ``GLOO_SOCKET_IFNAME`` is set.

    Left alone, gloo takes the address the host name resolves to, which is 127.0.0.1 wherever
    ``/etc/hosts`` maps the host name to loopback (many containers and VMs): every worker then
    advertises loopback, and DDP across nodes fails with "Gloo connectFullMesh failed ... Connection
    refused, remote=[127.0.0.1]". The interface differs per node, so it is found on the node.
    """
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    import psutil
    import ray

    ip = ray.util.get_node_ip_address()
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def setup_worker() -> None:
    """The setup hook of every worker process of the train stage's Ray job (Ray Train's controller and
    its placement-group cleaner included): the cleaner reads the controller's state without a dashboard."""
    ray_train_controller_state.apply()


def setup_worker_on_a_cluster() -> None:
    setup_worker()
    use_the_node_interface_for_gloo()


def run_training(args: dict, *, experiment: str, checkpoints_uri: str, export_uri: str, export_last: list[str],
                 model_key: str, data_key: str, scaling_config: dict, failure_config: dict,
                 checkpoint_config: dict, tensorboard_uri: str | None = None, fresh: bool = False) -> dict:
    """Train with LLaMA-Factory in Ray Train; return rank 0's summary.

    Checkpoints go to ``<checkpoints_uri>/<experiment>/``; a rerun with the same experiment
    name resumes from the latest of them (``fresh=True`` deletes them first). ``model_key``
    and ``data_key`` identify the model's and the dataset's content for the node-local
    download cache. Uses the Ray cluster at ``RAY_ADDRESS`` or one already initialized,
    else starts a private local one (and shuts it down at the end).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if fresh:
        storage.remove(storage.join(checkpoints_uri, experiment))
    started_ray = ray_cluster.init_ray(log_to_driver=True, storage_uri=checkpoints_uri, needs=("llamafactory",),
                                       setup_hook=f"{__name__}.setup_worker_on_a_cluster",
                                       local_setup_hook=f"{__name__}.setup_worker")
    worker_env = {**WORKER_ENV_DEFAULTS,
                  **{k: v for k, v in os.environ.items() if k.startswith(WORKER_ENV_PREFIXES)}}
    # Tokens and keys travel in the loop's config, not the runtime_env: Ray's runtime_env
    # agent logs every runtime_env it creates, env_vars included, in the session's logs.
    secret_env = {k: v for k, v in worker_env.items() if is_secret_name(k)}
    env_vars = {k: v for k, v in worker_env.items() if k not in secret_env}
    ddp_backend = args.get("ddp_backend")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args, "model_key": model_key, "data_key": data_key, "export_uri": export_uri,
                           "export_last": export_last, "tensorboard_uri": tensorboard_uri, "secret_env": secret_env},
        torch_config=TorchConfig(backend=ddp_backend) if ddp_backend else None,
        scaling_config=ScalingConfig(**scaling_config),
        run_config=RunConfig(
            name=experiment,
            storage_path=checkpoints_uri,
            failure_config=FailureConfig(**failure_config),
            checkpoint_config=CheckpointConfig(**checkpoint_config),
            worker_runtime_env={"env_vars": env_vars},
        ),
    )
    say(f"[training] {scaling_config.get('num_workers', 1)} worker(s); checkpoints in "
        f"{storage.join(checkpoints_uri, experiment)}")
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray wraps the worker's error; report its last line
        if type(getattr(err, "controller_failure", None)).__name__ == "WorkerGroupStartupTimeoutError":
            raise _no_room_for_workers(scaling_config, failure_config) from err
        raise (_storage_failure(_root_cause(err))
               or WorkflowError(f"training failed: {_root_cause(err)}", hint="the workers' log above has the details")) from err
    finally:
        if started_ray:
            ray.shutdown()
    return dict(result.return_value or {})


def _no_room_for_workers(scaling_config: dict, failure_config: dict) -> WorkflowError:
    """Ray Train gave up starting the worker group: the cluster lacks the workers' resources (a node lost and
    none to replace it, or a request no node can meet)."""
    wait = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    return WorkflowError(
        f"training failed: the cluster had no room for {scaling_config.get('num_workers', 1)} worker(s) "
        f"({scaling_config.get('resources_per_worker') or 'default resources'} each) in "
        f"{failure_config.get('controller_failure_limit', -1) + 1} tries of {wait} s",
        hint="add nodes (a lost node must be replaced), lower train.scaling_config, or wait longer: "
             "train.failure_config.controller_failure_limit (-1 waits for ever) and RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")


# How pyarrow's S3 client, which Ray Train stores checkpoints with, words a failed request.
_PYARROW_S3_ERROR = re.compile(r"key '(?P<key>[^']+)' in bucket '(?P<bucket>[^']+)': "
                               r"AWS Error (?P<code>\w+) during (?P<operation>\w+) operation")


def _storage_failure(cause: str) -> WorkflowError | None:
    """Ray Train's checkpoint storage failing (the object store away past Ray's ~3 s of upload retries), as one
    line naming the object's URI; None for any other cause."""
    match = _PYARROW_S3_ERROR.search(cause)
    if not match:
        return None
    return WorkflowError(
        f"training failed: s3://{match['bucket']}/{match['key']}: {match['operation']} failed "
        f"(AWS Error {match['code']})",
        hint="check that the storage endpoint is up; a rerun resumes from the last checkpoint in storage, and "
             "train.failure_config.max_failures restarts ride out shorter outages")


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:500]


def latest_checkpoint_step(checkpoints_uri: str, experiment: str) -> int | None:
    """The step of the checkpoint a rerun of ``experiment`` resumes from, if any.

    That is the latest checkpoint in Ray Train's snapshot, not the newest folder: a run
    stopped between a worker's upload and the controller's record of it leaves a folder
    that Ray does not resume from (it may be incomplete).
    """
    snapshot = storage.join(checkpoints_uri, experiment, RAY_CHECKPOINT_SNAPSHOT)
    if not storage.exists(snapshot):
        return None
    latest = storage.read_json(snapshot).get("latest_checkpoint_result")
    match = CHECKPOINT_DIR.match(latest["checkpoint_dir_name"]) if latest else None
    return int(match.group(1)) if match else None
