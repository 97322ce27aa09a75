"""What a learner must know about the task distribution: the link between data and algorithm.

The datamodule states it once (ways feed both the sampler and the classifier head); the run
builder passes it to the algorithm, and it is saved in checkpoints with the hyperparameters.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TaskInfo(BaseModel):
    """Problem type, input shape and the number of ways in training and evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    problem: Literal["classification", "regression"]
    in_shape: tuple[int, ...] = Field(description="shape of one example, e.g. (1, 28, 28)")
    train_ways: int = Field(ge=1, description="ways of training episodes (1 for regression)")
    eval_ways: int = Field(ge=1, description="ways of validation/test episodes")
    out_dim: int = Field(default=1, ge=1, description="target dimension for regression")
    train_classes: int | None = Field(
        default=None, ge=1,
        description="number of meta-training classes; set by the run builder for learners that pre-train "
        "on the flat labelled view (training_data = 'flat', e.g. Baseline)",
    )

    @property
    def head_features(self) -> int:
        """Output width of a linear head: ways for classification, out_dim for regression."""
        return self.train_ways if self.problem == "classification" else self.out_dim
