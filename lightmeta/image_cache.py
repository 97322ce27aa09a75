"""Decode images once into a ``uint8`` tensor cache; the base of datamodules built on one.

:class:`CachedClassesDataModule` is the base of the "any images" datamodules (the image
folder and the torchvision bridge). A subclass says how to list its images and how to load
image ``i`` (:meth:`~CachedClassesDataModule.source`); the base

* decodes every image once (PIL, to ``channels`` x ``image_size`` x ``image_size``, Lanczos
  filtering; ``resize: stretch`` ignores the aspect ratio as mini-ImageNet's 84x84 images do,
  ``resize: crop`` scales the shorter side and cuts the centre), in a process pool where
  ``fork`` is available, into ``<cache_dir>/<prefix>-<fingerprint>.pt``, written atomically
  and loaded memory-mapped; an unreadable image raises :class:`DataError` naming it;
* splits the classes by a split file, by the source's own split (folders per split), or by
  a seeded ratio, writes the split next to the cache and copies it into the run directory.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from abc import abstractmethod
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator

from lightmeta.class_splits import (
    DEFAULT_RATIO,
    Splits,
    check_ratio,
    class_indices,
    keep_with_run,
    ratio_split,
    read_split_file,
    run_dir_of,
    write_split_file,
)
from lightmeta.classification import ClassificationConfig, ClassificationDataModule, ClassImages
from lightmeta.download import atomic_write
from lightmeta.errors import DataError

CACHE_VERSION = 1
ResizeMode = Literal["stretch", "crop"]
#: one item: an image (PIL, ``HxW``/``HxWxC`` uint8 array or ``CxHxW`` tensor) and its label (or None)
Loader = Callable[[int], tuple[Any, int | None]]
PARALLEL_MIN_ITEMS = 2000
CHUNK = 256


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightmeta`` or ``~/.cache/lightmeta`` (where Omniglot caches too)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightmeta"


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        array = image.numpy()
        array = array[0] if array.ndim == 3 and array.shape[0] == 1 else array.transpose(1, 2, 0) if array.ndim == 3 else array
        return Image.fromarray(np.ascontiguousarray(array))
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise TypeError(f"expected a PIL image, array or tensor, got {type(image).__name__}")


def to_array(image: Any, size: int, channels: int, resize: ResizeMode = "stretch") -> np.ndarray:
    """``uint8 [channels, size, size]`` of one image (converted to L or RGB, then resized)."""
    im = _as_pil(image).convert("RGB" if channels == 3 else "L")
    if im.size != (size, size):
        if resize == "crop":
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.LANCZOS)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        else:
            im = im.resize((size, size), Image.Resampling.LANCZOS)
    array = np.asarray(im, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def file_loader(paths: Sequence[Path]) -> Loader:
    """A loader of image files; a file PIL cannot decode raises :class:`DataError` naming it."""
    def load(i: int) -> tuple[Image.Image, None]:
        path = paths[i]
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy(), None
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            raise DataError(f"corrupt or unreadable image {path} ({type(exc).__name__}: {exc}); remove or replace it") from None
    return load


_LOADER: Loader | None = None  # the loader of the running decode; forked workers inherit it
_DESCRIBE: Callable[[int], str] | None = None  # names item i in errors; inherited likewise (need not pickle)


def _decode_range(start: int, stop: int, size: int, channels: int, resize: ResizeMode) -> tuple[np.ndarray, list[int | None]]:
    assert _LOADER is not None
    describe = _DESCRIBE
    out = np.empty((stop - start, channels, size, size), dtype=np.uint8)
    labels: list[int | None] = []
    for k, i in enumerate(range(start, stop)):
        image, label = _LOADER(i)
        try:
            out[k] = to_array(image, size, channels, resize)
        except Exception as exc:
            where = describe(i) if describe else f"item {i}"
            raise DataError(f"cannot decode {where} ({type(exc).__name__}: {exc}); remove or replace it") from None
        labels.append(label)
    return out, labels


def decode_all(n: int, loader: Loader, size: int, channels: int, resize: ResizeMode = "stretch",
               processes: int | None = None, describe: Callable[[int], str] | None = None) -> tuple[torch.Tensor, list[int | None]]:
    """Decode items ``0..n-1`` into ``uint8 [n, channels, size, size]`` and their labels, in order.

    Uses a ``fork`` process pool for ``n >= PARALLEL_MIN_ITEMS`` (or when ``processes`` > 1 is
    given); the workers inherit ``loader`` and ``describe``, so neither need be picklable.
    """
    global _LOADER, _DESCRIBE
    bounds = [(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]
    if processes is None:
        processes = min(os.cpu_count() or 1, 8) if n >= PARALLEL_MIN_ITEMS else 1
    processes = min(processes, len(bounds))
    _LOADER, _DESCRIBE = loader, describe
    try:
        if processes > 1 and "fork" in multiprocessing.get_all_start_methods():
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
                futures = [pool.submit(_decode_range, a, b, size, channels, resize) for a, b in bounds]
                parts = [f.result() for f in futures]
        else:
            parts = [_decode_range(a, b, size, channels, resize) for a, b in bounds]
    finally:
        _LOADER = _DESCRIBE = None
    if not parts:
        return torch.empty(0, channels, size, size, dtype=torch.uint8), []
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    return images, [label for p in parts for label in p[1]]


@dataclass
class DecodedClasses:
    """A decoded cache: images stored class after class, ``counts[c]`` images of class ``names[c]``."""

    images: torch.Tensor
    names: list[str]
    counts: list[int]


def save_cache(path: Path, data: DecodedClasses) -> None:
    try:
        with atomic_write(path) as tmp:
            torch.save({"version": CACHE_VERSION, "images": data.images, "names": data.names, "counts": data.counts}, tmp)
    except OSError as exc:
        raise DataError(f"cannot write the image cache {path} ({exc.strerror}); set data.cache_dir to a writable folder") from None


def load_cache(path: Path) -> DecodedClasses:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        data = DecodedClasses(blob["images"], list(blob["names"]), [int(c) for c in blob["counts"]])
    except Exception as exc:
        raise DataError(f"the image cache {path} is unreadable ({type(exc).__name__}); delete it to rebuild") from None
    if data.images.dtype != torch.uint8 or data.images.ndim != 4 or sum(data.counts) != data.images.shape[0]:
        raise DataError(f"the image cache {path} is inconsistent; delete it to rebuild")
    return data


def fingerprint(*parts: Any) -> str:
    """Short digest of JSON-able parts (what the cache depends on)."""
    h = hashlib.sha1(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class CachedClassesConfig(ClassificationConfig):
    """Decoding and class-split settings shared by the "any images" datamodules."""

    image_size: int = Field(default=84, ge=8, description="side of the square images after resizing")
    channels: Literal[1, 3] = Field(default=3, description="3: RGB, 1: greyscale")
    resize: ResizeMode = Field(default="stretch", description="stretch: resize to a square ignoring the aspect ratio; crop: scale the shorter side, cut the centre")
    split_file: str | None = Field(default=None, description="JSON with 'train', 'val', 'test' lists of class names (null: the data's own split or split_ratio)")
    split_ratio: tuple[float, float, float] | None = Field(default=None, description=f"train/val/test class fractions of a seeded random split (null: {list(DEFAULT_RATIO)})")
    split_seed: int = Field(default=0, ge=0, description="seed of the split_ratio split")
    cache_dir: str | None = Field(default=None, description="folder of the decoded cache and split files (null: $XDG_CACHE_HOME/lightmeta or ~/.cache/lightmeta)")

    @field_validator("split_ratio")
    @classmethod
    def _ratio(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        return None if value is None else check_ratio(value)


class CachedClassesDataModule(ClassificationDataModule):
    """Images decoded once to a tensor cache, classes split by file, by the source or by ratio."""

    Config = CachedClassesConfig
    config: CachedClassesConfig

    def __init__(self, config: Any = None, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.split_path: Path | None = None

    # ------------------------------------------------------------------ subclass contract
    @abstractmethod
    def cache_key(self) -> tuple[str, str]:
        """``(prefix, fingerprint)`` of the cache file: what the decoded images depend on."""

    @abstractmethod
    def decode(self) -> DecodedClasses:
        """Decode every image, class after class (called when there is no cache)."""

    def source_splits(self, names: list[str]) -> Splits | None:
        """The data's own split (e.g. one folder per split), or None."""
        return None

    @property
    def plugin_name(self) -> str:
        """The registered name (the class name for unregistered subclasses)."""
        return getattr(type(self), "registered_name", type(self).__name__.lower())

    # ------------------------------------------------------------------ the cache
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.image_size, self.config.image_size)

    def cache_root(self) -> Path:
        return Path(self.config.cache_dir).expanduser() if self.config.cache_dir else default_cache_dir()

    def cache_path(self) -> Path:
        c = self.config
        prefix, digest = self.cache_key()
        return self.cache_root() / f"{prefix}-{c.image_size}px-{c.channels}ch-{c.resize}-{digest}.pt"

    def build_cache(self) -> Path:
        path = self.cache_path()
        if not path.is_file():
            save_cache(path, self.decode())
        return path

    def prepare_data(self) -> None:
        """Decode once per node, before the ranks load the cache in ``setup``."""
        self.build_cache()

    # ------------------------------------------------------------------ the split
    def choose_split(self, names: list[str], cache: Path) -> Splits:
        """By ``split_file``, else the source's own split, else a seeded ratio; written next to the cache."""
        c = self.config
        own = self.source_splits(names)
        name = self.plugin_name
        if c.split_file:
            splits = read_split_file(c.split_file, names)
            source = f"data.split_file={c.split_file}"
        elif own is not None:
            if c.split_ratio is not None:
                raise DataError(f"{name}: the data comes split into train/val/test already; "
                                "remove data.split_ratio (or set data.split_file to re-split it)")
            splits, source = own, "the data's own train/val/test split"
        else:
            ratio = c.split_ratio or DEFAULT_RATIO
            splits = ratio_split(names, ratio, c.split_seed)
            source = (f"seeded random split: ratio {list(ratio)} (train, val, test), seed {c.split_seed}, over the "
                      "sorted class names (lightmeta.class_splits.ratio_split)")
        tag = fingerprint(source, splits)[:8]
        self.split_path = write_split_file(cache.with_name(f"{cache.stem}-split-{tag}.json"), splits, name, source)
        return splits

    def load_classes(self) -> ClassImages:
        cache = self.build_cache()
        data = load_cache(cache)
        splits = self.choose_split(data.names, cache)
        return ClassImages.from_counts(data.images, data.counts, class_indices(splits, data.names), class_names=data.names)

    def setup(self, stage: str | None = None) -> None:
        """Build the sampler, then keep a copy of the class split in the run directory."""
        super().setup(stage)
        run_dir = run_dir_of(self)
        if run_dir is not None and self.split_path is not None:
            keep_with_run(self.split_path, run_dir, f"{self.plugin_name}_split.json")
