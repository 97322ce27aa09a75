"""tiered-ImageNet in Ren et al.'s formats (PNG pickles or BGR .npz, with the labels pickles)
and every class of the shipped split: decoding, the memory-mapped cache, splits, episodes."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightmeta import classification
from lightmeta.datamodules import tieredimagenet as tiered
from lightmeta.errors import DataError
from lightmeta.mapped_cache import MappedImages, load_mapped


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 608 classes, 2 images each, in both image forms."""
    return tiered.write_example(tmp_path_factory.mktemp("tiered"), forms=("png", "npz"), images_per_class=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiered_cache")


def datamodule(root: Path, cache: Path, seed: int = 0, **cfg: object) -> tiered.TieredImageNetDataModule:
    dm = tiered.TieredImageNetDataModule({"root": str(root), "cache_dir": str(cache), "ways": 5, "shots": 1, "queries": 1,
                                          "meta_batch_size": 2, **cfg}, seed=seed)
    dm.setup("fit")
    return dm


def test_fixture_has_ren_et_al_s_layout(root: Path) -> None:
    assert sorted(p.name for p in root.iterdir()) == sorted(
        f"{s}_{kind}" for s in ("train", "val", "test") for kind in ("labels.pkl", "images_png.pkl", "images.npz"))
    labels = pickle.loads((root / "val_labels.pkl").read_bytes())
    assert set(labels) == {"label_specific", "label_general", "label_specific_str", "label_general_str"}
    assert len(labels["label_specific_str"]) == 97 and len(labels["label_general_str"]) == 6
    png = pickle.loads((root / "val_images_png.pkl").read_bytes())
    assert len(png) == 194 and png[0].dtype == np.uint8 and bytes(png[0][:8].ravel()) == b"\x89PNG\r\n\x1a\n"
    assert np.load(root / "val_images.npz")["images"].shape == (194, 84, 84, 3)


def test_png_and_npz_forms_decode_to_the_same_rgb_pixels(root: Path, cache: Path) -> None:
    png, npz = datamodule(root, cache, form="png"), datamodule(root, cache, form="npz")
    a, b = png.decoded(), npz.decoded()
    assert a.names == b.names and a.counts == b.counts == [2] * 608 and a.images.shape == (1216, 3, 84, 84)
    assert torch.equal(a.images, b.images)
    labels = pickle.loads((root / "test_labels.pkl").read_bytes())
    images = pickle.loads((root / "test_images_png.pkl").read_bytes())
    k = int(np.flatnonzero(labels["label_specific"] == 7)[0])  # an image of the test split's class 7
    with Image.open(io.BytesIO(images[k].tobytes())) as im:
        expected = torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy())
    row = a.names.index(labels["label_specific_str"][7])
    assert any(torch.equal(expected, a.images[2 * row + j]) for j in range(2))
    bgr = np.load(root / "test_images.npz")["images"][k]
    assert torch.equal(expected, torch.from_numpy(bgr[..., ::-1].transpose(2, 0, 1).copy()))
    assert datamodule(root, cache).decoded().images.path == b.images.path  # auto picks the npz files


def test_cache_is_a_memory_mapped_npy_and_is_reused(root: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = datamodule(root, cache, form="png")
    data = dm.decoded()
    assert isinstance(data.images, MappedImages) and data.images.path.endswith(".npy")
    stem = Path(data.images.path).with_suffix("")
    mapped = np.load(data.images.path, mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.shape == (1216, 3, 84, 84)
    monkeypatch.setattr(tiered, "plan", lambda *a: pytest.fail("decoded again although the cache exists"))
    assert torch.equal(load_mapped(stem).images, data.images)
    stem.with_suffix(".json").unlink()  # an incomplete cache (no index) is rebuilt
    monkeypatch.undo()
    rebuilt = datamodule(root, cache, form="png").decoded()
    assert torch.equal(rebuilt.images, data.images) and stem.with_suffix(".json").is_file()


def test_the_engine_indexes_the_mapping_and_pickles_only_its_path(root: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    in_ram = datamodule(root, cache, form="npz")  # small enough to be converted to float32 at setup
    monkeypatch.setattr(classification, "FLOAT_BUDGET_BYTES", 0)  # as the real 16.5 GB: stays mapped uint8
    mapped = datamodule(root, cache, form="npz")
    assert isinstance(mapped.tasks.images, MappedImages) and not isinstance(in_ram.tasks.images, MappedImages)
    a, b = in_ram.tasks.sample("train", [0, 1, 2], 4), mapped.tasks.sample("train", [0, 1, 2], 4)
    assert type(b.support_x) is torch.Tensor and b.support_x.dtype == torch.float32
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    blob = pickle.dumps(mapped.tasks)
    assert len(blob) < 100_000 < mapped.tasks.images.numel()  # the path travels, not the pixels
    clone = pickle.loads(blob)
    assert isinstance(clone.images, MappedImages)
    assert torch.equal(clone.sample("test", [5], 0).query_x, mapped.tasks.sample("test", [5], 0).query_x)


def test_streaming_the_npz_in_small_chunks_changes_nothing(root: Path, tmp_path: Path, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiered, "CHUNK", 50)
    small = datamodule(root, tmp_path / "cache", form="npz").decoded()
    assert torch.equal(small.images, datamodule(root, cache, form="npz").decoded().images)


def test_split_sizes_and_categories(root: Path, cache: Path) -> None:
    dm = datamodule(root, cache)
    assert {s: len(c) for s, c in dm.tasks.classes.items()} == {"train": 351, "val": 97, "test": 160}
    official = tiered.official_classes()
    assert {s: len({g for _, g in v}) for s, v in official.items()} == {"train": 20, "val": 6, "test": 8}
    names = dm.tasks.class_names
    test_classes = {c for c, _ in official["test"]}
    ids = dm.tasks.episode_classes("test", list(range(40)), 0)
    assert {names[c // 4] for c in ids.flatten().tolist()} <= test_classes
    batch = next(iter(dm.val_dataloader()))
    assert batch.support_x.shape[1:] == (5, 3, 84, 84) and batch.query_y.shape[1] == 5


def test_missing_files_are_named_in_one_line(root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"tiered-ImageNet not found in .*train_labels.pkl is missing.*no official download: put "
                                        r"\{train,val,test\}_labels.pkl with \{train,val,test\}_images_png.pkl .* or "
                                        r"\{train,val,test\}_images.npz") as err:
        datamodule(tmp_path / "nothing", tmp_path / "cache")
    assert "\n" not in str(err.value)
    partial = tmp_path / "partial"
    partial.mkdir()
    for p in root.glob("*_labels.pkl"):
        (partial / p.name).symlink_to(p)
    (partial / "train_images_png.pkl").symlink_to(root / "train_images_png.pkl")
    with pytest.raises(DataError, match="data.form=png but val_images_png.pkl is missing"):
        datamodule(partial, tmp_path / "cache", form="png")


def test_inconsistent_files_are_named(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in root.iterdir():
        (copy / p.name).symlink_to(p)
    images = pickle.loads((root / "val_images_png.pkl").read_bytes())
    (copy / "val_images_png.pkl").unlink()
    (copy / "val_images_png.pkl").write_bytes(pickle.dumps(images[:-1]))
    with pytest.raises(DataError, match="val_images_png.pkl holds 193 images, but its labels pickle labels 194"):
        datamodule(copy, tmp_path / "cache", form="png")
    images[3] = np.frombuffer(b"not a png at all", dtype=np.uint8)
    (copy / "val_images_png.pkl").write_bytes(pickle.dumps(images))
    with pytest.raises(DataError, match="image 3 of .*val_images_png.pkl is not a readable PNG"):
        datamodule(copy, tmp_path / "cache", form="png")
    labels = pickle.loads((root / "test_labels.pkl").read_bytes())
    labels["label_specific_str"][0] = pickle.loads((root / "train_labels.pkl").read_bytes())["label_specific_str"][0]
    (copy / "test_labels.pkl").unlink()
    (copy / "test_labels.pkl").write_bytes(pickle.dumps(labels))
    with pytest.raises(DataError, match="class 'Yorkshire terrier' is in both train_labels.pkl and test_labels.pkl"):
        datamodule(copy, tmp_path / "cache", form="npz")
