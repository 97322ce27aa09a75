"""Synthetic few-shot image classification: no download, for smoke tests and the conformance harness.

Every class of a split is a fixed random template image; an example is its template plus
Gaussian noise. Templates and episodes are pure functions of ``(seed, split, index)``, so the
task sets behave exactly like a real benchmark's (disjoint class splits, fixed eval tasks).
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.data import Dataset

from lightmeta.datamodule import DataConfig, EpisodicDataModule, SplitName, TaskSampler
from lightmeta.episodes import EpisodeSpec, TaskBatch
from lightmeta.registry import register_datamodule
from lightmeta.seeding import generator_for
from lightmeta.task_info import TaskInfo


class SyntheticConfig(DataConfig):
    ways: int = Field(default=5, ge=2)
    shots: int = Field(default=1, ge=1)
    queries: int = Field(default=5, ge=1)
    classes: dict[str, int] = Field(default={"train": 32, "val": 8, "test": 8},
                                    description="number of classes per split")
    image_shape: tuple[int, int, int] = Field(default=(1, 16, 16), description="C, H, W")
    noise: float = Field(default=0.5, ge=0, description="std of the noise added to the class template")
    data_seed: int = Field(default=1234, ge=0, description="seed of the class templates")

    @model_validator(mode="after")
    def _enough_classes(self) -> "SyntheticConfig":
        if set(self.classes) != {"train", "val", "test"}:
            raise ValueError(f"classes must have exactly the keys train, val, test; got {sorted(self.classes)}")
        for split, n in self.classes.items():
            if n < self.ways:
                raise ValueError(f"classes.{split}={n} is fewer than ways={self.ways}; add classes or lower ways")
        return self


class SyntheticTasks(TaskSampler):
    """Episodes over template classes; class ``c`` of split ``s`` has template seed ``(data_seed, s, c)``."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.spec = EpisodeSpec(config.ways, config.shots, config.queries)
        self.templates = {
            split: torch.stack([torch.randn(*config.image_shape, generator=generator_for(config.data_seed, f"class-{split}", c))
                                for c in range(n)])
            for split, n in config.classes.items()
        }

    def sample(self, split: SplitName, task_ids: list[int], seed: int) -> TaskBatch:
        c, spec = self.config, self.spec
        per_class = spec.shots + spec.queries
        xs, ys = [], []
        for i in task_ids:
            g = generator_for(seed, split, i)
            classes = torch.randperm(len(self.templates[split]), generator=g)[: spec.ways]
            images = self.templates[split][classes].unsqueeze(1) + c.noise * torch.randn(
                spec.ways, per_class, *c.image_shape, generator=g)
            xs.append(images)
            ys.append(torch.arange(spec.ways).unsqueeze(1).expand(-1, per_class))
        x, y = torch.stack(xs), torch.stack(ys)  # [T, N, K+Q, ...], labels = position of the drawn class
        k = spec.shots
        return TaskBatch(
            x[:, :, :k].flatten(1, 2), y[:, :, :k].flatten(1), x[:, :, k:].flatten(1, 2), y[:, :, k:].flatten(1),
            spec, torch.tensor(task_ids),
        )


class SyntheticFlat(Dataset):
    """The meta-training classes as a flat labelled dataset (for non-episodic pre-training):
    ``examples_per_class`` noisy copies of each template, example ``i`` drawn from
    ``generator_for(data_seed, "flat-train", i)``, label ``i // examples_per_class``."""

    def __init__(self, templates: Tensor, noise: float, data_seed: int, examples_per_class: int) -> None:
        self.templates, self.noise, self.data_seed, self.per_class = templates, noise, data_seed, examples_per_class

    @property
    def num_classes(self) -> int:
        return len(self.templates)

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        label = i // self.per_class
        noise = torch.randn(*self.templates.shape[1:], generator=generator_for(self.data_seed, "flat-train", i))
        return self.templates[label] + self.noise * noise, torch.tensor(label)


@register_datamodule("synthetic")
class SyntheticDataModule(EpisodicDataModule):
    """Template-plus-noise image classes: N-way K-shot episodes with no data on disk."""

    Config = SyntheticConfig
    config: SyntheticConfig

    def task_info(self) -> TaskInfo:
        c = self.config
        return TaskInfo(problem="classification", in_shape=c.image_shape, train_ways=c.ways, eval_ways=c.ways)

    def build_sampler(self) -> SyntheticTasks:
        return SyntheticTasks(self.config)

    def flat_train_dataset(self) -> SyntheticFlat:
        """The training classes' templates plus noise, ``shots + queries`` examples per class."""
        c = self.config
        templates = self.sampler.templates["train"]  # type: ignore[attr-defined]
        return SyntheticFlat(templates, c.noise, c.data_seed, c.shots + c.queries)
