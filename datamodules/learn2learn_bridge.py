"""learn2learn bridge: any learn2learn task source as a lightmeta datamodule.

Wraps learn2learn's ``TaskDataset`` (``Taskset``) objects, ``MetaDataset`` s and the result of
``learn2learn.vision.benchmarks.get_tasksets(...)``. learn2learn is optional: importing
lightmeta never imports it, and the datamodule is registered either way; constructing it
without learn2learn installed fails with one line saying so.

Python API (task sets are Python objects, so this is the main use)::

    import learn2learn as l2l
    from lightmeta.datamodules.learn2learn_bridge import Learn2LearnDataModule

    tasksets = l2l.vision.benchmarks.get_tasksets("mini-imagenet", train_ways=5, train_samples=16,
                                                  test_ways=5, test_samples=16, root="~/data")
    dm = Learn2LearnDataModule.from_tasksets(tasksets, ways=5, shots=1, queries=15, seed=0)
    # or from three datasets of (image, label) items (or MetaDatasets), one per split:
    dm = Learn2LearnDataModule.from_datasets(train, validation, test, ways=5, shots=1, queries=15)

    learner = ALGORITHMS.get("protonet")({}, model={"name": "conv4"}, task=dm.task_info())
    L.Trainer(max_steps=1000, use_distributed_sampler=False).fit(learner, datamodule=dm)

Config use: ``data=learn2learn data.benchmark=mini-imagenet data.root=~/data`` calls
``get_tasksets(benchmark, train_ways=ways, train_samples=shots+queries, test_ways=eval_ways,
test_samples=eval_shots+eval_queries, num_tasks=-1, root=root, **benchmark_kwargs)``;
``data.benchmark`` may also be ``package.module:function``, a function with those keyword
arguments returning ``(train, validation, test)`` task sets.

Episodes: every learn2learn task must hold ``ways`` classes with ``shots + queries`` examples
each (``queries`` of them become the query set); a task that does not fails with one line.
Task ``i`` of a split is drawn with Python's ``random``, NumPy's and torch's global generators
seeded from ``(seed, split, i)`` (and restored afterwards), so training and the fixed
evaluation tasks are deterministic as for every lightmeta datamodule; labels are permuted per
episode by lightmeta. A finite task set (``num_tasks > 0``) is a fixed pool: task ``i`` is its
task ``i mod num_tasks``. ``data.augment`` applies to training episodes (clamped to [0, 1]
only when the episode's pixels lie in it); variable ways/shots are not available here
(learn2learn's transforms fix them). Task sets travel to DataLoader workers by pickling: keep
``data.num_workers=0`` for task sets that cannot be pickled.
"""
from __future__ import annotations

import contextlib
import importlib
import random
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from lightmeta.augment import augment_task_batch
from lightmeta.classification import EpisodeConfig
from lightmeta.datamodule import EpisodicDataModule, SplitName, TaskSampler
from lightmeta.episodes import EpisodeSpec, TaskBatch
from lightmeta.errors import ConfigError, DataError
from lightmeta.registry import register_datamodule
from lightmeta.seeding import derive_seed, generator_for
from lightmeta.task_info import TaskInfo

SPLIT_KEYS = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


def require_learn2learn() -> Any:
    """The learn2learn module, or :class:`ConfigError` saying it is missing."""
    try:
        return importlib.import_module("learn2learn")
    except ImportError as exc:
        raise ConfigError(f"data=learn2learn needs the learn2learn package, which cannot be imported ({exc}); "
                          "pip install learn2learn, or choose another datamodule") from None


class Learn2LearnConfig(EpisodeConfig):
    """Episode shapes plus, for config use, the learn2learn benchmark to build."""

    benchmark: str | None = Field(
        default=None,
        description="get_tasksets name (omniglot, mini-imagenet, tiered-imagenet, fc100, cifarfs) or package.module:function "
        "returning (train, validation, test) task sets; null: task sets given in Python (from_tasksets)",
    )
    root: str = Field(default="~/data", description="root= of get_tasksets (where learn2learn keeps its data)")
    benchmark_kwargs: dict[str, Any] = Field(default_factory=dict, description="further get_tasksets arguments, e.g. {data_augmentation: normal}")

    @model_validator(mode="after")
    def _fixed_shapes(self) -> "Learn2LearnConfig":
        if self.ways_range is not None or self.shots_range is not None:
            raise ValueError("ways_range/shots_range are not available for learn2learn task sets (their transforms fix "
                             "ways and samples); set them to null")
        return self


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators; restore their states afterwards."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)


def split_task(x: Any, y: Any, spec: EpisodeSpec, generator: torch.Generator, where: str) -> Tensor:
    """A learn2learn task ``(X, y)`` as class-major ``[N, K+Q, ...]`` images, classes in a random label order."""
    x = torch.as_tensor(x)
    y = torch.as_tensor(y).reshape(-1)
    per = spec.shots + spec.queries
    classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    if len(classes) != spec.ways or bool((counts != per).any()) or x.shape[0] != y.shape[0]:
        raise DataError(
            f"{where} has {len(classes)} classes with {counts.min().item() if len(counts) else 0}.."
            f"{counts.max().item() if len(counts) else 0} examples each, but the episodes are {spec.ways}-way with "
            f"shots + queries = {per} examples per class; make the task set's ways and samples match data.ways/shots/queries"
        )
    grouped = x[torch.argsort(inverse, stable=True)].reshape(spec.ways, per, *x.shape[1:])
    grouped = grouped[torch.randperm(spec.ways, generator=generator)]
    return grouped if grouped.is_floating_point() else grouped.float()


class Learn2LearnTasks(TaskSampler):
    """Episodes from three learn2learn task sets (train, validation, test)."""

    def __init__(self, tasksets: dict[str, Any], train_spec: EpisodeSpec, eval_spec: EpisodeSpec,
                 augment: Any = None) -> None:
        self.tasksets = tasksets
        self.train_spec, self.eval_spec = train_spec, eval_spec
        self.augment = augment

    def spec(self, split: str) -> EpisodeSpec:
        return self.train_spec if split == "train" else self.eval_spec

    def task(self, split: SplitName, i: int, seed: int) -> Tensor:
        """Task ``i`` as ``[N, K+Q, ...]`` (row ``j`` carries label ``j``)."""
        taskset = self.tasksets[split]
        pool = int(getattr(taskset, "num_tasks", -1))
        index = i % pool if pool > 0 else 0
        with seeded(derive_seed(seed, f"learn2learn-{split}", index if pool > 0 else i)):
            x, y = taskset[index]
        return split_task(x, y, self.spec(split), generator_for(seed, f"learn2learn-labels-{split}", i),
                          f"learn2learn task {i} of the '{split}' task set")

    def sample(self, split: SplitName, task_ids: list[int], seed: int) -> TaskBatch:
        spec = self.spec(split)
        k, n = spec.shots, spec.ways
        x = torch.stack([self.task(split, int(i), seed) for i in task_ids])  # [T, N, K+Q, ...]
        t, shape = len(task_ids), x.shape[3:]
        labels = torch.arange(n)
        batch = TaskBatch(
            support_x=x[:, :, :k].reshape(t, n * k, *shape),
            support_y=labels.repeat_interleave(k).repeat(t, 1),
            query_x=x[:, :, k:].reshape(t, n * spec.queries, *shape),
            query_y=labels.repeat_interleave(spec.queries).repeat(t, 1),
            spec=spec,
            task_ids=torch.tensor(list(task_ids), dtype=torch.long),
        )
        if split == "train" and self.augment is not None and self.augment.active:
            unit = bool(x.min() >= 0) and bool(x.max() <= 1)
            batch = augment_task_batch(batch, self.augment, seed, clamp=unit)
        return batch


def three_tasksets(tasksets: Any) -> dict[str, Any]:
    """``{train, val, test}`` from a ``BenchmarkTasksets``, a mapping or a sequence of three."""
    if isinstance(tasksets, dict):
        get = tasksets.get
    elif all(hasattr(tasksets, k) for k in ("train", "test")) and any(hasattr(tasksets, k) for k in SPLIT_KEYS["val"]):
        def get(key: str) -> Any:
            return getattr(tasksets, key, None)
    elif isinstance(tasksets, Sequence) and len(tasksets) == 3:
        return dict(zip(SPLIT_KEYS, tasksets))
    else:
        raise ConfigError(f"expected (train, validation, test) task sets, got {type(tasksets).__name__}; "
                          "pass get_tasksets(...)'s result, a dict or a sequence of three")
    found = {split: next((get(k) for k in keys if get(k) is not None), None) for split, keys in SPLIT_KEYS.items()}
    missing = [s for s, v in found.items() if v is None]
    if missing:
        raise ConfigError(f"the task sets lack {', '.join(missing)}; give train, validation and test")
    return found


def build_tasksets(datasets: Sequence[Any], train_spec: EpisodeSpec, eval_spec: EpisodeSpec) -> dict[str, Any]:
    """learn2learn task sets (NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels) over three datasets."""
    l2l = require_learn2learn()
    t = l2l.data.transforms
    out = {}
    for split, dataset in zip(SPLIT_KEYS, datasets):
        spec = train_spec if split == "train" else eval_spec
        meta = dataset if isinstance(dataset, l2l.data.MetaDataset) else l2l.data.MetaDataset(dataset)
        transforms = [t.NWays(meta, spec.ways), t.KShots(meta, spec.shots + spec.queries), t.LoadData(meta),
                      t.RemapLabels(meta), t.ConsecutiveLabels(meta)]
        out[split] = l2l.data.Taskset(meta, transforms, num_tasks=-1)
    return out


def _benchmark_function(name: str) -> Any:
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"data.benchmark={name!r} cannot be imported ({exc}); use package.module:function") from None


@register_datamodule("learn2learn")
class Learn2LearnDataModule(EpisodicDataModule):
    """learn2learn TaskDatasets / MetaDatasets / get_tasksets(...) as episodes (needs learn2learn)."""

    Config = Learn2LearnConfig
    config: Learn2LearnConfig
    default_model: ClassVar[dict[str, Any] | None] = {"name": "conv4"}
    #: the peer library the tests must import before testing this datamodule
    peer: ClassVar[str] = "learn2learn"

    def __init__(self, config: Learn2LearnConfig | dict[str, Any] | None = None, seed: int = 0) -> None:
        require_learn2learn()
        super().__init__(config, seed)
        self._tasksets: dict[str, Any] | None = None
        self._in_shape: tuple[int, ...] | None = None

    @classmethod
    def from_tasksets(cls, tasksets: Any, seed: int = 0, **config: Any) -> "Learn2LearnDataModule":
        """Wrap ``get_tasksets(...)``'s result (or a dict / sequence of three task sets)."""
        dm = cls(config, seed=seed)
        dm._tasksets = three_tasksets(tasksets)
        return dm

    @classmethod
    def from_datasets(cls, train: Any, validation: Any, test: Any, seed: int = 0, **config: Any) -> "Learn2LearnDataModule":
        """Wrap three datasets of ``(image, label)`` items (or learn2learn MetaDatasets), one per split."""
        dm = cls(config, seed=seed)
        dm._tasksets = build_tasksets((train, validation, test), dm.config.train_spec, dm.config.eval_spec)
        return dm

    def tasksets(self) -> dict[str, Any]:
        """The wrapped task sets, built from ``data.benchmark`` on first use in config mode."""
        if self._tasksets is None:
            c = self.config
            if c.benchmark is None:
                raise ConfigError("data.benchmark is required for data=learn2learn in a config (a get_tasksets name such "
                                  "as mini-imagenet); in Python use Learn2LearnDataModule.from_tasksets(...)")
            train, evals = c.train_spec, c.eval_spec
            kwargs = dict(train_ways=train.ways, train_samples=train.shots + train.queries, test_ways=evals.ways,
                          test_samples=evals.shots + evals.queries, num_tasks=-1, root=c.root, **c.benchmark_kwargs)
            if ":" in c.benchmark:
                result = _benchmark_function(c.benchmark)(**kwargs)
            else:
                benchmarks = importlib.import_module("learn2learn.vision.benchmarks")
                names = sorted(benchmarks.list_tasksets())
                if c.benchmark not in names:
                    raise ConfigError(f"data.benchmark={c.benchmark!r} is not a learn2learn benchmark; "
                                      f"choose one of {', '.join(names)} or give package.module:function")
                try:
                    result = benchmarks.get_tasksets(c.benchmark, **kwargs)
                except (OSError, RuntimeError) as exc:
                    raise DataError(f"learn2learn could not load {c.benchmark} from {c.root} ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}); check data.root") from None
            self._tasksets = three_tasksets(result)
        return self._tasksets

    def build_sampler(self) -> Learn2LearnTasks:
        """The sampler, checked at setup on one task of every split (shape mismatches fail here)."""
        c = self.config
        sampler = Learn2LearnTasks(self.tasksets(), c.train_spec, c.eval_spec, c.augment)
        for split in SPLIT_KEYS:
            sampler.task(split, 0, c.eval_seed)  # type: ignore[arg-type]
        return sampler

    def task_info(self) -> TaskInfo:
        """In-shape read from the first training task (learn2learn does not declare it)."""
        if self._in_shape is None:
            self._in_shape = tuple(self.sampler.sample("train", [0], self.seed).support_x.shape[2:])
        c = self.config
        return TaskInfo(problem="classification", in_shape=self._in_shape, train_ways=c.ways, eval_ways=c.eval_spec.ways)

    @classmethod
    def example_config(cls, workdir: Path) -> dict[str, Any]:
        """Config use with :func:`example_tasksets` (small in-memory learn2learn task sets)."""
        return {"benchmark": "lightmeta.datamodules.learn2learn_bridge:example_tasksets", "ways": 3, "shots": 1, "queries": 2}


def example_tasksets(train_ways: int = 3, train_samples: int = 3, test_ways: int = 3, test_samples: int = 3,
                     num_tasks: int = -1, root: str | None = None, classes: int = 12, per_class: int = 6,
                     side: int = 16) -> Any:
    """learn2learn task sets over an in-memory dataset (classes split 6/3/3), built as
    ``get_tasksets`` builds its benchmarks: ``NWays, KShots, LoadData, RemapLabels,
    ConsecutiveLabels``. Image ``m`` of class ``c`` is a constant ``(c * per_class + m) / (classes * per_class)``
    plus a class-dependent stripe, so tests can tell every image apart."""
    l2l = require_learn2learn()
    t = l2l.data.transforms
    n = classes * per_class
    x = (torch.arange(n, dtype=torch.float32) / n).view(n, 1, 1, 1).expand(n, 1, side, side).clone()
    y = torch.arange(n) // per_class
    for c in range(classes):
        x[y == c, 0, c % side, :] = 1.0
    bounds = {"train": range(0, classes // 2), "val": range(classes // 2, 3 * classes // 4), "test": range(3 * classes // 4, classes)}
    sets = []
    for split, members in bounds.items():
        keep = (y >= members.start) & (y < members.stop)
        meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x[keep], y[keep]))
        ways, samples = (train_ways, train_samples) if split == "train" else (test_ways, test_samples)
        transforms = [t.NWays(meta, ways), t.KShots(meta, samples), t.LoadData(meta), t.RemapLabels(meta), t.ConsecutiveLabels(meta)]
        sets.append(l2l.data.Taskset(meta, transforms, num_tasks=num_tasks))
    return importlib.import_module("learn2learn.vision.benchmarks").BenchmarkTasksets(*sets)
