"""Base class for every plug-in's hyperparameters."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PluginConfig(BaseModel):
    """Hyperparameters of one algorithm, datamodule or backbone.

    Subclasses declare typed fields with defaults and constraints; unknown keys are rejected
    so that a typo fails at parse time instead of being silently ignored.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
