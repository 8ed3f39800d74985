"""`train:` — LoRA SFT with LLaMA-Factory inside Ray Train.

``llamafactory`` holds LLaMA-Factory's own YAML keys verbatim (checked against its argument
dataclasses in the train environment before any worker starts); ``scaling_config``,
``failure_config`` and ``checkpoint_config`` hold fields of Ray Train's ``ScalingConfig``,
``FailureConfig`` and ``CheckpointConfig``. The pipeline fills in ``model_name_or_path``
(model stage), ``dataset``/``eval_dataset``/``dataset_dir`` (ingest stage) and ``output_dir``.

The adapter is published at ``<storage>/<run>/train/adapters/<adapter_name>/``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from .base import Section

FILLED_IN = ("model_name_or_path", "model_revision", "dataset", "eval_dataset", "dataset_dir", "output_dir")
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ScalingSection(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    accelerator_type: str | None = None


class FailureSection(Section):
    # Whole-group restarts after a worker fails (a lost node included); each resumes from the latest checkpoint.
    max_failures: int = Field(0, ge=-1)
    # How often starting the worker group may time out for want of resources (each try waits
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default) before the run fails: -1, Ray's default,
    # waits for ever (for a node an autoscaler adds); N gives up after about N+1 tries.
    controller_failure_limit: int = Field(-1, ge=-1)


class CheckpointSection(Section):
    # How many checkpoints Ray Train keeps in storage (None: all).
    num_to_keep: int | None = Field(2, ge=1)


class TrainConfig(Section):
    # Names the adapter folder and the served LoRA model ("<model_id>:<adapter_name>");
    # the recipe's name when unset.
    adapter_name: str | None = None
    scaling_config: ScalingSection = Field(default_factory=ScalingSection)
    failure_config: FailureSection = Field(default_factory=FailureSection)
    checkpoint_config: CheckpointSection = Field(default_factory=CheckpointSection)
    llamafactory: dict[str, Any]

    @field_validator("adapter_name")
    @classmethod
    def _adapter_name_is_a_path_segment(cls, v: str | None) -> str | None:
        if v is not None and (not _ADAPTER_NAME.match(v) or ":" in v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names a folder and a served model)")
        return v

    @field_validator("llamafactory")
    @classmethod
    def _no_filled_in_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(v) & set(FILLED_IN))
        if taken:
            raise ValueError(f"{taken[0]}: filled in by the pipeline from the upstream stages; remove it")
        stage = v.get("stage", "sft")
        if stage != "sft" or v.get("finetuning_type", "lora") != "lora":
            raise ValueError("the train stage does LoRA SFT: set stage: sft and finetuning_type: lora "
                             f"(got stage {stage!r}, finetuning_type {v.get('finetuning_type')!r})")
        return v
