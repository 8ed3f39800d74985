"""`ingest:` — where the dataset comes from and how its columns map to LLaMA-Factory's formats."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from .base import Section

ALPACA_FIELDS = ("instruction", "input", "output", "system")
SHAREGPT_FIELDS = ("messages", "system")


class IngestConfig(Section):
    """Read a dataset, validate it, write train/val/test JSONL and ``dataset_info.json``.

    ``source`` is a local file or folder, or an ``http(s)://``, ``s3://`` or ``gs://`` URL.
    With ``splits`` each split is read from its own file, relative to ``source``; without
    it ``source`` is one file, cut into splits by ``split_ratios`` after the seeded shuffle.
    """

    source: str
    splits: dict[str, str] | None = None
    split_ratios: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
    file_format: Literal["auto", "jsonl", "json", "csv", "parquet"] = "auto"
    format: Literal["alpaca", "sharegpt"] = "alpaca"
    # Target field -> source column. Alpaca targets: instruction, input, output, system.
    # ShareGPT targets: messages (a list of {role, content}), system; or the Alpaca
    # targets, which are then turned into a user/assistant exchange.
    columns: dict[str, str] = {}
    instruction: str | None = None
    system: str | None = None
    on_invalid: Literal["drop", "fail"] = "drop"
    max_samples: int | dict[str, int] | None = None
    shuffle: bool = False
    seed: int = 42

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        allowed = set(ALPACA_FIELDS) | ({"messages"} if self.format == "sharegpt" else set())
        unknown = set(self.columns) - allowed
        if unknown:
            raise ValueError(f"columns: unknown target field(s) {sorted(unknown)}; expected some of {sorted(allowed)}")
        if self.splits is not None and not self.splits:
            raise ValueError("splits: give at least one split, e.g. {train: train.jsonl}")
        if self.splits is None:
            total = sum(self.split_ratios.values())
            if any(r < 0 for r in self.split_ratios.values()) or abs(total - 1.0) > 1e-6:
                raise ValueError(f"split_ratios: must be non-negative and sum to 1 (they sum to {total:g})")
        return self

    def split_names(self) -> list[str]:
        return list(self.splits or self.split_ratios)
