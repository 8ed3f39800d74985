"""`train:` — LoRA SFT with LLaMA-Factory inside Ray Train.

``llamafactory`` holds LLaMA-Factory's own YAML keys verbatim; ``scaling_config`` and
``failure_config`` hold the fields of Ray Train's ``ScalingConfig`` / ``FailureConfig``.
The runner fills in dataset, dataset_dir and output_dir from the ingest stage.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import Section


class ScalingSection(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    accelerator_type: str | None = None


class FailureSection(Section):
    max_failures: int = 0


class TrainConfig(Section):
    scaling_config: ScalingSection = Field(default_factory=ScalingSection)
    failure_config: FailureSection = Field(default_factory=FailureSection)
    llamafactory: dict[str, Any]
