"""Shared pieces of the typed recipe sections."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section whose own keys are checked strictly: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
