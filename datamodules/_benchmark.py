"""What the standard benchmark datamodules share (mini-/tiered-ImageNet, CIFAR-FS, FC100, CUB).

Each benchmark decodes its source files once into a ``uint8`` cache (class after class) and
splits the classes by a split file shipped in ``splits/`` that cites its source; a user may
name another split file in the same format (``data.split_file``). A subclass implements
:meth:`BenchmarkDataModule.decoded` (build the cache if needed, return it memory-mapped) and
names its shipped split file; the base reads the split, checks it names only classes the data
has, and hands the classes to the episodic engine.
"""
from __future__ import annotations

from abc import abstractmethod
from importlib import resources
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from lightmeta.class_splits import Splits, class_indices, read_split_file
from lightmeta.classification import ClassificationConfig, ClassificationDataModule, ClassImages
from lightmeta.image_cache import DecodedClasses, default_cache_dir


def shipped_split(name: str) -> Path:
    """Path of a split file shipped in ``lightmeta/datamodules/splits``."""
    return Path(str(resources.files("lightmeta.datamodules").joinpath("splits", f"{name}.json")))


class BenchmarkConfig(ClassificationConfig):
    """Where the data and the decoded cache live, and which split file to use."""

    root: str = Field(default="data", description="folder holding the dataset's files")
    split_file: str | None = Field(default=None, description="a split JSON ('train', 'val', 'test' class lists) instead of the shipped one")
    cache_dir: str | None = Field(default=None, description="folder of the decoded cache (null: $XDG_CACHE_HOME/lightmeta or ~/.cache/lightmeta)")


class BenchmarkDataModule(ClassificationDataModule):
    """A benchmark with a decoded cache and a shipped split file (``split_name``)."""

    Config = BenchmarkConfig
    config: BenchmarkConfig
    split_name: ClassVar[str]

    @abstractmethod
    def decoded(self) -> DecodedClasses:
        """The decoded images (class after class), names and counts; builds the cache if needed."""

    def cache_root(self) -> Path:
        return Path(self.config.cache_dir).expanduser() if self.config.cache_dir else default_cache_dir()

    def root(self) -> Path:
        return Path(self.config.root).expanduser()

    def split_path(self) -> Path:
        return Path(self.config.split_file).expanduser() if self.config.split_file else shipped_split(self.split_name)

    def splits(self, names: list[str]) -> Splits:
        """The class split, checked against the classes the data holds."""
        return read_split_file(self.split_path(), names)

    def prepare_data(self) -> None:
        """Download and decode once per node, before the ranks map the cache in ``setup``."""
        self.decoded()

    def load_classes(self) -> ClassImages:
        data = self.decoded()
        splits = self.splits(data.names)
        return ClassImages.from_counts(data.images, data.counts, class_indices(splits, data.names), class_names=data.names)
