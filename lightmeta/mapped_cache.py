"""Decoded-image caches for datasets that do not fit in memory: a raw ``.npy``, memory-mapped.

:mod:`lightmeta.image_cache` writes ``torch.save`` caches, which need the whole tensor in
memory once. tiered-ImageNet at 84x84 is 16.5 GB of ``uint8``, so its cache is written chunk by
chunk straight into a memory-mapped ``<stem>.npy`` (space reserved up front, so a full disk is
an error rather than a crash) and described by ``<stem>.json`` (class names and counts),
written last: a cache without its ``.json`` is incomplete and gets rebuilt. Both files are
written atomically (:func:`lightmeta.download.atomic_write`).

Loading maps the file (:class:`MappedImages`): the episode sampler's ``index_select`` reads
only the pages of the images it gathers, and a pickled :class:`MappedImages` (e.g. a sampler
sent to a spawned DataLoader worker) carries the file path, not the pixels.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lightmeta.download import atomic_write
from lightmeta.errors import DataError
from lightmeta.image_cache import DecodedClasses

CACHE_VERSION = 1


class MappedImages(torch.Tensor):
    """A ``uint8`` tensor backed by a memory-mapped ``.npy``; operations on it return plain
    tensors, and pickling it records the file path only (the receiver maps the file again).

    The mapping is copy-on-write: writes to the tensor stay in this process, the file is never
    modified.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    path: str

    @staticmethod
    def open(path: str | Path) -> "MappedImages":
        try:
            array = np.load(path, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"the image cache {path} is unreadable ({type(exc).__name__}: {exc}); delete it to rebuild") from None
        images = torch.Tensor._make_subclass(MappedImages, torch.from_numpy(array))
        images.path = str(path)
        return images

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (MappedImages.open, (self.path,))


def _reserve(path: Path, nbytes: int) -> None:
    """Allocate the file's blocks now, so running out of disk raises here, not as SIGBUS later."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # the filesystem cannot reserve: write sparse
            return
        raise DataError(f"cannot reserve {nbytes / 2**30:.1f} GiB for the image cache {path} ({exc.strerror}); "
                        "free disk space or set data.cache_dir to a larger disk") from None
    finally:
        os.close(fd)


def save_mapped(stem: Path, names: Sequence[str], counts: Sequence[int], image_shape: Sequence[int],
                fill: Callable[[np.ndarray], None], extra: dict[str, Any] | None = None) -> Path:
    """Write ``<stem>.npy`` (``uint8 [sum(counts), *image_shape]``, filled in place by ``fill``)
    and then ``<stem>.json``; returns the ``.npy`` path. Images are stored class after class."""
    images_path, meta_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    shape = (int(sum(counts)), *(int(s) for s in image_shape))
    try:
        with atomic_write(images_path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            _reserve(tmp, out.offset + out.nbytes)
            fill(out)
            out.flush()
            del out
        meta = {"version": CACHE_VERSION, "shape": list(shape), "names": list(names), "counts": [int(c) for c in counts],
                **(extra or {})}
        with atomic_write(meta_path) as tmp:
            tmp.write_text(json.dumps(meta))
    except OSError as exc:
        raise DataError(f"cannot write the image cache {images_path} ({exc.strerror}); set data.cache_dir to a writable folder") from None
    return images_path


def load_mapped(stem: Path) -> DecodedClasses | None:
    """The cache at ``stem`` memory-mapped, or None when it is missing or incomplete."""
    images_path, meta_path = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if not (images_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        names, counts, shape = list(meta["names"]), [int(c) for c in meta["counts"]], tuple(meta["shape"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"the image cache index {meta_path} is unreadable ({type(exc).__name__}); delete it to rebuild") from None
    images = MappedImages.open(images_path)
    if meta.get("version") != CACHE_VERSION or tuple(images.shape) != shape or images.dtype != torch.uint8 \
            or sum(counts) != shape[0] or len(names) != len(counts):
        raise DataError(f"the image cache {images_path} does not match its index {meta_path.name}; delete both to rebuild")
    return DecodedClasses(images, names, counts)
