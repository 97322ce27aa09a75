"""Few-shot sinusoid regression, Finn et al. (2017) §5.1.

Each task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]``, phase ``~ U[0, pi]`` and
inputs ``x ~ U[-5, 5]``; K support and K query points. Generated on the fly, no download.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from lightmeta.datamodule import DataConfig, EpisodicDataModule, SplitName, TaskSampler
from lightmeta.episodes import EpisodeSpec, TaskBatch
from lightmeta.registry import register_datamodule
from lightmeta.seeding import generator_for
from lightmeta.task_info import TaskInfo


class SinusoidConfig(DataConfig):
    shots: int = Field(default=10, ge=1, description="K support points per task")
    queries: int = Field(default=10, ge=1, description="query points per task")
    amplitude: tuple[float, float] = Field(default=(0.1, 5.0), description="amplitude range [low, high]")
    phase: tuple[float, float] = Field(default=(0.0, math.pi), description="phase range [low, high]")
    x_range: tuple[float, float] = Field(default=(-5.0, 5.0), description="input range [low, high]")
    meta_batch_size: int = Field(default=25, ge=1, description="tasks per meta-training step")

    @model_validator(mode="after")
    def _ranges_ordered(self) -> "SinusoidConfig":
        for name in ("amplitude", "phase", "x_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be [low, high] with low <= high, got [{lo}, {hi}]")
        return self


def _uniform(g: torch.Generator, bounds: tuple[float, float], *shape: int) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


class SinusoidTasks(TaskSampler):
    """Draws sinusoid tasks; task ``i`` is a pure function of ``(seed, split, i)``."""

    def __init__(self, config: SinusoidConfig) -> None:
        self.config = config
        self.spec = EpisodeSpec(ways=1, shots=config.shots, queries=config.queries)

    def sample(self, split: SplitName, task_ids: list[int], seed: int) -> TaskBatch:
        c = self.config
        n = c.shots + c.queries
        xs, ys = [], []
        for i in task_ids:
            g = generator_for(seed, split, i)
            amp, phase = _uniform(g, c.amplitude, 1), _uniform(g, c.phase, 1)
            x = _uniform(g, c.x_range, n, 1)
            xs.append(x)
            ys.append(amp * torch.sin(x - phase))
        x, y = torch.stack(xs), torch.stack(ys)
        k = c.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:], self.spec, torch.tensor(task_ids))


@register_datamodule("sinusoid")
class SinusoidDataModule(EpisodicDataModule):
    """Sinusoid regression tasks, generated on the fly."""

    Config = SinusoidConfig
    config: SinusoidConfig

    def task_info(self) -> TaskInfo:
        return TaskInfo(problem="regression", in_shape=(1,), train_ways=1, eval_ways=1, out_dim=1)

    def build_sampler(self) -> SinusoidTasks:
        return SinusoidTasks(self.config)
