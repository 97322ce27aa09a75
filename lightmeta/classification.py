"""Episodic N-way K-shot classification over class-indexed image tensors.

A datamodule for an image dataset implements two methods of :class:`ClassificationDataModule`:
``image_shape()`` and ``load_classes()``, the latter returning a :class:`ClassImages`
(decoded images, the image indices of every class, the class ids of each split).
:class:`ClassificationTasks` turns that into episodes:

* task ``i`` of a split is drawn from ``generator_for(seed, split, i)`` alone: ``N`` distinct
  classes of the split in random order, then ``K + Q`` distinct images of each;
* labels are the classes' positions in that random order, so a class gets a fresh label in
  every episode (mutually exclusive tasks, no label memorisation);
* support and query sets are class-major: ``support_y = [0]*K + [1]*K + ... + [N-1]*K``;
* with rotation augmentation a base class ``c`` becomes four classes ``4c + r`` whose images
  are rotated by ``r * 90`` degrees (applied with ``torch.rot90`` on the gathered batch);
  class ids are ``4c + r`` throughout (``r = 0`` without augmentation);
* sampling indexes the decoded tensor once per meta-batch: no per-image Python code;
* variable ways/shots (``data.ways_range`` / ``data.shots_range``, as Meta-Dataset samples
  episode shapes): a :class:`TaskBatch` stacks tasks of one spec, so the spec is drawn per
  *meta-batch*: training tasks ``b*M .. b*M+M-1`` (``M`` = ``data.meta_batch_size``) share the
  spec drawn from ``generator_for(seed, "train-spec", b)``, uniform over each range
  (inclusive). Every DDP rank's share of meta-batch ``b`` therefore has the same spec, and a
  resumed run draws the same specs. Evaluation episodes keep the fixed ``eval_*`` spec, so
  reported figures stay comparable; all classes of an episode have the same shots;
* augmentation (``data.augment``: crop with padding, flip, colour jitter) is applied to
  training episodes only, batched, by :mod:`lightmeta.augment`;
* where episodes are built (``data.episode_transfer``): ``float`` builds them in the
  DataLoader; ``uint8`` and ``indices`` have the DataLoader hand over an :class:`EpisodePlan`
  (every random draw made, on the CPU generators above) and the datamodule's
  ``on_after_batch_transfer`` builds the :class:`TaskBatch` on the training device: from the
  plan's ``uint8`` pixels (4x fewer bytes to transfer than float32), or, with ``indices``, from
  the whole ``uint8`` dataset held on that device (the plan carries image indices only). The
  three give identical episodes (bit for bit on the same device; on an accelerator the colour
  jitter's float arithmetic may round differently in the last bit).

Pixels: ``uint8`` images come out as ``float32`` in ``[0, 1]`` (value / 255); floating-point
images are cast to ``float32`` unchanged. No normalisation is applied. Datasets whose float32
copy fits in :data:`FLOAT_BUDGET_BYTES` are converted once at setup (Omniglot at 28x28: 100 MB),
so the hot path is a single ``index_select`` (with ``data.episode_transfer=float``; the other
modes keep the ``uint8`` images and convert after the gather).
"""
from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence, cast

import torch
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.data import Dataset

from lightmeta.augment import AugmentConfig, augment_drawn, draw_uniforms
from lightmeta.datamodule import DataConfig, EpisodicDataModule, SplitName, TaskSampler
from lightmeta.episodes import EpisodeSpec, TaskBatch
from lightmeta.errors import ConfigError, DataError
from lightmeta.seeding import generator_for
from lightmeta.task_info import TaskInfo

SPLITS: tuple[SplitName, ...] = ("train", "val", "test")
ROTATIONS = 4  # 0, 90, 180, 270 degrees
FLOAT_BUDGET_BYTES = 1 << 30  # uint8 images up to this size as float32 are converted once, at setup
RESIDENT_FRACTION = 0.5  # data.episode_transfer=indices: the dataset may take this share of the device's memory
RotationMode = Literal["none", "train", "all"]
EpisodeTransfer = Literal["float", "uint8", "indices"]


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (CPU: physical RAM), or None where torch cannot tell."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory())
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return None


def _ids(values: Tensor | Sequence[int]) -> Tensor:
    return torch.as_tensor(values, dtype=torch.long).reshape(-1)


@dataclass
class ClassImages:
    """Decoded images grouped into classes, and the classes of each split.

    ``images [M, C, H, W]`` (``uint8`` or float); ``members[c]`` the indices into ``images`` of
    class ``c``; ``splits`` maps ``train``/``val``/``test`` to disjoint class ids;
    ``class_names[c]`` (optional) names class ``c`` in error messages.
    """

    images: Tensor
    members: list[Tensor]
    splits: dict[str, Tensor]
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"class images must be [num_images, C, H, W], got shape {tuple(self.images.shape)}")
        if self.images.dtype != torch.uint8 and not self.images.is_floating_point():
            raise DataError(f"class images must be uint8 or floating point, got {self.images.dtype}")
        self.members = [_ids(m) for m in self.members]
        m = self.images.shape[0]
        for c, idx in enumerate(self.members):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= m):
                raise DataError(f"class {self.name(c)} indexes images outside 0..{m - 1}")
        if set(self.splits) != set(SPLITS):
            raise DataError(f"class splits must be exactly {list(SPLITS)}, got {sorted(self.splits)}")
        self.splits = {s: _ids(self.splits[s]) for s in SPLITS}
        seen: dict[int, str] = {}
        for split, ids in self.splits.items():
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.members)):
                raise DataError(f"split '{split}' names class ids outside 0..{len(self.members) - 1}")
            for c in ids.tolist():
                if c in seen:
                    raise DataError(f"class {self.name(c)} is in both the '{seen[c]}' and the '{split}' split; splits must be disjoint")
                seen[c] = split

    @classmethod
    def from_counts(cls, images: Tensor, counts: Sequence[int], splits: dict[str, Tensor | Sequence[int]],
                    class_names: list[str] | None = None) -> "ClassImages":
        """Images stored class after class: the first ``counts[0]`` belong to class 0, and so on."""
        if sum(counts) != images.shape[0]:
            raise DataError(f"class counts sum to {sum(counts)} but there are {images.shape[0]} images")
        starts = torch.tensor([0, *counts]).cumsum(0)
        members = [torch.arange(int(starts[c]), int(starts[c + 1])) for c in range(len(counts))]
        return cls(images, members, {k: _ids(v) for k, v in splits.items()}, class_names)

    @property
    def num_classes(self) -> int:
        return len(self.members)

    def name(self, c: int) -> str:
        return f"'{self.class_names[c]}'" if self.class_names else str(c)


def _random_arrangement(population: int, uniforms: list[float]) -> list[int]:
    """``len(uniforms)`` distinct values of ``range(population)`` in uniformly random order.

    Floyd's permutation sampling (Bentley & Floyd 1987, "A sample of brilliance") driven by the
    given uniforms in [0, 1): ``n`` draws instead of shuffling the whole population, so a
    5-way task over 4,112 classes costs five numbers, not a 4,112-element permutation.
    """
    n = len(uniforms)
    out: list[int] = []
    seen: set[int] = set()
    for j, u in zip(range(population - n, population), uniforms):
        pick = int(u * (j + 1))
        if pick in seen:
            out.insert(out.index(pick) + 1, j)
            seen.add(j)
        else:
            out.insert(0, pick)
            seen.add(pick)
    return out


def _to_float(x: Tensor) -> Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _stored(images: Tensor, transfer: EpisodeTransfer = "float") -> Tensor:
    """The pixels as sampled: ``uint8`` becomes float32 in [0, 1] once, here, when that copy
    fits in :data:`FLOAT_BUDGET_BYTES` (converting every batch costs more than gathering it) and
    episodes are built as float32 in the loader; otherwise ``uint8`` stays ``uint8`` and is
    converted batch by batch, after the gather (on the training device unless ``transfer`` is float)."""
    if transfer == "float" and images.dtype == torch.uint8 and images.numel() * 4 <= FLOAT_BUDGET_BYTES:
        return _to_float(images)
    return images if images.dtype in (torch.uint8, torch.float32) else images.float()


def _take(images: Tensor, index: Tensor) -> Tensor:
    """``images[index]`` (any index shape) through ``index_select``, the fast gather."""
    return torch.index_select(images, 0, index.reshape(-1)).view(*index.shape, *images.shape[1:])


def _rotate(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate ``x[i, ...]`` by ``rot[i] * 90`` degrees in place (last two dims; ``rot`` indexes
    the leading dims of ``x``, which must be contiguous)."""
    flat = x.view(rot.numel(), *x.shape[rot.ndim:])
    rot = rot.reshape(-1)
    for r in range(1, ROTATIONS):
        rows = (rot == r).nonzero().squeeze(1)
        if rows.numel():
            flat.index_copy_(0, rows, torch.rot90(flat.index_select(0, rows), r, dims=(-2, -1)))
    return x


def _move(x: Tensor | None, device: torch.device, non_blocking: bool) -> Tensor | None:
    return None if x is None else x.to(device, non_blocking=non_blocking)


class EpisodePlan:
    """A meta-batch drawn but not yet built: what the DataLoaders hand over when
    ``data.episode_transfer`` is ``uint8`` or ``indices``. :meth:`ClassificationTasks.build`
    turns it into the :class:`TaskBatch`, on the device its tensors are on.

    ``index [T, N, K+Q]``: the image indices, row ``[t, j]`` the images of task ``t``'s class
    with label ``j``, support images first; ``rotation [T, N]``: quarter turns per class (None:
    the split is not rotated); ``uniforms [T, N*(K+Q), DRAWS_PER_IMAGE]``: the augmentation draws
    (None: not augmented); ``support_x [T, N, K, C, H, W]`` / ``query_x``: the gathered, rotated
    pixels in the stored dtype (``uint8`` transfer), or None (``indices``: gathered on the device).

    Not a dataclass on purpose: Lightning moves it as one object through :meth:`to`, and its
    precision plugins, which cast every floating-point tensor of a batch to the training dtype
    before the transfer, pass it by, so the augmentation draws arrive exactly as drawn under
    ``bf16-true``; the datamodule casts the built episode instead.
    """

    def __init__(self, index: Tensor, rotation: Tensor | None, uniforms: Tensor | None, spec: EpisodeSpec,
                 task_ids: Tensor, support_x: Tensor | None = None, query_x: Tensor | None = None) -> None:
        self.index, self.rotation, self.uniforms, self.spec, self.task_ids = index, rotation, uniforms, spec, task_ids
        self.support_x, self.query_x = support_x, query_x

    def __len__(self) -> int:
        return len(self.task_ids)

    def _map(self, fn: Any) -> "EpisodePlan":
        return EpisodePlan(fn(self.index), fn(self.rotation), fn(self.uniforms), self.spec, fn(self.task_ids),
                           fn(self.support_x), fn(self.query_x))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "EpisodePlan":
        """The plan on ``device`` (Lightning's batch transfer calls this); asynchronous to CUDA."""
        device = torch.device(device)
        asynchronous = non_blocking or device.type == "cuda"
        return self._map(lambda x: _move(x, device, asynchronous))

    def pin_memory(self) -> "EpisodePlan":
        """Called by ``DataLoader(pin_memory=True)``."""
        return self._map(lambda x: None if x is None else x.pin_memory())


class FlatClassDataset(Dataset):
    """Every image of some classes as ``(image [C, H, W] float32, label)``, labels ``0..L-1``.

    ``class_ids[label]`` is the class id (``4c + r``) behind each label. Batched fetching
    (``__getitems__``) gathers and rotates a whole batch at once.
    """

    def __init__(self, images: Tensor, table: Tensor, counts: Tensor, class_ids: Tensor) -> None:
        self.images = images
        self.class_ids = class_ids
        base, rot = class_ids // ROTATIONS, class_ids % ROTATIONS
        per_class = counts[base]
        self.labels = torch.arange(len(class_ids)).repeat_interleave(per_class)
        rows = [table[b, :n] for b, n in zip(base.tolist(), per_class.tolist())]
        self.image_index = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)
        self.rotation = rot.repeat_interleave(per_class)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Images ``[B, C, H, W]`` and labels ``[B]`` of the given items."""
        idx = _ids(indices)
        x = _rotate(_take(self.images, self.image_index[idx]), self.rotation[idx])
        return _to_float(x), self.labels[idx]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.batch([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        x, y = self.batch(indices)
        return list(zip(x, y))


@dataclass(frozen=True)
class EpisodeSpecs:
    """The episode spec of every task: fixed, or drawn per training meta-batch from ranges.

    Training tasks ``b*group .. b*group+group-1`` share the spec drawn from
    ``generator_for(seed, "train-spec", b)`` (``group`` = the meta-batch size); a call's spec
    is that of its first task's meta-batch. Validation and test use ``eval`` always.
    """

    train: EpisodeSpec
    eval: EpisodeSpec
    ways_range: tuple[int, int] | None = None
    shots_range: tuple[int, int] | None = None
    group: int = 1

    STREAM: ClassVar[str] = "train-spec"

    @property
    def variable(self) -> bool:
        return self.ways_range is not None or self.shots_range is not None

    @property
    def largest_train(self) -> EpisodeSpec:
        """The widest training spec the ranges allow (what the data must support)."""
        ways = self.ways_range[1] if self.ways_range else self.train.ways
        shots = self.shots_range[1] if self.shots_range else self.train.shots
        return EpisodeSpec(ways, shots, self.train.queries)

    def spec(self, split: str, task_ids: Sequence[int], seed: int) -> EpisodeSpec:
        if split != "train":
            return self.eval
        if not self.variable or not len(task_ids):
            return self.train
        g = generator_for(seed, self.STREAM, int(task_ids[0]) // self.group)
        draws = torch.rand(2, generator=g, dtype=torch.float64).tolist()

        def pick(u: float, bounds: tuple[int, int] | None, fixed: int) -> int:
            if bounds is None:
                return fixed
            lo, hi = bounds
            return lo + min(int(u * (hi - lo + 1)), hi - lo)

        return EpisodeSpec(pick(draws[0], self.ways_range, self.train.ways),
                           pick(draws[1], self.shots_range, self.train.shots), self.train.queries)


class ClassificationTasks(TaskSampler):
    """N-way K-shot Q-query episodes from a :class:`ClassImages`; picklable.

    ``train_spec`` shapes training episodes, ``eval_spec`` validation and test episodes.
    ``rotations``: ``none``, ``train`` (rotated copies are new meta-training classes) or ``all``
    (every split). ``ways_range``/``shots_range`` make training specs vary per meta-batch of
    ``spec_group`` tasks (see :class:`EpisodeSpecs`); ``augment`` augments training episodes.
    ``transfer`` (``data.episode_transfer``) decides what :meth:`plan` hands over; :meth:`sample`
    always returns the built episodes. Impossible specs raise :class:`ConfigError` here, at setup.
    """

    def __init__(self, data: ClassImages, train_spec: EpisodeSpec, eval_spec: EpisodeSpec,
                 rotations: RotationMode = "none", *, ways_range: tuple[int, int] | None = None,
                 shots_range: tuple[int, int] | None = None, spec_group: int = 1,
                 augment: AugmentConfig | None = None, transfer: EpisodeTransfer = "float") -> None:
        if transfer == "uint8" and data.images.dtype != torch.uint8:
            raise ConfigError(f"data.episode_transfer=uint8 hands uint8 images to the device, but this dataset's images "
                              f"are {data.images.dtype}; set data.episode_transfer to float or indices")
        self.transfer = transfer
        self.images = _stored(data.images, transfer)
        self.unit_range = data.images.dtype == torch.uint8  # pixels in [0, 1]: jitter may clamp
        self.train_spec, self.eval_spec, self.rotations = train_spec, eval_spec, rotations
        self.specs = EpisodeSpecs(train_spec, eval_spec, ways_range, shots_range, spec_group)
        self.augment = augment or AugmentConfig()
        self.class_names = data.class_names
        self.counts = torch.tensor([len(m) for m in data.members], dtype=torch.long)
        self.table = torch.zeros(data.num_classes, max((len(m) for m in data.members), default=0), dtype=torch.long)
        for c, m in enumerate(data.members):
            self.table[c, : len(m)] = m
        self.classes: dict[str, Tensor] = {}
        self.uniform: dict[str, int | None] = {}
        for split in SPLITS:
            base = data.splits[split]
            rot = torch.arange(ROTATIONS) if self.rotated(split) else torch.zeros(1, dtype=torch.long)
            self.classes[split] = (base.unsqueeze(1) * ROTATIONS + rot).reshape(-1)
            sizes = self.counts[base].unique()
            self.uniform[split] = int(sizes[0]) if len(sizes) == 1 else None
        self._check(data)

    # ------------------------------------------------------------------ setup checks
    def rotated(self, split: str) -> bool:
        return self.rotations == "all" or (self.rotations == "train" and split == "train")

    def spec(self, split: str) -> EpisodeSpec:
        """The configured spec of a split (training: ``ways``/``shots``, before any range draw)."""
        return self.train_spec if split == "train" else self.eval_spec

    def _check(self, data: ClassImages) -> None:
        h, w = self.images.shape[-2:]
        if self.rotations != "none" and h != w:
            raise ConfigError(
                f"data.augment_rotations={self.rotations} needs square images, these are {h}x{w}; set it to none"
            )
        for split in SPLITS:
            spec = self.specs.largest_train if split == "train" else self.eval_spec
            prefix, note = ("", "") if split == "train" else ("eval_", " (eval_* default to the training values)")
            ways_name = "ways_range[1]" if split == "train" and self.specs.ways_range else f"{prefix}ways"
            shots_name = "shots_range[1]" if split == "train" and self.specs.shots_range else f"{prefix}shots"
            n_classes = len(self.classes[split])
            if spec.ways > n_classes:
                raise ConfigError(
                    f"data.{ways_name}={spec.ways} exceeds the {n_classes} classes of the '{split}' split{note}; "
                    f"choose data.{ways_name} <= {n_classes}"
                )
            base = data.splits[split]
            smallest = int(self.counts[base].argmin())
            have = int(self.counts[base][smallest])
            need = spec.shots + spec.queries
            if need > have:
                raise ConfigError(
                    f"data.{shots_name} + data.{prefix}queries = {spec.shots} + {spec.queries} = {need} exceeds the "
                    f"{have} images of class {data.name(int(base[smallest]))} in the '{split}' split{note}; "
                    f"lower data.{shots_name} or data.{prefix}queries"
                )

    # ------------------------------------------------------------------ sampling
    def episode_spec(self, split: SplitName, task_ids: Sequence[int], seed: int) -> EpisodeSpec:
        """The spec of these tasks: fixed, or drawn for their training meta-batch."""
        return self.specs.spec(split, task_ids, seed)

    def _draw(self, split: SplitName, task_ids: Sequence[int], seed: int, spec: EpisodeSpec) -> tuple[Tensor, Tensor]:
        """Class ids ``[T, N]`` in label order and image picks ``[T, N, K+Q]`` (positions in each class)."""
        classes = self.classes[split]
        n, per, n_classes = spec.ways, spec.shots + spec.queries, len(classes)
        uniform = self.uniform[split]
        width = uniform or self.table.shape[1]
        rows, keys = [], []
        for i in task_ids:  # one draw per task from its own generator
            u = torch.rand(n * (width + 1), generator=generator_for(seed, split, i), dtype=torch.float64)
            rows.append(_random_arrangement(n_classes, u[:n].tolist()))
            keys.append(u[n:])
        chosen = torch.tensor(rows, dtype=torch.long).view(len(task_ids), n)
        key = torch.stack(keys).view(len(task_ids), n, width)
        ids = classes[chosen]
        if uniform is None:  # never pick past the end of a smaller class
            size = self.counts[ids // ROTATIONS].unsqueeze(-1)
            key.masked_fill_(torch.arange(width) >= size, 2.0)
        # the `per` smallest keys in ascending order: argsort(key)[..., :per] (keys are distinct
        # float64 uniforms), found by topk at a fraction of a full sort's cost
        picks = key.topk(per, dim=-1, largest=False, sorted=True).indices
        return ids, picks

    def episode_classes(self, split: SplitName, task_ids: Sequence[int], seed: int) -> Tensor:
        """Class ids ``[T, N]`` (``4c + r``) of the given tasks; column ``j`` carries label ``j``."""
        return self._draw(split, task_ids, seed, self.episode_spec(split, task_ids, seed))[0]

    def sample(self, split: SplitName, task_ids: list[int], seed: int) -> TaskBatch:
        spec = self.episode_spec(split, task_ids, seed)
        return self.build(self._plan(split, task_ids, seed, spec, augment=split == "train"))

    def sample_spec(self, split: SplitName, task_ids: Sequence[int], seed: int, spec: EpisodeSpec) -> TaskBatch:
        """Tasks of a given spec, not augmented (the mixture datamodule draws specs itself)."""
        return self.build(self._plan(split, task_ids, seed, spec, augment=False))

    def plan(self, split: SplitName, task_ids: list[int], seed: int) -> EpisodePlan:
        """What the DataLoader hands over when episodes are built on the training device: the
        draws of :meth:`sample` (same generators, so ``build(plan(...))`` equals ``sample(...)``),
        with the ``uint8`` pixels gathered when ``transfer`` is ``uint8``."""
        plan = self._plan(split, task_ids, seed, self.episode_spec(split, task_ids, seed), augment=split == "train")
        if self.transfer == "uint8":
            k = plan.spec.shots
            plan.support_x = self._pixels(self.images, plan.index[:, :, :k], plan.rotation)
            plan.query_x = self._pixels(self.images, plan.index[:, :, k:], plan.rotation)
        return plan

    def _plan(self, split: SplitName, task_ids: Sequence[int], seed: int, spec: EpisodeSpec, augment: bool) -> EpisodePlan:
        ids, picks = self._draw(split, task_ids, seed, spec)
        index = self.table[(ids // ROTATIONS).unsqueeze(-1), picks]  # [T, N, K+Q] image indices
        rotation = ids % ROTATIONS if self.rotated(split) else None
        uniforms = None
        if augment and self.augment.active:
            uniforms = draw_uniforms(list(task_ids), spec.ways * (spec.shots + spec.queries), seed)
        return EpisodePlan(index, rotation, uniforms, spec, torch.tensor(list(task_ids), dtype=torch.long))

    def build(self, plan: EpisodePlan, images: Tensor | None = None) -> TaskBatch:
        """The episodes of a plan, on the device of the plan's tensors: pixels from the plan, or
        gathered from ``images`` (default: this sampler's own; the datamodule passes its copy on
        the training device), converted to float32, augmented with the plan's draws."""
        spec, t = plan.spec, len(plan)
        n, k, q = spec.ways, spec.shots, spec.queries
        if plan.support_x is None or plan.query_x is None:
            source = self.images if images is None else images
            # support and query are gathered separately so that each comes out contiguous
            support = self._pixels(source, plan.index[:, :, :k], plan.rotation)
            query = self._pixels(source, plan.index[:, :, k:], plan.rotation)
        else:
            support, query = plan.support_x, plan.query_x
        shape = support.shape[-3:]
        labels = torch.arange(n, device=plan.index.device)
        batch = TaskBatch(
            support_x=_to_float(support).view(t, n * k, *shape),
            support_y=labels.repeat_interleave(k).repeat(t, 1),
            query_x=_to_float(query).view(t, n * q, *shape),
            query_y=labels.repeat_interleave(q).repeat(t, 1),
            spec=spec,
            task_ids=plan.task_ids,
        )
        if plan.uniforms is not None:
            batch = augment_drawn(batch, self.augment, plan.uniforms, clamp=self.unit_range)
        return batch

    @staticmethod
    def _pixels(images: Tensor, index: Tensor, rotation: Tensor | None) -> Tensor:
        """Images ``[T, N, M, C, H, W]`` in their stored dtype, class ``[t, j]`` rotated by ``rotation[t, j]``."""
        x = _take(images, index)
        return x if rotation is None else _rotate(x, rotation)

    def flat_dataset(self, split: SplitName = "train") -> FlatClassDataset:
        """All images of a split's classes (rotated copies included when augmented), labelled."""
        return FlatClassDataset(self.images, self.table, self.counts, self.classes[split])


Range = tuple[int, int]


class EpisodeConfig(DataConfig):
    """Episode shapes for training and evaluation, variable shapes, and augmentation."""

    ways: int = Field(default=5, ge=1, description="N: classes per training episode")
    shots: int = Field(default=1, ge=1, description="K: support images per class in training episodes")
    queries: int = Field(default=15, ge=1, description="query images per class in training episodes")
    eval_ways: int | None = Field(default=None, ge=1, description="classes per validation/test episode (null: ways)")
    eval_shots: int | None = Field(default=None, ge=1, description="support images per class at validation/test (null: shots)")
    eval_queries: int | None = Field(default=None, ge=1, description="query images per class at validation/test (null: queries)")
    ways_range: Range | None = Field(
        default=None, description="[lo, hi]: training episodes draw their ways uniformly from lo..hi, one draw per meta-batch (null: ways)"
    )
    shots_range: Range | None = Field(
        default=None, description="[lo, hi]: training episodes draw their shots uniformly from lo..hi, one draw per meta-batch (null: shots)"
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="batched augmentation of training episodes")

    @model_validator(mode="after")
    def _check_ranges(self) -> "EpisodeConfig":
        for name in ("ways_range", "shots_range"):
            bounds = getattr(self, name)
            if bounds is not None and not 1 <= bounds[0] <= bounds[1]:
                raise ValueError(f"{name}={list(bounds)} must be [lo, hi] with 1 <= lo <= hi")
        return self

    @property
    def train_spec(self) -> EpisodeSpec:
        return EpisodeSpec(self.ways, self.shots, self.queries)

    @property
    def eval_spec(self) -> EpisodeSpec:
        return EpisodeSpec(
            self.eval_ways if self.eval_ways is not None else self.ways,
            self.eval_shots if self.eval_shots is not None else self.shots,
            self.eval_queries if self.eval_queries is not None else self.queries,
        )

    def episode_specs(self) -> EpisodeSpecs:
        """The spec of every task; training specs vary per meta-batch when a range is set."""
        return EpisodeSpecs(self.train_spec, self.eval_spec, self.ways_range, self.shots_range, self.meta_batch_size)

    @property
    def max_train_ways(self) -> int:
        """Ways of the widest training episode (the classifier head width of head-based learners)."""
        return self.ways_range[1] if self.ways_range else self.ways


class ClassificationConfig(EpisodeConfig):
    """Episode shapes for training and evaluation, class augmentation, image augmentation, and
    where episodes are built."""

    augment_rotations: RotationMode = Field(
        default="none",
        description="rotations by 90/180/270 degrees as new classes: none, train (meta-training classes) or all splits",
    )
    episode_transfer: EpisodeTransfer = Field(
        default="float",
        description="what the DataLoader hands to the training device: float (float32 episodes built in the loader), "
        "uint8 (the gathered uint8 pixels, 4x fewer bytes; conversion to float and augmentation run on the device "
        "after the transfer) or indices (the whole uint8 dataset is held on the device, in at most half its memory; "
        "the loader draws only image indices and augmentation draws, and gathering, conversion and augmentation run "
        "on the device, a meta-batch per call). All three give the same episodes",
    )


class ClassificationDataModule(EpisodicDataModule):
    """Base of image-classification datamodules: implement ``image_shape`` and ``load_classes``.

    ``default_model`` is the backbone a run switches to when ``data=NAME`` selects this
    datamodule on the command line without a ``model`` override (see :mod:`lightmeta.config`).
    """

    Config = ClassificationConfig
    config: ClassificationConfig
    default_model: ClassVar[dict[str, Any] | None] = {"name": "conv4"}

    def __init__(self, config: ClassificationConfig | dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__(config, seed)
        self._resident: Tensor | None = None  # the images on the training device (episode_transfer=indices)

    @abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image, known from the config alone (no data loading)."""

    @abstractmethod
    def load_classes(self) -> ClassImages:
        """Decoded images, the members of every class and the class splits (called once, in setup)."""

    def task_info(self) -> TaskInfo:
        return TaskInfo(
            problem="classification",
            in_shape=self.image_shape(),
            train_ways=self.config.max_train_ways,
            eval_ways=self.config.eval_spec.ways,
        )

    def build_sampler(self) -> ClassificationTasks:
        data = self.load_classes()
        got, want = tuple(data.images.shape[1:]), tuple(self.image_shape())
        if got != want:
            raise DataError(f"{type(self).__name__} loaded images of shape {got}, but image_shape() says {want}")
        c = self.config
        return ClassificationTasks(data, c.train_spec, c.eval_spec, c.augment_rotations, ways_range=c.ways_range,
                                   shots_range=c.shots_range, spec_group=c.meta_batch_size, augment=c.augment,
                                   transfer=c.episode_transfer)

    @property
    def tasks(self) -> ClassificationTasks:
        """The episode sampler (loads the data on first use)."""
        return cast(ClassificationTasks, self.sampler)

    def flat_train_dataset(self) -> FlatClassDataset:
        """The meta-training classes as a plain labelled dataset (for pre-training baselines)."""
        return self.tasks.flat_dataset("train")

    # ------------------------------------------------------------------ episodes built on the device
    def loader_sampler(self) -> TaskSampler:
        """The sampler itself (``episode_transfer=float``), or its :class:`EpisodePlan` view."""
        return self.sampler if self.config.episode_transfer == "float" else EpisodePlans(self.tasks)

    def setup(self, stage: str | None = None) -> None:
        """Load the data; with ``episode_transfer=indices`` also copy it to the training device
        now (each DDP rank to its own), so a dataset that does not fit fails before training."""
        super().setup(stage)
        if self.config.episode_transfer == "indices" and self.trainer is not None:
            self.resident_images(self.trainer.strategy.root_device)

    def resident_images(self, device: torch.device) -> Tensor:
        """The dataset's images held on ``device`` (copied once; CPU: the images themselves)."""
        if self._resident is None or self._resident.device != device:
            images = self.tasks.images
            capacity = device_memory_bytes(device)
            size = images.numel() * images.element_size()
            if capacity is not None and size > RESIDENT_FRACTION * capacity:
                raise ConfigError(
                    f"data.episode_transfer=indices holds the whole dataset on {device}, but its {size / 2**30:.2f} GiB of "
                    f"images exceed {RESIDENT_FRACTION:.0%} of the device's {capacity / 2**30:.2f} GiB; set "
                    "data.episode_transfer=uint8 (the loader gathers the images and sends them as uint8)"
                )
            self._resident = None  # release a copy on another device first
            self._resident = images.to(device)
        return self._resident

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Build :class:`EpisodePlan` batches on the device they were moved to (Lightning calls
        this on each rank after the transfer), then apply the trainer's input precision as
        Lightning does to every other batch before the transfer; other batches pass unchanged."""
        if not isinstance(batch, EpisodePlan):
            return batch
        images = self.resident_images(batch.index.device) if batch.support_x is None else None
        built = self.tasks.build(batch, images)
        trainer = self.trainer
        return trainer.precision_plugin.convert_input(built) if trainer is not None else built


class EpisodePlans(TaskSampler):
    """The DataLoaders' view of a :class:`ClassificationTasks` whose episodes are built on the
    training device: its items are :class:`EpisodePlan` objects (picklable: it travels to workers)."""

    def __init__(self, tasks: ClassificationTasks) -> None:
        self.tasks = tasks

    def sample(self, split: SplitName, task_ids: list[int], seed: int) -> EpisodePlan:  # type: ignore[override]
        return self.tasks.plan(split, task_ids, seed)
