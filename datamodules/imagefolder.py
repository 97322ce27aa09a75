"""ImageFolder: any folder of images with one sub-folder per class, the "bring your own data" path.

Layouts of ``data.root`` (the torchvision ``ImageFolder`` convention)::

    root/<class>/<image>                   one tree; classes split by data.split_file or a seeded ratio
    root/{train,val,test}/<class>/<image>  one tree per split; classes are named "<split>/<class>"

A class folder's images are found recursively (sub-folders belong to the class); hidden files
and folders (``.name``) and files directly in a split or the root are ignored; an image is any
file with an extension in :data:`IMAGE_EXTENSIONS`. A class folder without images is an error.

Splits: ``data.split_file`` (JSON lists ``train``, ``val``, ``test`` of class names as above),
else the per-split folders, else a seeded random split by ``data.split_ratio`` (default
64/16/20 %, mini-ImageNet's proportions) with ``data.split_seed``. The split used is written
next to the cache and copied into the run directory as ``imagefolder_split.json``; pass that
file as ``data.split_file`` to reuse it.

Decoding: every image once, to ``data.channels`` x ``data.image_size``² ``uint8`` (default
RGB 84x84), into ``<cache_dir>/imagefolder-...-<fingerprint>.pt``; the fingerprint covers the
relative path, size and modification time of every image and the decoding settings, so
adding, removing or editing an image rebuilds the cache. A file PIL cannot read fails with an
error naming it. No download: the data is yours.

Run it: ``python -m lightmeta fit data=imagefolder data.root=PATH algorithm=protonet``.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field

from lightmeta.class_splits import SPLIT_NAMES, Splits
from lightmeta.errors import DataError
from lightmeta.image_cache import CachedClassesConfig, CachedClassesDataModule, DecodedClasses, decode_all, file_loader, fingerprint
from lightmeta.registry import register_datamodule

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


class ImageFolderConfig(CachedClassesConfig):
    """Where the images are; decoding and split settings come from :class:`CachedClassesConfig`."""

    root: str = Field(description="folder with one sub-folder of images per class (or train/, val/, test/ folders of class folders)")


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_images(folder: Path) -> list[Path]:
    """The images of one class folder, recursively, in sorted order (hidden entries skipped)."""
    found: list[Path] = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(here) / f for f in sorted(files)
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return found


def list_classes(root: Path) -> tuple[dict[str, list[Path]], Splits | None]:
    """Images of every class, and the per-split folders' split when the root has that layout."""
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder; point it at a folder with one sub-folder of images per class")
    top = _visible_dirs(root)
    names = {d.name for d in top}
    classes: dict[str, list[Path]] = {}
    splits: Splits | None = None
    if "train" in names and ("val" in names or "test" in names):
        missing = [s for s in SPLIT_NAMES if s not in names]
        if missing:
            raise DataError(f"{root} looks split into folders (train/ and {'val/' if 'val' in names else 'test/'}) "
                            f"but has no {', '.join(m + '/' for m in missing)}; add it or use one class tree")
        splits = {}
        for split in SPLIT_NAMES:
            members = _visible_dirs(root / split)
            splits[split] = [f"{split}/{d.name}" for d in members]
            classes.update({f"{split}/{d.name}": class_images(d) for d in members})
    else:
        classes = {d.name: class_images(d) for d in top}
    if not classes:
        raise DataError(f"{root} has no class folders; put the images of each class in their own sub-folder, root/<class>/<image>")
    empty = [c for c, files in classes.items() if not files]
    if empty:
        raise DataError(f"class folder {root / empty[0]} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                        "remove it or add images")
    return classes, splits


@register_datamodule("imagefolder")
class ImageFolderDataModule(CachedClassesDataModule):
    """Any root/<class>/<image> tree (or one per split): bring your own data."""

    Config = ImageFolderConfig
    config: ImageFolderConfig

    def __init__(self, config: Any = None, seed: int = 0) -> None:
        super().__init__(config, seed)
        self._listing: tuple[dict[str, list[Path]], Splits | None] | None = None

    @property
    def root(self) -> Path:
        return Path(self.config.root).expanduser()

    def listing(self) -> tuple[dict[str, list[Path]], Splits | None]:
        if self._listing is None:
            self._listing = list_classes(self.root)
        return self._listing

    def cache_key(self) -> tuple[str, str]:
        classes, splits = self.listing()
        entries = []
        for name, files in classes.items():
            for f in files:
                st = f.stat()
                entries.append((name, f.relative_to(self.root).as_posix(), st.st_size, st.st_mtime_ns))
        return "imagefolder", fingerprint("imagefolder", splits is not None, entries)

    def decode(self) -> DecodedClasses:
        classes, _ = self.listing()
        files = [f for fs in classes.values() for f in fs]
        images, _ = decode_all(len(files), file_loader(files), self.config.image_size, self.config.channels,
                               self.config.resize, describe=lambda i: str(files[i]))
        return DecodedClasses(images, list(classes), [len(fs) for fs in classes.values()])

    def source_splits(self, names: list[str]) -> Splits | None:
        return self.listing()[1]

    @classmethod
    def example_config(cls, workdir: Path) -> dict[str, Any]:
        """A 12-class folder (PNG and JPEG, RGB and greyscale, mixed sizes) split 6/3/3 by ratio."""
        root = write_example(Path(workdir) / "imagefolder_example")
        return {"root": str(root), "image_size": 16, "split_ratio": [0.5, 0.25, 0.25], "cache_dir": str(Path(workdir) / "imagefolder_cache"),
                "ways": 3, "shots": 1, "queries": 2}


def example_image(class_id: int, index: int, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> Image.Image:
    """A deterministic image: a class colour with a bright square whose place depends on ``index``."""
    w, h = size
    colour = ((37 * class_id) % 200 + 20, (91 * class_id) % 200 + 20, (53 * class_id) % 200 + 20)
    array = np.empty((h, w, 3), dtype=np.uint8)
    array[:] = colour
    top, left = (3 * index) % max(1, h - 4), (5 * index) % max(1, w - 4)
    array[top : top + 4, left : left + 4] = 255
    array[:, : class_id % w + 1, 0] = 255 - array[:, : class_id % w + 1, 0]
    return Image.fromarray(array).convert(mode)


def write_example(root: Path, classes: int = 12, per_class: int = 6, split_folders: bool = False) -> Path:
    """Write ``root/<class>/<image>`` (or ``root/<split>/<class>/<image>``): PNG and JPEG files,
    RGB, greyscale and palette images of two sizes, one nested sub-folder per class."""
    root.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        split = SPLIT_NAMES[0 if c < classes // 2 else 1 if c < 3 * classes // 4 else 2]
        folder = (root / split if split_folders else root) / f"class_{c:03d}"
        (folder / "more").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mode = ("RGB", "L", "P")[i % 3]
            size = (20, 16) if i % 2 else (24, 24)
            image = example_image(c, i, size, mode)
            fmt, ext = ("JPEG", "jpg") if i % 4 == 3 and mode != "P" else ("PNG", "png")
            buf = io.BytesIO()
            image.save(buf, format=fmt)
            target = folder / ("more" if i == per_class - 1 else "") / f"img_{i:03d}.{ext}"
            target.write_bytes(buf.getvalue())
    (root / "README.txt").write_text("example image folder written by lightmeta.datamodules.imagefolder.write_example\n")
    return root

