"""The batch-of-tasks type that datamodules produce and meta-learners consume.

Algorithms never slice raw tensors into support/query sets: a datamodule hands them a
:class:`TaskBatch` and they iterate over :class:`Task` views of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor


@dataclass
class EpisodeSpec:
    """Shape of one episode: ``ways`` classes (1 for regression), ``shots`` support and
    ``queries`` query examples per class."""

    ways: int
    shots: int
    queries: int

    @property
    def support_size(self) -> int:
        return self.ways * self.shots

    @property
    def query_size(self) -> int:
        return self.ways * self.queries


@dataclass
class Task:
    """One task: a support set to adapt on and a query set to evaluate on."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    spec: EpisodeSpec


# Mutable on purpose: Lightning's device transfer rebuilds dataclasses field by field.
@dataclass
class TaskBatch:
    """A meta-batch of ``T`` tasks with the same episode spec.

    ``support_x [T, N*K, ...]``, ``support_y [T, N*K]``, ``query_x [T, N*Q, ...]``,
    ``query_y [T, N*Q]``. ``task_ids [T]`` are the global task indices (for logging and
    for checking that DDP ranks draw disjoint tasks).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    spec: EpisodeSpec
    task_ids: Tensor

    def __post_init__(self) -> None:
        t = self.support_x.shape[0]
        for name in ("support_y", "query_x", "query_y", "task_ids"):
            if getattr(self, name).shape[0] != t:
                raise ValueError(
                    f"TaskBatch.{name} has {getattr(self, name).shape[0]} tasks, support_x has {t}"
                )

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def task(self, i: int) -> Task:
        return Task(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i], self.spec)

    def tasks(self) -> Iterator[Task]:
        return (self.task(i) for i in range(len(self)))

    def pin_memory(self) -> "TaskBatch":
        """Called by ``DataLoader(pin_memory=True)``."""
        return TaskBatch(
            self.support_x.pin_memory(),
            self.support_y.pin_memory(),
            self.query_x.pin_memory(),
            self.query_y.pin_memory(),
            self.spec,
            self.task_ids.pin_memory(),
        )

    @staticmethod
    def stack(tasks: list[Task], task_ids: Tensor) -> "TaskBatch":
        """Stack single tasks (same spec) into a batch."""
        spec = tasks[0].spec
        return TaskBatch(
            torch.stack([t.support_x for t in tasks]),
            torch.stack([t.support_y for t in tasks]),
            torch.stack([t.query_x for t in tasks]),
            torch.stack([t.query_y for t in tasks]),
            spec,
            task_ids,
        )
