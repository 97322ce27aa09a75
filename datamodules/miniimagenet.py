"""mini-ImageNet: Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra (2016), "Matching
Networks for One Shot Learning", NeurIPS, with the class split of Ravi & Larochelle (2017),
"Optimization as a Model for Few-Shot Learning", ICLR: 100 ImageNet classes, 600 images each,
84x84, split 64/16/20.

Licence: the images are ImageNet's (ILSVRC-2012), usable under the ImageNet terms of access
(non-commercial research and education); there is no official download of mini-ImageNet, so
the files must be put into ``data.root`` by hand, in one of the two forms in common use:

* **pickle form** (the MAML++/learn2learn release): ``mini-imagenet-cache-train.pkl``,
  ``mini-imagenet-cache-val.pkl`` (or ``...-validation.pkl``) and ``mini-imagenet-cache-test.pkl``,
  each a dict ``{'image_data': uint8 [N, 84, 84, 3], 'class_dict': {wnid: [row indices]}}``;
* **images + CSV form** (Ravi & Larochelle's release): ``train.csv``, ``val.csv``, ``test.csv``
  with columns ``filename,label`` (label: the class wnid) and the JPEGs in ``images/``.

``data.form`` picks one (``auto``: the pickles when all three are there, else the CSVs).
Pickles are read with :func:`lightmeta.source_files.load_pickle`, which rebuilds arrays and
containers only. Images are decoded once into ``<cache_dir>/miniimagenet-<form>-<size>px-<fp>.pt``
(class after class); JPEGs of another size are resized to ``data.image_size`` with Lanczos
filtering, ignoring the aspect ratio as Ravi & Larochelle's preprocessing does.

Split: ``splits/miniimagenet_ravi.json`` (the class lists of Ravi & Larochelle's CSVs);
``data.split_file`` may name another file in the same format.
"""
from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from lightmeta.datamodules._benchmark import BenchmarkConfig, BenchmarkDataModule, shipped_split
from lightmeta.errors import DataError
from lightmeta.image_cache import DecodedClasses, decode_all, file_loader, fingerprint, load_cache, save_cache
from lightmeta.registry import register_datamodule
from lightmeta.source_files import field, files_fingerprint, load_pickle

SPLITS = ("train", "val", "test")
#: split -> accepted pickle names (the first is the one written by :func:`write_example`)
PICKLES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
CSV_COLUMNS = ("filename", "label")
IMAGES = "images"
SIZE = 84
LAYOUT = ("mini-imagenet-cache-train.pkl, mini-imagenet-cache-val.pkl (or -validation.pkl) and mini-imagenet-cache-test.pkl "
          "(dicts 'image_data': uint8 [N, 84, 84, 3], 'class_dict': {wnid: [indices]}), or train.csv, val.csv and "
          "test.csv (columns filename,label) with the JPEGs in images/")
Form = Literal["auto", "pickle", "csv"]


class MiniImageNetConfig(BenchmarkConfig):
    root: str = Field(default="data/miniimagenet", description="folder with the mini-imagenet-cache-*.pkl files or train/val/test.csv + images/")
    form: Form = Field(default="auto", description="pickle, csv, or auto (the pickles when all three are present)")
    image_size: int = Field(default=SIZE, ge=8, description="side of the square images (84 keeps the benchmark's size)")


def _missing(root: Path, reason: str) -> DataError:
    return DataError(f"mini-ImageNet not found in {root} ({reason}); it has no official download: put {LAYOUT} "
                     "into that folder (data.root)")


def pickle_files(root: Path) -> dict[str, Path] | None:
    """The three pickles, or None when one is missing."""
    found = {}
    for split, names in PICKLES.items():
        path = next((root / n for n in names if (root / n).is_file()), None)
        if path is None:
            return None
        found[split] = path
    return found


def csv_files(root: Path) -> dict[str, Path] | None:
    """The three CSVs (with an ``images/`` folder), or None."""
    files = {split: root / f"{split}.csv" for split in SPLITS}
    return files if all(p.is_file() for p in files.values()) and (root / IMAGES).is_dir() else None


def choose_form(root: Path, form: Form) -> Literal["pickle", "csv"]:
    """The form to read: ``form`` itself, checked, or the one present (pickles first)."""
    has_pickles, has_csvs = pickle_files(root) is not None, csv_files(root) is not None
    if form == "pickle" and not has_pickles:
        raise _missing(root, "data.form=pickle but a mini-imagenet-cache-*.pkl file is missing")
    if form == "csv" and not has_csvs:
        raise _missing(root, "data.form=csv but train.csv, val.csv, test.csv or images/ is missing")
    if form == "auto":
        if not (has_pickles or has_csvs):
            raise _missing(root, "neither form is complete")
        return "pickle" if has_pickles else "csv"
    return form


# ---------------------------------------------------------------------- the pickle form
def read_pickles(files: dict[str, Path]) -> tuple[list[str], list[np.ndarray]]:
    """Class wnids (file after file, sorted within a file) and each class's ``uint8 [n, H, W, 3]`` images."""
    names: list[str] = []
    arrays: list[np.ndarray] = []
    where: dict[str, Path] = {}
    for split in SPLITS:
        path = files[split]
        what = "mini-ImageNet pickle"
        blob = load_pickle(path, what)
        images = field(blob, "image_data", path, what)
        class_dict = field(blob, "class_dict", path, what)
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            got = f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
            raise DataError(f"{path}: 'image_data' is {got}, expected uint8 [N, H, W, 3]")
        if not isinstance(class_dict, dict):
            raise DataError(f"{path}: 'class_dict' must map wnids to lists of row indices")
        for key in sorted(class_dict, key=str):
            wnid = key.decode() if isinstance(key, bytes) else str(key)
            rows = np.asarray(class_dict[key], dtype=np.int64).reshape(-1)
            if wnid in where:
                raise DataError(f"class {wnid} is in both {where[wnid].name} and {path.name}; the pickles must hold disjoint classes")
            if rows.size and (rows.min() < 0 or rows.max() >= len(images)):
                raise DataError(f"{path}: 'class_dict' rows of {wnid} point outside the {len(images)} images")
            where[wnid] = path
            names.append(wnid)
            arrays.append(images[rows])
    return names, arrays


def decode_pickles(files: dict[str, Path], size: int) -> DecodedClasses:
    names, arrays = read_pickles(files)
    counts = [len(a) for a in arrays]
    stacked = np.concatenate(arrays) if arrays else np.empty((0, size, size, 3), np.uint8)
    if stacked.shape[1:3] == (size, size):
        images = torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)))
    else:
        images, _ = decode_all(len(stacked), lambda i: (stacked[i], None), size, 3)
    return DecodedClasses(images, names, counts)


# ---------------------------------------------------------------------- the images + CSV form
def read_csvs(root: Path) -> tuple[list[str], list[list[Path]]]:
    """Class wnids (first appearance, CSV after CSV) and each class's image files (sorted)."""
    files = csv_files(root)
    assert files is not None
    members: dict[str, list[Path]] = {}
    for split in SPLITS:
        path = files[split]
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
                    raise DataError(f"{path} has columns {reader.fieldnames}, expected {','.join(CSV_COLUMNS)}")
                rows = [(r["filename"], r["label"]) for r in reader]
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is not a readable CSV ({type(exc).__name__}: {exc})") from None
        for filename, label in rows:
            image = root / IMAGES / filename
            if not image.is_file():
                raise DataError(f"{IMAGES}/{filename} listed in {path.name} is missing from {root}")
            members.setdefault(label, []).append(image)
    names = list(members)
    return names, [sorted(members[n]) for n in names]


def decode_csvs(root: Path, size: int) -> DecodedClasses:
    names, files = read_csvs(root)
    paths = [p for group in files for p in group]
    images, _ = decode_all(len(paths), file_loader(paths), size, 3)  # file_loader names a bad file
    return DecodedClasses(images, names, [len(g) for g in files])


def csv_fingerprint(root: Path) -> str:
    names, files = read_csvs(root)
    return fingerprint(files_fingerprint((root / f"{s}.csv" for s in SPLITS), root),
                       [(p.name, p.stat().st_size) for group in files for p in group])


# ---------------------------------------------------------------------- the cache
def miniimagenet_cache(root: str | Path, cache_dir: Path, image_size: int = SIZE, form: Form = "auto") -> Path:
    """Path of the decoded cache for the files in ``root``, building it first if needed."""
    root = Path(root).expanduser()
    chosen = choose_form(root, form)
    if chosen == "pickle":
        files = pickle_files(root)
        assert files is not None
        digest = files_fingerprint(files.values())
    else:
        digest = csv_fingerprint(root)
    cache = cache_dir / f"miniimagenet-{chosen}-{image_size}px-{digest}.pt"
    if not cache.is_file():
        data = decode_pickles(files, image_size) if chosen == "pickle" else decode_csvs(root, image_size)
        save_cache(cache, data)
    return cache


@register_datamodule("miniimagenet")
class MiniImageNetDataModule(BenchmarkDataModule):
    """mini-ImageNet few-shot classification (Ravi & Larochelle split, 64/16/20 classes)."""

    Config = MiniImageNetConfig
    config: MiniImageNetConfig
    split_name = "miniimagenet_ravi"

    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.config.image_size, self.config.image_size)

    def decoded(self) -> DecodedClasses:
        c = self.config
        return load_cache(miniimagenet_cache(c.root, self.cache_root(), c.image_size, c.form))

    @classmethod
    def example_config(cls, workdir: Path) -> dict[str, Any]:
        """The pickle form with every class of the shipped split, two images each."""
        root = write_example(Path(workdir) / "miniimagenet_example", images_per_class=2)
        return {"root": str(root), "cache_dir": str(Path(workdir) / "miniimagenet_cache"), "ways": 3, "shots": 1, "queries": 1}


def official_classes() -> dict[str, list[str]]:
    """The wnids of each split of the shipped Ravi & Larochelle split file."""
    blob = json.loads(shipped_split("miniimagenet_ravi").read_text())
    return {s: list(blob[s]) for s in SPLITS}


def write_example(root: Path, form: Literal["pickle", "csv"] = "pickle", images_per_class: int = 2, seed: int = 0,
                  jpeg_size: tuple[int, int] = (100, 90)) -> Path:
    """Write a small mini-ImageNet in one of its two on-disk forms, with the real class ids.

    ``pickle``: ``mini-imagenet-cache-{train,val,test}.pkl`` as dicts ``{'image_data': uint8
    [N, 84, 84, 3], 'class_dict': {wnid: [indices]}}``, classes interleaved in ``image_data``
    as the real files are not guaranteed to be sorted. ``csv``: ``{train,val,test}.csv``
    (``filename,label``, file names ``<wnid><8 digits>.jpg`` as Ravi & Larochelle's) and
    ``jpeg_size`` (width, height) JPEGs in ``images/``. Returns ``root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, classes in official_classes().items():
        if form == "pickle":
            order = [(w, k) for k in range(images_per_class) for w in classes]  # classes interleaved
            data = rng.integers(0, 256, (len(order), SIZE, SIZE, 3), dtype=np.uint8)
            class_dict = {w: [i for i, (v, _) in enumerate(order) if v == w] for w in classes}
            (root / PICKLES[split][0]).write_bytes(pickle.dumps({"image_data": data, "class_dict": class_dict}))
            continue
        (root / IMAGES).mkdir(exist_ok=True)
        lines = [",".join(CSV_COLUMNS)]
        for w in classes:
            for k in range(images_per_class):
                name = f"{w}{k + 1:08d}.jpg"
                pixels = rng.integers(0, 256, (jpeg_size[1], jpeg_size[0], 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                (root / IMAGES / name).write_bytes(buf.getvalue())
                lines.append(f"{name},{w}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root
