"""Numerical faults: a non-finite meta-loss stops the run with a diagnosis, or skips the meta-batch.

The check costs one scalar test per meta-step; the diagnosis (which task, which loss) re-runs
the offending meta-batch task by task only after something went wrong.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightmeta.episodes import TaskBatch
from lightmeta.errors import LightmetaError

if TYPE_CHECKING:
    from lightmeta.meta_learner import MetaLearner


class NonFiniteLossError(LightmetaError):
    """The meta-loss became NaN or infinite."""


def diagnose_nonfinite(learner: "MetaLearner", batch: TaskBatch) -> str:
    """The first task whose inner or outer loss is non-finite, and which loss it was."""
    for index, task in enumerate(batch.tasks()):
        where = learner.find_nonfinite(task)
        if where is not None:
            return f"task {int(batch.task_ids[index])} (#{index} of the meta-batch): {where}"
    return "every task's losses are finite when re-run one by one, so the reduction over the meta-batch overflowed"


def nonfinite_message(learner: "MetaLearner", batch: TaskBatch, loss: torch.Tensor) -> str:
    return (f"non-finite meta-loss ({loss.item()}) at meta-step {learner.global_step}: "
            f"{diagnose_nonfinite(learner, batch)}; checkpoints written before this step are kept; lower the "
            "learning rates, clip the outer gradient (trainer.gradient_clip_val) or skip such meta-batches "
            "(trainer.on_nonfinite=skip)")
