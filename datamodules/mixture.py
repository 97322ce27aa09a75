"""Multi-dataset task mixtures: each episode's source dataset is drawn by weight.

For task-heterogeneity studies (e.g. Meta-Dataset, Triantafillou et al. 2020, which draws
each training episode's source uniformly): ``data.sources`` lists datamodule sections, each
with a ``name``, an optional ``weight`` (default 1; normalised) and its own parameters::

    data:
      name: mixture
      ways: 5
      shots: 1
      image_size: 28          # resize every source's episodes to 28x28 ...
      channels: 1             # ... and one channel
      sources:
        - {name: omniglot, weight: 2, root: ../shared/data/omniglot}
        - {name: imagefolder, root: ~/my_images, image_size: 28, channels: 1}

* The mixture owns the episode: ``ways``, ``shots``, ``queries``, ``eval_*``, the ranges,
  ``augment`` and the stream settings (meta-batch size, task counts...) are set on it and
  passed to every source that has such fields; setting them on a source is an error.
* Source choice: with ``granularity: task`` (default) task ``i`` of a split comes from the
  source drawn from ``generator_for(seed, "mixture-<split>", i)``; with ``meta_batch``
  every training task of meta-batch ``b`` comes from the source drawn for ``b`` (evaluation
  tasks are always drawn per task, because evaluation batches are sharded across ranks).
  Either way the choice is a pure function of (seed, index), the same on every rank.
* Source ``s`` samples its tasks with the seed ``derive_seed(seed, "mixture-source", s)``,
  so sources are independent of each other and of the choice.
* Image shapes: a meta-batch stacks tasks of all sources, so every source's episodes must
  have one image shape. Sources of different shapes need ``image_size`` (square, bilinear
  with antialiasing) and/or ``channels`` (greyscale <-> RGB: luma weights / channel copies)
  on the mixture; without them differing shapes are an error naming them. Pixel ranges are
  the sources' own (image datamodules give [0, 1]).
* Variable ways/shots (``ways_range``/``shots_range``) need sources that can sample a given
  spec (image-classification datamodules); one spec is drawn per meta-batch for all sources.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator
from torch import Tensor

from lightmeta.augment import augment_task_batch
from lightmeta.classification import EpisodeConfig, EpisodeSpecs
from lightmeta.datamodule import DataConfig, EpisodicDataModule, SplitName, TaskSampler
from lightmeta.episodes import EpisodeSpec, TaskBatch
from lightmeta.errors import ConfigError, DataError, PluginError
from lightmeta.registry import DATAMODULES, register_datamodule
from lightmeta.seeding import derive_seed, generator_for
from lightmeta.task_info import TaskInfo

#: parameters the mixture owns (set on the mixture, passed on to the sources that have them)
OWNED = tuple(DataConfig.model_fields) + tuple(f for f in EpisodeConfig.model_fields if f not in DataConfig.model_fields)
#: episode-shape fields passed on to every source that declares them
PASSED = ("ways", "shots", "queries", "eval_ways", "eval_shots", "eval_queries")
_LUMA = (0.2989, 0.587, 0.114)


class MixtureConfig(EpisodeConfig):
    """The episode shape, the sources with their weights, and the common image shape."""

    sources: list[dict[str, Any]] = Field(min_length=1, description="datamodule sections {name, weight (default 1), ...parameters}")
    granularity: Literal["task", "meta_batch"] = Field(default="task", description="draw the source per task, or per training meta-batch")
    image_size: int | None = Field(default=None, ge=4, description="resize every source's images to this square size (null: sources must agree)")
    channels: Literal[1, 3] | None = Field(default=None, description="convert every source's images to 1 or 3 channels (null: sources must agree)")

    def source_params(self, i: int) -> tuple[str, float, dict[str, Any]]:
        """``(name, weight, parameters with the mixture's episode shape passed on)`` of source ``i``."""
        body = dict(self.sources[i])
        name, weight = body.pop("name", None), body.pop("weight", 1.0)
        fields = DATAMODULES.get(str(name)).Config.model_fields
        largest = self.episode_specs().largest_train
        shape = {"ways": largest.ways, "shots": largest.shots, "queries": largest.queries,
                 "eval_ways": self.eval_spec.ways, "eval_shots": self.eval_spec.shots, "eval_queries": self.eval_spec.queries}
        body.update({k: v for k, v in shape.items() if k in fields})
        return str(name), float(weight), body

    @model_validator(mode="after")
    def _check_sources(self) -> "MixtureConfig":
        for i, source in enumerate(self.sources):
            name = source.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"sources[{i}] needs a 'name' (a registered datamodule)")
            weight = source.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"sources[{i}].weight={weight!r} must be a positive number")
            if source.get("episode_transfer", "float") != "float":
                raise ValueError(f"sources[{i}].episode_transfer: the mixture builds its episodes in the DataLoader "
                                 "(it resizes and mixes them there); remove it")
            owned = [k for k in source if k in OWNED]
            if owned:
                raise ValueError(f"sources[{i}].{owned[0]}: set episode shapes, augmentation and stream settings on the "
                                 f"mixture (data.{owned[0]}), not on a source")
            try:
                _, _, params = self.source_params(i)
                DATAMODULES.get(name).Config.model_validate(params)
            except PluginError as exc:
                raise ValueError(f"sources[{i}].name: {exc}") from None
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                raise ValueError(f"sources[{i}] ({name}).{loc}: {what}") from None
        return self


def conform(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Images ``[T, M, C, H, W]`` converted to ``shape = (C', H', W')`` (channels, then size)."""
    c, h, w = shape
    t, m = x.shape[:2]
    flat = x.reshape(t * m, *x.shape[2:])
    if flat.shape[1] != c:
        if c == 1 and flat.shape[1] == 3:
            flat = (flat * torch.tensor(_LUMA, dtype=flat.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif c == 3 and flat.shape[1] == 1:
            flat = flat.expand(-1, 3, -1, -1)
        else:
            raise DataError(f"cannot convert {flat.shape[1]}-channel images to {c} channels")
    if tuple(flat.shape[-2:]) != (h, w):
        flat = F.interpolate(flat, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return flat.reshape(t, m, c, h, w)


class MixtureTasks(TaskSampler):
    """Tasks drawn from several samplers by weight, conformed to one image shape."""

    def __init__(self, sources: list[TaskSampler], names: list[str], weights: Sequence[float], specs: EpisodeSpecs,
                 shape: tuple[int, int, int], granularity: str = "task", augment: Any = None) -> None:
        self.sources, self.names = sources, names
        w = torch.tensor(list(weights), dtype=torch.float64)
        self.weights = w / w.sum()
        self.cumulative = self.weights.cumsum(0)
        self.specs, self.shape, self.granularity, self.augment = specs, tuple(shape), granularity, augment
        if specs.variable:
            rigid = [n for n, s in zip(names, sources) if not hasattr(s, "sample_spec")]
            if rigid:
                raise ConfigError(f"data.ways_range/shots_range need sources that sample any episode spec; source "
                                  f"'{rigid[0]}' cannot: remove the ranges or that source")

    def source_of(self, split: SplitName, task_ids: Sequence[int], seed: int) -> Tensor:
        """The source index of every task (a pure function of seed, split and index)."""
        per_batch = self.granularity == "meta_batch" and split == "train"
        stream = "mixture-train-batch" if per_batch else f"mixture-{split}"
        keys = [int(i) // self.specs.group if per_batch else int(i) for i in task_ids]
        u = torch.tensor([torch.rand(1, generator=generator_for(seed, stream, k), dtype=torch.float64).item() for k in keys],
                         dtype=torch.float64)
        return torch.searchsorted(self.cumulative, u, right=True).clamp_(max=len(self.sources) - 1)

    def _from_source(self, s: int, split: SplitName, task_ids: list[int], seed: int, spec: EpisodeSpec) -> TaskBatch:
        source, sub_seed = self.sources[s], derive_seed(seed, "mixture-source", s)
        if hasattr(source, "sample_spec"):
            batch = source.sample_spec(split, task_ids, sub_seed, spec)
        else:
            batch = source.sample(split, task_ids, sub_seed)
            if batch.spec != spec:
                raise DataError(f"mixture source '{self.names[s]}' gave {batch.spec} episodes for '{split}', expected {spec}; "
                                "it cannot change its episode shape, so make the mixture's eval_* equal its training values")
        batch.support_x = conform(batch.support_x, self.shape)
        batch.query_x = conform(batch.query_x, self.shape)
        return batch

    def sample(self, split: SplitName, task_ids: list[int], seed: int) -> TaskBatch:
        spec = self.specs.spec(split, task_ids, seed)
        chosen = self.source_of(split, task_ids, seed)
        t = len(task_ids)
        parts: list[tuple[Tensor, TaskBatch]] = []
        for s in chosen.unique().tolist():
            pos = (chosen == s).nonzero().squeeze(1)
            parts.append((pos, self._from_source(s, split, [task_ids[j] for j in pos.tolist()], seed, spec)))
        first = parts[0][1]
        fields = {}
        for name in ("support_x", "support_y", "query_x", "query_y"):
            ref = getattr(first, name)
            out = torch.empty((t, *ref.shape[1:]), dtype=ref.dtype)
            for pos, batch in parts:
                out.index_copy_(0, pos, getattr(batch, name).to(ref.dtype))
            fields[name] = out
        batch = TaskBatch(spec=spec, task_ids=torch.tensor(list(task_ids), dtype=torch.long), **fields)
        if split == "train" and self.augment is not None and self.augment.active:
            unit = bool(batch.support_x.min() >= 0) and bool(batch.support_x.max() <= 1)
            batch = augment_task_batch(batch, self.augment, seed, clamp=unit)
        return batch


@register_datamodule("mixture")
class MixtureDataModule(EpisodicDataModule):
    """Episodes from several datamodules, each episode's source drawn by weight."""

    Config = MixtureConfig
    config: MixtureConfig
    default_model: ClassVar[dict[str, Any] | None] = {"name": "conv4"}

    def __init__(self, config: MixtureConfig | dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.source_names: list[str] = []
        self.weights: list[float] = []
        self.sources: list[EpisodicDataModule] = []
        for i in range(len(self.config.sources)):
            name, weight, params = self.config.source_params(i)
            cls = DATAMODULES.get(name)
            self.source_names.append(name)
            self.weights.append(weight)
            self.sources.append(cls(cls.Config.model_validate(params), seed=seed))

    def image_shape(self) -> tuple[int, int, int]:
        """The common image shape: the sources' own, or as set by ``image_size`` / ``channels``."""
        infos = [s.task_info() for s in self.sources]
        kinds = {i.problem for i in infos}
        if kinds != {"classification"}:
            raise ConfigError(f"data=mixture mixes classification sources only; got {', '.join(sorted(kinds))}")
        shapes = [tuple(i.in_shape) for i in infos]
        if any(len(s) != 3 for s in shapes):
            raise ConfigError(f"data=mixture needs image sources (C, H, W); got shapes {shapes}")
        c = self.config
        channels = {s[0] for s in shapes} if c.channels is None else {c.channels}
        sizes = {s[1:] for s in shapes} if c.image_size is None else {(c.image_size, c.image_size)}
        if len(channels) > 1 or len(sizes) > 1:
            listed = ", ".join(f"{n}: {tuple(s)}" for n, s in zip(self.source_names, shapes))
            raise ConfigError(f"mixture sources have different image shapes ({listed}); set data.image_size and/or "
                              "data.channels to resize them to one")
        (ch,), ((h, w),) = channels, sizes
        return (ch, h, w)

    def task_info(self) -> TaskInfo:
        return TaskInfo(problem="classification", in_shape=self.image_shape(), train_ways=self.config.max_train_ways,
                        eval_ways=self.config.eval_spec.ways)

    def prepare_data(self) -> None:
        for source in self.sources:
            source.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for source in self.sources:
            source.trainer = self.trainer  # sources keep their class splits with the run, too
            source.setup(stage)
        super().setup(stage)

    def build_sampler(self) -> MixtureTasks:
        c = self.config
        return MixtureTasks([s.sampler for s in self.sources], self.source_names, self.weights, c.episode_specs(),
                            self.image_shape(), c.granularity, c.augment)

    @property
    def tasks(self) -> MixtureTasks:
        return self.sampler  # type: ignore[return-value]

    @classmethod
    def example_config(cls, workdir: Path) -> dict[str, Any]:
        """Two image folders, RGB 16x16 (weight 2) and greyscale 20x20 in per-split folders,
        mixed at 16x16 RGB."""
        from lightmeta.datamodules.imagefolder import write_example

        rgb = write_example(Path(workdir) / "mixture_rgb")
        grey = write_example(Path(workdir) / "mixture_grey", split_folders=True)
        cache = str(Path(workdir) / "mixture_cache")
        return {
            "ways": 3, "shots": 1, "queries": 2, "image_size": 16, "channels": 3,
            "sources": [
                {"name": "imagefolder", "weight": 2, "root": str(rgb), "image_size": 16, "split_ratio": [0.5, 0.25, 0.25], "cache_dir": cache},
                {"name": "imagefolder", "root": str(grey), "image_size": 20, "channels": 1, "cache_dir": cache},
            ],
        }
