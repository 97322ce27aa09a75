"""tiered-ImageNet: Ren, Triantafillou, Ravi, Snell, Swersky, Tenenbaum, Larochelle & Zemel
(2018), "Meta-Learning for Semi-Supervised Few-Shot Classification", ICLR. 608 ImageNet
classes (779,165 images, 84x84) grouped under 34 high-level categories; the split is by
category, 20/6/8 categories = 351/97/160 classes, so meta-test classes are far from
meta-training ones.

Licence: the images are ImageNet's (ILSVRC-2012), usable under the ImageNet terms of access
(non-commercial research and education). There is no official download, so the files must be
put into ``data.root`` by hand, in one of two forms:

* **Ren et al.'s release**: ``{train,val,test}_images_png.pkl`` (a list of PNG-encoded images,
  each a ``uint8`` array of the PNG bytes) with ``{train,val,test}_labels.pkl``;
* **decompressed**: ``{train,val,test}_images.npz`` (array ``images``: ``uint8 [N, 84, 84, 3]``
  in BGR channel order, as Ren et al.'s ``decompress`` writes it with OpenCV) with the same
  ``*_labels.pkl``.

A labels pickle is a dict: ``label_specific`` (class index of every image), ``label_general``
(its category index), ``label_specific_str`` (class names) and ``label_general_str`` (category
names). Pickles are read with :func:`lightmeta.source_files.load_pickle` (arrays and
containers only); the ``.npz`` is streamed chunk by chunk.

The decoded images (16.5 GB at 84x84) do not fit in memory on most machines, so they are
written chunk by chunk into a memory-mapped cache (:mod:`lightmeta.mapped_cache`,
``<cache_dir>/tieredimagenet-<form>-<size>px-<fp>.npy`` + ``.json``), class after class;
episodes read only the pages of the images they gather.

Split: ``splits/tieredimagenet_ren.json`` lists each split's classes by the names the labels
pickles use (with their categories, and the synset ids of Ren et al.'s split CSVs);
``data.split_file`` may name another file in the same format.
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from lightmeta.datamodules._benchmark import BenchmarkConfig, BenchmarkDataModule, shipped_split
from lightmeta.errors import DataError
from lightmeta.image_cache import DecodedClasses, decode_all
from lightmeta.mapped_cache import load_mapped, save_mapped
from lightmeta.registry import register_datamodule
from lightmeta.source_files import field, files_fingerprint, load_pickle, npz_rows, npz_shape

SPLITS = ("train", "val", "test")
SIZE = 84
CHUNK = 8192  # images decoded and written per step
LAYOUT = ("{train,val,test}_labels.pkl with {train,val,test}_images_png.pkl (Ren et al.'s release) or "
          "{train,val,test}_images.npz (array 'images': uint8 [N, 84, 84, 3], BGR)")
Form = Literal["auto", "png", "npz"]


class TieredImageNetConfig(BenchmarkConfig):
    root: str = Field(default="data/tieredimagenet", description="folder with the *_labels.pkl and *_images_png.pkl (or *_images.npz) files")
    form: Form = Field(default="auto", description="png (Ren et al.'s *_images_png.pkl), npz (*_images.npz) or auto (npz when all three are present)")
    image_size: int = Field(default=SIZE, ge=8, description="side of the square images (84 keeps the benchmark's size)")


def _missing(root: Path, reason: str) -> DataError:
    return DataError(f"tiered-ImageNet not found in {root} ({reason}); it has no official download: put {LAYOUT} "
                     "into that folder (data.root)")


def image_file(root: Path, split: str, form: Literal["png", "npz"]) -> Path:
    return root / (f"{split}_images_png.pkl" if form == "png" else f"{split}_images.npz")


def choose_form(root: Path, form: Form) -> Literal["png", "npz"]:
    labels = [s for s in SPLITS if not (root / f"{s}_labels.pkl").is_file()]
    if labels:
        raise _missing(root, f"{labels[0]}_labels.pkl is missing")
    complete = {f: all(image_file(root, s, f).is_file() for s in SPLITS) for f in ("png", "npz")}
    if form == "auto":
        if not (complete["npz"] or complete["png"]):
            raise _missing(root, "neither the *_images_png.pkl nor the *_images.npz files are all there")
        return "npz" if complete["npz"] else "png"
    if not complete[form]:
        gone = next(s for s in SPLITS if not image_file(root, s, form).is_file())
        raise _missing(root, f"data.form={form} but {image_file(root, gone, form).name} is missing")
    return form


def read_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    """Class index of every image and the class names of one labels pickle."""
    what = "tiered-ImageNet labels pickle"
    blob = load_pickle(path, what)
    labels = np.asarray(field(blob, "label_specific", path, what)).reshape(-1)
    names = field(blob, "label_specific_str", path, what)
    if not isinstance(names, (list, tuple)) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'label_specific' must be integers and 'label_specific_str' a list of names")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(f"{path}: 'label_specific' holds indices outside the {len(names)} names of 'label_specific_str'")
    return labels.astype(np.int64), names


def plan(root: Path) -> tuple[list[str], list[int], dict[str, np.ndarray]]:
    """Class names (split after split, in label order), class counts, and for every split the
    cache row of each of its images (class after class, file order within a class)."""
    names: list[str] = []
    local: dict[str, np.ndarray] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        labels, split_names = read_labels(root / f"{split}_labels.pkl")
        for n in split_names:
            if n in seen:
                raise DataError(f"class '{n}' is in both {seen[n]}_labels.pkl and {split}_labels.pkl; the splits must be disjoint")
            seen[n] = split
        local[split] = labels + len(names)
        names.extend(split_names)
    counts = np.bincount(np.concatenate(list(local.values())), minlength=len(names))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rows: dict[str, np.ndarray] = {}
    for split, ids in local.items():
        order = np.argsort(ids, kind="stable")
        rank = np.empty(len(ids), dtype=np.int64)
        first = np.searchsorted(ids[order], ids[order])
        rank[order] = np.arange(len(ids)) - first
        rows[split] = starts[ids] + rank
    return names, counts.tolist(), rows


def _fill_npz(out: np.ndarray, path: Path, rows: np.ndarray, size: int) -> None:
    shape, dtype = npz_shape(path, "images")
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] != len(rows):
        raise DataError(f"{path}: 'images' is {dtype} {list(shape)}, expected uint8 [{len(rows)}, H, W, 3] "
                        "(one image per entry of the labels pickle)")
    done = 0
    for chunk in npz_rows(path, "images", CHUNK):
        rgb = chunk[..., ::-1]  # OpenCV wrote BGR
        if chunk.shape[1:3] == (size, size):
            pixels = rgb.transpose(0, 3, 1, 2)
        else:
            pixels = decode_all(len(rgb), lambda i: (np.ascontiguousarray(rgb[i]), None), size, 3)[0].numpy()
        out[rows[done : done + len(chunk)]] = pixels
        done += len(chunk)


def _fill_png(out: np.ndarray, path: Path, rows: np.ndarray, size: int) -> None:
    items = load_pickle(path, "tiered-ImageNet PNG pickle")
    if not isinstance(items, (list, tuple)) or len(items) != len(rows):
        count = len(items) if isinstance(items, (list, tuple)) else type(items).__name__
        raise DataError(f"{path} holds {count} images, but its labels pickle labels {len(rows)}")

    def load(i: int) -> tuple[Image.Image, None]:
        try:
            image = Image.open(io.BytesIO(np.asarray(items[i], dtype=np.uint8).tobytes()))
            image.load()
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad data
            raise DataError(f"image {i} of {path} is not a readable PNG ({type(exc).__name__}: {exc}); "
                            "replace the file with the original") from None
        return image, None

    for start in range(0, len(items), CHUNK):
        stop = min(start + CHUNK, len(items))
        pixels, _ = decode_all(stop - start, lambda i: load(start + i), size, 3)
        out[rows[start:stop]] = pixels.numpy()


def tieredimagenet_cache(root: str | Path, cache_dir: Path, image_size: int = SIZE, form: Form = "auto") -> Path:
    """Stem of the memory-mapped cache for the files in ``root``, building it first if needed."""
    root = Path(root).expanduser()
    chosen = choose_form(root, form)
    files = [p for s in SPLITS for p in (root / f"{s}_labels.pkl", image_file(root, s, chosen))]
    stem = cache_dir / f"tieredimagenet-{chosen}-{image_size}px-{files_fingerprint(files)}"
    if stem.with_suffix(".json").is_file():
        return stem
    names, counts, rows = plan(root)

    def fill(out: np.ndarray) -> None:
        for split in SPLITS:
            filler = _fill_npz if chosen == "npz" else _fill_png
            filler(out, image_file(root, split, chosen), rows[split], image_size)

    save_mapped(stem, names, counts, (3, image_size, image_size), fill, extra={"form": chosen})
    return stem


@register_datamodule("tieredimagenet")
class TieredImageNetDataModule(BenchmarkDataModule):
    """tiered-ImageNet few-shot classification (Ren et al. split, 351/97/160 classes), memory-mapped."""

    Config = TieredImageNetConfig
    config: TieredImageNetConfig
    split_name = "tieredimagenet_ren"

    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.config.image_size, self.config.image_size)

    def decoded(self) -> DecodedClasses:
        c = self.config
        stem = tieredimagenet_cache(c.root, self.cache_root(), c.image_size, c.form)
        data = load_mapped(stem)
        if data is None:
            raise DataError(f"the tiered-ImageNet cache {stem}.npy vanished while loading; run again to rebuild it")
        return data

    @classmethod
    def example_config(cls, workdir: Path) -> dict[str, Any]:
        """Ren et al.'s PNG-pickle form with every class of the shipped split, two images each."""
        root = write_example(Path(workdir) / "tieredimagenet_example", images_per_class=2)
        return {"root": str(root), "cache_dir": str(Path(workdir) / "tieredimagenet_cache"), "ways": 3, "shots": 1, "queries": 1}


def official_classes() -> dict[str, list[tuple[str, str]]]:
    """``(class, category)`` names of each split of the shipped split file, in its order."""
    blob = json.loads(shipped_split("tieredimagenet_ren").read_text())
    parent = {c: g for s in SPLITS for g, members in blob["categories"][s].items() for c in members}
    return {s: [(c, parent[c]) for c in blob[s]] for s in SPLITS}


def write_example(root: Path, forms: tuple[str, ...] = ("png",), images_per_class: int = 2, seed: int = 0,
                  size: int = SIZE) -> Path:
    """Write a small tiered-ImageNet with the real class and category names in Ren et al.'s
    formats: ``{split}_labels.pkl`` and, per ``forms``, ``{split}_images_png.pkl`` (a list of
    PNG byte arrays) and/or ``{split}_images.npz`` (``images``, BGR). Images of a split are
    shuffled across classes, as nothing guarantees the real files are sorted. Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, classes in official_classes().items():
        categories = list(dict.fromkeys(g for _, g in classes))
        specific = np.repeat(np.arange(len(classes)), images_per_class)
        rng.shuffle(specific)
        general = np.array([categories.index(classes[k][1]) for k in specific], dtype=np.int64)
        labels = {"label_specific": specific.astype(np.int64), "label_general": general,
                  "label_specific_str": [c for c, _ in classes], "label_general_str": categories}
        (root / f"{split}_labels.pkl").write_bytes(pickle.dumps(labels))
        pixels = rng.integers(0, 256, (len(specific), size, size, 3), dtype=np.uint8)
        if "png" in forms:
            encoded = []
            for image in pixels:
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="PNG", compress_level=1)
                encoded.append(np.frombuffer(buf.getvalue(), dtype=np.uint8).reshape(-1, 1))
            (root / f"{split}_images_png.pkl").write_bytes(pickle.dumps(encoded))
        if "npz" in forms:
            np.savez(root / f"{split}_images.npz", images=np.ascontiguousarray(pixels[..., ::-1]))
    return root
