"""torchvision bridge: any torchvision classification dataset becomes an episodic datamodule.

``data.dataset`` names a class of ``torchvision.datasets`` (``EMNIST``, ``Flowers102``,
``CIFAR100``, ``FakeData``, ``ImageFolder``...) or any ``package.module:Class`` whose items
are ``(image, class index)``. It is constructed once per entry of ``data.partitions``, with
``data.kwargs`` plus that entry (``root=data.root`` is added when the class takes a
``root``), and the partitions are concatenated: few-shot benchmarks pool a dataset's official
train and test images and split the *classes* instead, e.g. CIFAR-100's 600 images per class::

    data=torchvision data.dataset=CIFAR100 data.root=~/data \\
        'data.partitions=[{train: true}, {train: false}]' data.image_size=32
    data=torchvision data.dataset=EMNIST data.kwargs.split=balanced \\
        'data.partitions=[{train: true}, {train: false}]' data.channels=1 data.image_size=28
    data=torchvision data.dataset=Flowers102 \\
        'data.partitions=[{split: train}, {split: val}, {split: test}]'

(EMNIST's images come out transposed, as torchvision stores them; episodes do not care.)
Downloads are torchvision's own (``data.kwargs.download=true``); a dataset that is missing
fails with one line naming the class, its arguments and the fix.

Every image is decoded once to ``data.channels`` x ``data.image_size``² ``uint8`` into
``<cache_dir>/torchvision-<Dataset>-...-<fingerprint>.pt``; the fingerprint covers the class,
root, kwargs, partitions and decoding settings, not the files: delete the cache after
replacing the files under ``data.root``. Classes are named by the dataset's ``classes`` list
(else by their index) and split by ``data.split_file`` or a seeded ``data.split_ratio``; the
split is written next to the cache and copied into the run directory as
``torchvision_split.json``.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from lightmeta.errors import ConfigError, DataError
from lightmeta.image_cache import CachedClassesConfig, CachedClassesDataModule, DecodedClasses, decode_all, fingerprint
from lightmeta.registry import did_you_mean, register_datamodule


class TorchvisionConfig(CachedClassesConfig):
    """Which dataset class, built how; decoding and split settings from :class:`CachedClassesConfig`."""

    dataset: str = Field(description="a torchvision.datasets class name (EMNIST, Flowers102, CIFAR100, ...) or package.module:Class")
    root: str = Field(default="data/torchvision", description="passed as root= to datasets that take one")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor arguments of every partition, e.g. {split: balanced, download: true}")
    partitions: list[dict[str, Any]] = Field(
        default_factory=lambda: [{}], min_length=1,
        description="one dataset per entry (its arguments added to kwargs), concatenated, e.g. [{train: true}, {train: false}]",
    )
    image_size: int = Field(default=32, ge=8, description="side of the square images after resizing")


def dataset_class(name: str) -> type:
    """``torchvision.datasets.<name>`` or an imported ``package.module:Class``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"data.dataset={name!r} cannot be imported ({exc}); use package.module:Class") from None
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not isinstance(cls, type):
        names = sorted(n for n in dir(tvd) if isinstance(getattr(tvd, n), type) and not n.startswith("_"))
        raise ConfigError(f"data.dataset={name!r} is not a torchvision.datasets class{did_you_mean(name, names)}; "
                          "give a class name such as CIFAR100 or package.module:Class")
    return cls


def _label(target: Any) -> int | None:
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        return int(target)
    if isinstance(target, torch.Tensor) and target.numel() == 1 and not target.is_floating_point():
        return int(target.item())
    return None


@register_datamodule("torchvision")
class TorchvisionDataModule(CachedClassesDataModule):
    """Any torchvision classification dataset (EMNIST, Flowers102, CIFAR100, ...) with a class split."""

    Config = TorchvisionConfig
    config: TorchvisionConfig

    def _arguments(self, partition: dict[str, Any], cls: type) -> dict[str, Any]:
        args = {**self.config.kwargs, **partition}
        try:
            takes_root = "root" in inspect.signature(cls).parameters
        except (TypeError, ValueError):
            takes_root = False
        if takes_root and "root" not in args:
            args["root"] = str(Path(self.config.root).expanduser())
        return args

    def datasets(self) -> list[Any]:
        """One dataset per partition."""
        name = self.config.dataset
        cls = dataset_class(name)
        out = []
        for partition in self.config.partitions:
            args = self._arguments(partition, cls)
            try:
                out.append(cls(**args))
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise DataError(f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())}) failed "
                                f"({type(exc).__name__}: {first}); put its files under data.root or set "
                                "data.kwargs.download=true") from None
        return out

    def cache_key(self) -> tuple[str, str]:
        c = self.config
        cls = dataset_class(c.dataset)
        args = [self._arguments(p, cls) for p in c.partitions]
        tag = c.dataset.replace(":", "-").replace(".", "-")
        return f"torchvision-{tag}", fingerprint("torchvision", c.dataset, args)

    def decode(self) -> DecodedClasses:
        c = self.config
        parts = self.datasets()
        offsets = np.cumsum([0, *(len(d) for d in parts)])

        def where(i: int) -> tuple[int, int]:
            p = int(np.searchsorted(offsets, i, side="right")) - 1
            return p, i - int(offsets[p])

        def describe(i: int) -> str:
            p, j = where(i)
            return f"item {j} of {c.dataset} partition {p} ({c.partitions[p]})"

        def load(i: int) -> tuple[Any, int | None]:
            p, j = where(i)
            try:
                item = parts[p][j]
            except Exception as exc:
                raise DataError(f"cannot read {describe(i)} ({type(exc).__name__}: {exc}); check the files under data.root") from None
            label = _label(item[1]) if isinstance(item, (tuple, list)) and len(item) >= 2 else None
            if label is None:
                raise DataError(f"{describe(i)} is not an (image, class index) pair; the torchvision bridge "
                                "needs a classification dataset")
            return item[0], label

        images, labels = decode_all(int(offsets[-1]), load, c.image_size, c.channels, c.resize, describe=describe)
        y = torch.tensor(labels, dtype=torch.long)
        order = torch.argsort(y, stable=True)
        present, counts = torch.unique_consecutive(y[order], return_counts=True)
        names = self._class_names(parts[0], present.tolist())
        return DecodedClasses(images[order].contiguous(), names, counts.tolist())

    @staticmethod
    def _class_names(dataset: Any, labels: list[int]) -> list[str]:
        """``dataset.classes[label]`` when that list names every label uniquely, else the indices."""
        classes = getattr(dataset, "classes", None)
        if isinstance(classes, (list, tuple)) and labels and max(labels) < len(classes):
            names = [str(classes[label]) for label in labels]
            if len(set(names)) == len(names):
                return names
        return [str(label) for label in labels]

    @classmethod
    def example_config(cls, workdir: Path) -> dict[str, Any]:
        """``torchvision.datasets.FakeData``: 12 classes, 96 RGB 20x20 images (at least 4 per class), split 6/3/3."""
        return {"dataset": "FakeData", "kwargs": {"size": 96, "image_size": [3, 20, 20], "num_classes": 12},
                "image_size": 16, "split_ratio": [0.5, 0.25, 0.25], "cache_dir": str(Path(workdir) / "torchvision_cache"),
                "ways": 3, "shots": 1, "queries": 2}
