"""CIFAR-100 from the official python archive: the source of CIFAR-FS and FC100.

CIFAR-100 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images";
https://www.cs.toronto.edu/~kriz/cifar.html): 60,000 32x32 colour images, 600 in each of 100
classes ("fine" labels) grouped into 20 super-classes ("coarse" labels). The page asks users
to cite the report; no further licence terms are stated. The few-shot benchmarks pool the
archive's training and test images (600 per class) and split the *classes*.

Data. ``data.root`` holds ``cifar-100-python.tar.gz`` or the ``cifar-100-python/`` folder it
extracts to (``train``, ``test``, ``meta``). A missing archive is downloaded from the official
URL, its MD5 checked, and extracted with no path escapes. The files are Python pickles:
``train``/``test`` hold ``data`` (``uint8 [N, 3072]``, the red, green and blue planes of each
32x32 image), ``fine_labels`` and ``coarse_labels``; ``meta`` holds ``fine_label_names`` and
``coarse_label_names`` (keys are bytes or str depending on how a file was pickled; both are
accepted). They are read with :func:`lightmeta.source_files.load_pickle`, which rebuilds
arrays and containers only.

Decoding: all 60,000 images go once into ``<cache_dir>/cifar100-<fingerprint>.pt`` (class
after class, classes in fine-label order), next to ``<...>.classes.json`` with each class's
super-class. The fingerprint covers the three files (names, sizes, first and last 64 KiB).
"""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from lightmeta.datamodules._benchmark import BenchmarkConfig, BenchmarkDataModule, shipped_split
from lightmeta.download import atomic_write, fetch_archive
from lightmeta.errors import DataError
from lightmeta.image_cache import DecodedClasses, load_cache, save_cache
from lightmeta.source_files import field, files_fingerprint, load_pickle

ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
#: archive name -> (official URL, official MD5); tests point this at local fixtures
SOURCES: dict[str, tuple[str, str]] = {
    ARCHIVE: ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
SIZE = 32
CLASSES, SUPERCLASSES = 100, 20
LAYOUT = (f"{ARCHIVE} (from https://www.cs.toronto.edu/~kriz/cifar.html) or the {FOLDER}/ folder it extracts to, "
          "holding the pickles train, test and meta")


class Cifar100Config(BenchmarkConfig):
    root: str = Field(default="data/cifar100", description=f"folder holding {ARCHIVE} or {FOLDER}/")
    download: bool = Field(default=True, description="download the official archive when it is not in root")


def _missing(root: Path, reason: str) -> DataError:
    return DataError(f"CIFAR-100 not found in {root} ({reason}); put {LAYOUT} into that folder (data.root)")


def locate(root: Path, allow_download: bool = True) -> Path:
    """The extracted ``cifar-100-python`` folder, extracting or downloading the archive if needed."""
    return fetch_archive(root, FOLDER, ARCHIVE, SOURCES[ARCHIVE], FILES, lambda reason: _missing(root, reason),
                         allow_download, "CIFAR-100 python")


def _names(values: Any, path: Path, key: str) -> list[str]:
    if not isinstance(values, (list, tuple)):
        raise DataError(f"{path}: '{key}' must be a list of names")
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_archive(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """Images ``uint8 [N, 3, 32, 32]`` (train then test), fine and coarse labels, fine and coarse names."""
    meta_path = folder / "meta"
    meta = load_pickle(meta_path, "CIFAR-100 meta pickle")
    fine_names = _names(field(meta, "fine_label_names", meta_path, "CIFAR-100 meta"), meta_path, "fine_label_names")
    coarse_names = _names(field(meta, "coarse_label_names", meta_path, "CIFAR-100 meta"), meta_path, "coarse_label_names")
    if len(fine_names) != CLASSES or len(coarse_names) != SUPERCLASSES:
        raise DataError(f"{meta_path} names {len(fine_names)} classes and {len(coarse_names)} super-classes; "
                        f"CIFAR-100 has {CLASSES} and {SUPERCLASSES}: replace it with the official file")
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        path = folder / part
        blob = load_pickle(path, f"CIFAR-100 {part} pickle")
        data = np.asarray(field(blob, "data", path, f"CIFAR-100 {part} pickle"))
        f = np.asarray(field(blob, "fine_labels", path, f"CIFAR-100 {part} pickle"), dtype=np.int64)
        c = np.asarray(field(blob, "coarse_labels", path, f"CIFAR-100 {part} pickle"), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIZE * SIZE:
            raise DataError(f"{path}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 [N, {3 * SIZE * SIZE}]")
        if not (len(f) == len(c) == len(data)):
            raise DataError(f"{path} has {len(data)} images but {len(f)} fine and {len(c)} coarse labels")
        if len(f) and (f.min() < 0 or f.max() >= CLASSES or c.min() < 0 or c.max() >= SUPERCLASSES):
            raise DataError(f"{path} has labels outside 0..{CLASSES - 1} (fine) or 0..{SUPERCLASSES - 1} (coarse)")
        images.append(data.reshape(-1, 3, SIZE, SIZE))
        fine.append(f)
        coarse.append(c)
    return np.concatenate(images), np.concatenate(fine), np.concatenate(coarse), fine_names, coarse_names


def cifar100_cache(root: str | Path, cache_dir: Path, allow_download: bool = True) -> Path:
    """Path of the decoded cache for the archive in ``root``, building it first if needed."""
    folder = locate(Path(root).expanduser(), allow_download)
    cache = cache_dir / f"cifar100-{files_fingerprint(folder / f for f in FILES)}.pt"
    hierarchy = cache.with_suffix(".classes.json")
    if cache.is_file() and hierarchy.is_file():
        return cache
    images, fine, coarse, fine_names, coarse_names = read_archive(folder)
    order = np.argsort(fine, kind="stable")
    counts = np.bincount(fine, minlength=CLASSES)
    superclass: dict[str, str] = {}
    for k, name in enumerate(fine_names):
        parents = np.unique(coarse[fine == k])
        if len(parents) > 1:
            raise DataError(f"{folder}: class '{name}' has images under {len(parents)} super-classes; replace the archive with the official one")
        if len(parents):
            superclass[name] = coarse_names[int(parents[0])]
    save_cache(cache, DecodedClasses(torch.from_numpy(np.ascontiguousarray(images[order])), fine_names, counts.tolist()))
    try:
        with atomic_write(hierarchy) as tmp:
            tmp.write_text(json.dumps({"superclass": superclass}))
    except OSError as exc:
        raise DataError(f"cannot write {hierarchy} ({exc.strerror}); set data.cache_dir to a writable folder") from None
    return cache


def superclasses(cache: Path) -> dict[str, str]:
    """Class name -> super-class name, as recorded next to the cache."""
    path = cache.with_suffix(".classes.json")
    try:
        return dict(json.loads(path.read_text())["superclass"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is unreadable ({type(exc).__name__}); delete {cache.name} and it to rebuild") from None


class Cifar100DataModule(BenchmarkDataModule):
    """Few-shot classification over the 100 CIFAR-100 classes (32x32 RGB), split by a split file."""

    Config = Cifar100Config
    config: Cifar100Config
    split_name: ClassVar[str]

    def image_shape(self) -> tuple[int, int, int]:
        return (3, SIZE, SIZE)

    def cache_path(self) -> Path:
        return cifar100_cache(self.config.root, self.cache_root(), self.config.download)

    def decoded(self) -> DecodedClasses:
        return load_cache(self.cache_path())

    @classmethod
    def example_config(cls, workdir: Path) -> dict[str, Any]:
        """A CIFAR-100 archive in the official format (every class, 2 + 1 images) to extract."""
        root = Path(workdir) / "cifar100_example"
        write_example(root)
        return {"root": str(root), "cache_dir": str(Path(workdir) / "cifar100_cache"), "download": False,
                "ways": 3, "shots": 1, "queries": 1}


def official_hierarchy() -> dict[str, list[str]]:
    """Super-class -> classes of CIFAR-100, from the shipped FC100 split file (whose classes
    are whole super-classes)."""
    blob = json.loads(shipped_split("fc100_oreshkin").read_text())
    return {coarse: list(fine) for split in ("train", "val", "test") for coarse, fine in blob["superclasses"][split].items()}


def write_example(root: Path, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> Path:
    """Write ``root/cifar-100-python.tar.gz`` in the official layout: the pickles ``train``,
    ``test`` and ``meta`` (bytes keys ``b'data'``, ``b'fine_labels'``, ``b'coarse_labels'``,
    ``b'fine_label_names'``, ``b'coarse_label_names'``...) under ``cifar-100-python/``, with the
    real class and super-class names in their official (alphabetical) order and random pixels."""
    hierarchy = official_hierarchy()
    coarse_names = sorted(hierarchy)
    fine_names = sorted(f for fine in hierarchy.values() for f in fine)
    parent = {f: coarse_names.index(c) for c, fine in hierarchy.items() for f in fine}
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {
        "meta": pickle.dumps({b"fine_label_names": [n.encode() for n in fine_names],
                              b"coarse_label_names": [n.encode() for n in coarse_names]}),
    }
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(CLASSES), per_class)
        rng.shuffle(fine)
        members[part] = pickle.dumps({
            b"batch_label": f"{part} batch 1 of 1".encode(),
            b"filenames": [f"{fine_names[k]}_{i}.png".encode() for i, k in enumerate(fine)],
            b"fine_labels": fine.tolist(),
            b"coarse_labels": [parent[fine_names[k]] for k in fine],
            b"data": rng.integers(0, 256, (len(fine), 3 * SIZE * SIZE), dtype=np.uint8),
        })
    root.mkdir(parents=True, exist_ok=True)
    archive = root / ARCHIVE
    with tarfile.open(archive, "w:gz") as tf:
        for name, payload in [*members.items(), ("file.txt~", b"")]:
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return archive
