"""Base class for episodic datamodules and the datasets that feed tasks through DataLoaders.

A datamodule builds a :class:`TaskSampler` (a picklable object that turns global task ids into
a :class:`TaskBatch`); the base turns it into real ``DataLoader``s:

* training meta-batch ``b`` holds the global tasks ``b*M .. b*M+M-1`` (``M`` = meta-batch
  size); rank ``r`` of ``W`` adapts the contiguous slice ``r*M/W .. (r+1)*M/W-1``, so the ranks'
  union is exactly the single-process meta-batch and no two ranks share a task;
* task ``i`` of a split is drawn from ``generator_for(seed, split, i)`` alone, so resumed runs
  and any number of workers or ranks see the same tasks;
* validation and test tasks ``0..n-1`` use ``data.eval_seed`` (not the run seed), so every run
  and every algorithm is evaluated on the same tasks; ranks take disjoint shards.

Learners that pre-train without episodes (``training_data = "flat"``, e.g. Baseline) get
ordinary labelled mini-batches instead (:class:`FlatBatch`) from the datamodule's
``flat_train_dataset()``: global batch ``b`` holds ``flat_batch_size`` examples drawn uniformly
(with replacement) by ``generator_for(seed, "flat-train", b)``, split across ranks like a
meta-batch, and served through the same :class:`EpochSampler` (same epochs, validation
cadence and exact resume).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import lightning as L
import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightmeta.episodes import TaskBatch
from lightmeta.errors import ConfigError
from lightmeta.plugin import PluginConfig
from lightmeta.seeding import generator_for
from lightmeta.task_info import TaskInfo

SplitName = Literal["train", "val", "test"]


class DataConfig(PluginConfig):
    """Episode stream settings shared by every datamodule."""

    meta_batch_size: int = Field(default=16, ge=1, description="tasks per meta-training step (all ranks together)")
    eval_batch_size: int = Field(default=25, ge=1, description="tasks per validation/test batch")
    train_batches_per_epoch: int = Field(default=100, ge=1, description="meta-steps per epoch (validation runs after each)")
    val_tasks: int = Field(default=100, ge=1, description="fixed validation tasks")
    test_tasks: int = Field(default=600, ge=1, description="fixed test tasks")
    eval_seed: int = Field(default=0, ge=0, description="seed of the fixed validation/test task sets")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes")
    pin_memory: bool = False


class TaskSampler(ABC):
    """Draws tasks by global id; must be picklable (it travels to DataLoader workers)."""

    @abstractmethod
    def sample(self, split: SplitName, task_ids: list[int], seed: int) -> TaskBatch:
        """Tasks ``task_ids`` of ``split``; task ``i`` depends on ``(seed, split, i)`` only."""


class EpochSampler(Sampler[int]):
    """Yields global meta-batch indices, one epoch per iteration, continuing where it stopped.

    The position is the number of meta-batches handed out so far (restored from a checkpoint on
    resume), so iteration ``e`` yields ``e*L .. e*L+L-1`` and a run resumed mid-epoch continues
    with exactly the batches the uninterrupted run would have drawn. Lightning's ``set_epoch`` is
    deliberately ignored: its epoch count after a resume is not the number of epochs consumed.
    """

    def __init__(self, batches_per_epoch: int, position: int = 0) -> None:
        self.batches_per_epoch = batches_per_epoch
        self.position = position

    def set_epoch(self, epoch: int) -> None:
        """No-op, see the class docstring."""

    def __iter__(self) -> Iterator[int]:
        start = self.position
        end = (start // self.batches_per_epoch + 1) * self.batches_per_epoch
        for index in range(start, end):
            self.position = index + 1
            yield index

    def __len__(self) -> int:
        return self.batches_per_epoch


class TrainEpisodes(Dataset):
    """Item ``b`` is this rank's share of global meta-batch ``b``."""

    def __init__(self, sampler: TaskSampler, seed: int, meta_batch: int, rank: int, world_size: int) -> None:
        self.sampler, self.seed = sampler, seed
        self.per_rank = meta_batch // world_size
        self.meta_batch, self.rank = meta_batch, rank

    def task_ids(self, batch_index: int) -> list[int]:
        start = batch_index * self.meta_batch + self.rank * self.per_rank
        return list(range(start, start + self.per_rank))

    def __getitem__(self, batch_index: int) -> TaskBatch:
        return self.sampler.sample("train", self.task_ids(batch_index), self.seed)


# Mutable on purpose, like TaskBatch: Lightning's device transfer rebuilds dataclasses.
@dataclass
class FlatBatch:
    """An ordinary labelled mini-batch for non-episodic pre-training: ``x [B, ...]`` and global
    class labels ``y [B]`` in ``0..train_classes-1``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


class FlatTrainBatches(Dataset):
    """Item ``b`` is this rank's share of global flat batch ``b`` (examples drawn uniformly, with
    replacement, by ``generator_for(seed, "flat-train", b)``)."""

    def __init__(self, dataset: Dataset, seed: int, batch_size: int, rank: int, world_size: int) -> None:
        self.dataset, self.seed, self.batch_size = dataset, seed, batch_size
        self.per_rank, self.rank = batch_size // world_size, rank

    def __getitem__(self, batch_index: int) -> FlatBatch:
        g = generator_for(self.seed, "flat-train", batch_index)
        idx = torch.randint(len(self.dataset), (self.batch_size,), generator=g)
        mine = idx[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        fetch = getattr(self.dataset, "batch", None)  # batched fetching where the dataset offers it
        if fetch is not None:
            x, y = fetch(mine)
        else:
            items = [self.dataset[i] for i in mine.tolist()]
            x, y = torch.stack([item[0] for item in items]), torch.as_tensor([int(item[1]) for item in items])
        return FlatBatch(x, y)


class EvalEpisodes(Dataset):
    """The fixed tasks of a validation/test split: this rank's shard, in batches."""

    def __init__(self, sampler: TaskSampler, split: SplitName, num_tasks: int, seed: int,
                 batch_size: int, rank: int, world_size: int) -> None:
        self.sampler, self.split, self.seed = sampler, split, seed
        shard = list(range(rank, num_tasks, world_size))
        self.batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> TaskBatch:
        return self.sampler.sample(self.split, self.batches[i], self.seed)


class EpisodicDataModule(L.LightningDataModule, ABC):
    """A task distribution with meta-train/val/test splits, served as meta-batches.

    Subclasses declare ``Config`` and implement :meth:`task_info` and :meth:`build_sampler`.
    """

    Config: ClassVar[type[DataConfig]] = DataConfig
    registered_name: ClassVar[str]

    def __init__(self, config: DataConfig | dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(config, DataConfig):
            config = self.Config.model_validate({k: v for k, v in (config or {}).items() if k != "name"})
        self.config = config
        self.seed = seed
        self._sampler: TaskSampler | None = None
        self._resume = 0  # meta-batches already trained on, restored from a checkpoint

    @classmethod
    def example_config(cls, workdir: Path) -> dict[str, Any]:
        """Parameters of a small offline instance (may write example data under ``workdir``).

        The conformance harness (:mod:`lightmeta.testing`) tests every registered datamodule
        with it; datamodules that read files write a tiny copy in their real format here.
        """
        return {}

    @abstractmethod
    def task_info(self) -> TaskInfo:
        """Problem type, input shape and ways; known from the config alone (no data loading)."""

    @abstractmethod
    def build_sampler(self) -> TaskSampler:
        """Load or generate the data and return the sampler (called once, in ``setup``)."""

    # ------------------------------------------------------------------ Lightning hooks
    @property
    def sampler(self) -> TaskSampler:
        if self._sampler is None:
            self._sampler = self.build_sampler()
        return self._sampler

    def setup(self, stage: str | None = None) -> None:
        _ = self.sampler

    def loader_sampler(self) -> TaskSampler:
        """What the episode DataLoaders draw from: the sampler itself. A datamodule that builds
        episodes on the training device (in ``on_after_batch_transfer``) returns a sampler whose
        items are the unbuilt episodes instead."""
        return self.sampler

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None) -> DataLoader:
        c = self.config
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            shuffle=False,
            num_workers=c.num_workers,
            pin_memory=c.pin_memory,
            persistent_workers=c.num_workers > 0,
        )

    def flat_train_dataset(self) -> Dataset:
        """The meta-training classes as a labelled dataset of ``(x, label)`` with a ``num_classes``
        attribute (for non-episodic pre-training); datamodules that have one override this."""
        raise ConfigError(
            f"data '{getattr(self, 'registered_name', type(self).__name__)}' offers no flat labelled view of its "
            "training classes, which non-episodic pre-training (e.g. algorithm=baseline) needs; choose a "
            "classification datamodule such as omniglot, miniimagenet or synthetic"
        )

    def _flat_train_dataloader(self, batch_size: int) -> DataLoader:
        rank, world = self._split_across_ranks("algorithm.batch_size", batch_size, "trains on the same number of examples")
        return self._resumable_train_loader(FlatTrainBatches(self.flat_train_dataset(), self.seed, batch_size, rank, world))

    def train_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if getattr(module, "training_data", "episodes") == "flat":
            return self._flat_train_dataloader(module.flat_batch_size)
        m = self.config.meta_batch_size
        rank, world = self._split_across_ranks("data.meta_batch_size", m, "adapts the same number of tasks")
        return self._resumable_train_loader(TrainEpisodes(self.loader_sampler(), self.seed, m, rank, world))

    def _split_across_ranks(self, field: str, size: int, promise: str) -> tuple[int, int]:
        """``(rank, world_size)``, refusing a per-step ``size`` the training processes cannot share."""
        rank, world = self._rank_world()
        if size % world:
            raise ConfigError(
                f"{field}={size} is not divisible by the {world} training processes; "
                f"choose a multiple so every rank {promise}"
            )
        return rank, world

    def _resumable_train_loader(self, batches: Any) -> DataLoader:
        """The training loader, starting at the restored position (once) after a resume."""
        position, self._resume = self._resume, 0
        return self._loader(batches, EpochSampler(self.config.train_batches_per_epoch, position))

    # ------------------------------------------------------------------ exact resume
    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: how far into the current epoch's episode stream training got."""
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.total.completed if trainer is not None else 0
        return {"train_batches_done": int(done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run continues the episode stream where the checkpoint left it."""
        self._resume = int(state_dict.get("train_batches_done", 0))

    def eval_episodes(self, split: Literal["val", "test"]) -> EvalEpisodes:
        rank, world = self._rank_world()
        n = self.config.val_tasks if split == "val" else self.config.test_tasks
        return EvalEpisodes(self.loader_sampler(), split, n, self.config.eval_seed, self.config.eval_batch_size, rank, world)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_episodes("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_episodes("test"))
