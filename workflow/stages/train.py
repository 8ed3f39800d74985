"""Train stage: LoRA SFT of the base model with LLaMA-Factory inside Ray Train.

Reads the ingest stage's ``dataset_info.json`` + splits (``dataset: train``, and
``eval_dataset: val`` when the recipe turns evaluation on) and the model stage's ``model``;
the recipe's ``train.llamafactory`` keys pass to LLaMA-Factory verbatim. Writes under
``<storage>/<run>/train/``:

- ``adapters/<adapter_name>/`` — the adapter (adapter_config.json, adapter_model.safetensors,
  tokenizer files, training_loss.png, trainer_state.json, all_results.json), published with
  ``adapter_config.json`` last: evaluate and serve load it from here;
- ``checkpoints/<adapter_name>-<fingerprint>/checkpoint-<step>/`` — Ray Train's checkpoints.
  A killed run, rerun with the same recipe, resumes from the latest one; ``--force`` starts
  over. A changed recipe or upstream gets a new folder, so it never resumes a foreign run;
- ``tensorboard/<started>/`` — loss and learning rate, one folder per attempt.

Manifest outputs: ``adapter`` and ``adapters_dir``; summary: ``adapter_name``, ``lora_rank``,
``base_model``, steps, samples/s, final loss, the step it resumed from.
"""

from __future__ import annotations

from datetime import datetime, timezone

from ..core import manifest
from ..core.console import say
from ..core.envs import TRAIN
from ..core.stage import StageContext, StageResult

ENV = TRAIN
ADAPTERS = "adapters"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
DEFAULT_LORA_RANK = 8  # LLaMA-Factory's default lora_rank


def adapter_name(ctx: StageContext) -> str:
    return ctx.recipe.train.adapter_name or ctx.recipe.name


def config(ctx: StageContext) -> dict:
    from ..training.llamafactory_args import check_llamafactory_keys

    # Before anything else runs: a misspelt LLaMA-Factory key fails here, naming the key.
    check_llamafactory_keys(ctx.recipe.train.llamafactory, f"{ctx.recipe.path or ctx.recipe.name}: train.llamafactory")
    return {**ctx.recipe.train.model_dump(mode="json"), "adapter_name": adapter_name(ctx)}


def inputs(ctx: StageContext) -> dict[str, str]:
    return {stage: ctx.upstream(stage)["fingerprint"] for stage in ("ingest", "model")}


def _evaluates(llamafactory: dict) -> bool:
    return bool(llamafactory.get("do_eval")) or llamafactory.get("eval_strategy", "no") != "no"


def run(ctx: StageContext) -> StageResult:
    from ..training.llamafactory_args import WORKER_OUTPUT, llamafactory_args
    from ..training.ray_train import run_training

    cfg = ctx.recipe.train
    ingest, model = ctx.upstream("ingest"), ctx.upstream("model")
    base_model = model["outputs"]["model"]
    dataset_dir = ingest["outputs"]["dataset_info"].rsplit("/", 1)[0]
    name = adapter_name(ctx)
    adapter_uri = ctx.stage_uri("train", ADAPTERS, name)
    args = llamafactory_args(cfg.llamafactory, model=base_model, dataset_dir=dataset_dir, output_dir=WORKER_OUTPUT,
                             eval_dataset="val" if "val" in ingest["outputs"] and _evaluates(cfg.llamafactory) else None,
                             model_revision=model.get("summary", {}).get("revision"))
    experiment = f"{name}-{manifest.fingerprint(ctx.stage, config(ctx), inputs(ctx))[:12]}"
    started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    summary = run_training(
        args,
        experiment=experiment,
        checkpoints_uri=ctx.stage_uri("train", CHECKPOINTS),
        export_uri=adapter_uri,
        export_last=["adapter_config.json"],
        model_key=model["fingerprint"],
        data_key=ingest["fingerprint"],
        scaling_config=cfg.scaling_config.model_dump(),
        failure_config=cfg.failure_config.model_dump(),
        checkpoint_config=cfg.checkpoint_config.model_dump(),
        tensorboard_uri=ctx.stage_uri("train", TENSORBOARD, started),
        fresh=ctx.force,
    )
    summary = {"adapter_name": name, "lora_rank": cfg.llamafactory.get("lora_rank", DEFAULT_LORA_RANK),
               "base_model": base_model, "adapter": adapter_uri, **summary}
    say(f"[train] {summary['global_step']} steps (resumed from step {summary['resumed_from_step']}), "
        f"{summary['train_samples_per_second']} samples/s, final loss {summary['final_loss']}; "
        f"adapter {adapter_uri}")
    return StageResult(outputs={"adapter": adapter_uri, "adapters_dir": ctx.stage_uri("train", ADAPTERS)},
                       summary=summary)
