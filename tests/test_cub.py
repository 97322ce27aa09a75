"""CUB-200-2011 from an archive in the official layout (all 200 species): download, checksum,
tar extraction, bounding-box crops, uneven class sizes, the split rule, episodes."""
from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
import torch

from lightmeta.datamodules import cub
from lightmeta.datamodules._benchmark import shipped_split
from lightmeta.class_splits import read_split_file
from lightmeta.download import ChecksumError
from lightmeta.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cub.write_example(tmp_path_factory.mktemp("cub_src"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cub.write_example(tmp_path_factory.mktemp("cub_dir"), archive=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded cache of ``folder`` for the tests that only read it."""
    return tmp_path_factory.mktemp("cub_cache")


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch, archive: Path) -> Path:
    monkeypatch.setattr(cub, "SOURCES", {cub.ARCHIVE: (archive.as_uri(), hashlib.md5(archive.read_bytes()).hexdigest())})
    return archive


def datamodule(root: Path, cache: Path, seed: int = 0, **cfg: object) -> cub.CUBDataModule:
    dm = cub.CUBDataModule({"root": str(root), "cache_dir": str(cache), "ways": 5, "shots": 1, "queries": 1,
                            "meta_batch_size": 2, **cfg}, seed=seed)
    dm.setup("fit")
    return dm


def test_fixture_has_the_official_layout(archive: Path) -> None:
    with tarfile.open(archive) as tf:
        names = set(tf.getnames())
    assert {"attributes.txt", *(f"CUB_200_2011/{f}" for f in cub.INDEX_FILES)} <= names
    assert "CUB_200_2011/images/001.Black_footed_Albatross/Black_footed_Albatross_0001_0.jpg" in names
    assert sum(n.endswith(".jpg") for n in names) == 500


def test_download_extract_crop_and_cache(served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    dm = datamodule(root, cache)
    assert sorted(p.name for p in root.iterdir()) == sorted([cub.ARCHIVE, cub.FOLDER, "attributes.txt"])
    data = dm.decoded()
    assert data.images.shape == (500, 3, 84, 84) and data.counts == [2, 3] * 100
    assert data.names[:2] == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    # the crop keeps the box: its colour fills the image; uncropped, the surround shows
    colour = torch.tensor(cub.BOX_COLOUR, dtype=torch.float32).view(3, 1, 1)
    cropped = data.images.float()
    inside = (cropped - colour).abs().amax(dim=1) < 40
    assert inside.float().mean() > 0.65
    whole = datamodule(root, cache, crop="none").decoded().images.float()
    assert ((whole - colour).abs().amax(dim=1) < 40).float().mean() < 0.3
    monkeypatch.setattr(cub, "decode_all", lambda *a, **k: pytest.fail("decoded again although the cache exists"))
    assert torch.equal(datamodule(root, cache).decoded().images, data.images)


def test_checksum_mismatch_and_offline_errors(served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cub.SOURCES, cub.ARCHIVE, (served.as_uri(), "f" * 32))
    with pytest.raises(ChecksumError, match="checksum mismatch for CUB_200_2011.tgz"):
        datamodule(tmp_path / "root", tmp_path / "cache")
    assert list((tmp_path / "root").iterdir()) == []
    monkeypatch.setitem(cub.SOURCES, cub.ARCHIVE, ("http://127.0.0.1:9/CUB_200_2011.tgz", "f" * 32))
    with pytest.raises(DataError, match=r"CUB-200-2011 not found .*cannot download.*put CUB_200_2011\.tgz .* or the "
                                        r"CUB_200_2011/ folder .* images\.txt, image_class_labels\.txt, classes\.txt, "
                                        r"bounding_boxes\.txt and images/<class>/<image>\.jpg") as err:
        datamodule(tmp_path / "root", tmp_path / "cache")
    assert "\n" not in str(err.value)


def test_split_is_the_documented_rule(folder: Path, cache: Path) -> None:
    dm = datamodule(folder.parent, cache, download=False)
    names = dm.decoded().names
    shipped = read_split_file(shipped_split("cub_chen"), names)
    assert shipped == cub.split_rule(names)
    assert {s: len(v) for s, v in shipped.items()} == {"train": 100, "val": 50, "test": 50}
    assert {s: len(c) for s, c in dm.tasks.classes.items()} == {"train": 100, "val": 50, "test": 50}
    assert shipped["val"][0] == "002.Laysan_Albatross" and shipped["test"][0] == "004.Groove_billed_Ani"


def test_episodes_with_uneven_classes(folder: Path, cache: Path) -> None:
    dm = datamodule(folder.parent, cache, download=False, shots=1, queries=1, eval_shots=1, eval_queries=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 5, 3, 84, 84) and batch.query_x.shape == (2, 5, 3, 84, 84)
    again = datamodule(folder.parent, cache, download=False)
    assert torch.equal(batch.query_x, next(iter(again.train_dataloader())).query_x)
    other = datamodule(folder.parent, cache, download=False, seed=3)
    assert not torch.equal(batch.query_x, next(iter(other.train_dataloader())).query_x)
    with pytest.raises(ConfigError, match="exceeds the 2 images"):
        datamodule(folder.parent, cache, download=False, shots=2, queries=1)


def test_damaged_index_and_images_are_named(folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy" / cub.FOLDER
    copy.mkdir(parents=True)
    for p in folder.iterdir():
        (copy / p.name).symlink_to(p)
    lines = (folder / "bounding_boxes.txt").read_text().splitlines()
    (copy / "bounding_boxes.txt").unlink()
    (copy / "bounding_boxes.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match=r"bounding_boxes.txt has no line for image 500 \(200.Common_Yellowthroat/"):
        datamodule(copy.parent, tmp_path / "cache", download=False)
    (copy / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    (copy / "images").unlink()
    (copy / "images").mkdir()
    with pytest.raises(DataError, match=r"images/001.Black_footed_Albatross/Black_footed_Albatross_0001_0.jpg listed in .* is missing"):
        datamodule(copy.parent, tmp_path / "cache", download=False)
    for p in (folder / "images").iterdir():
        (copy / "images" / p.name).symlink_to(p)
    bad = copy / "images" / "003.Sooty_Albatross"
    bad.unlink()
    bad.mkdir()
    for p in (folder / "images" / "003.Sooty_Albatross").iterdir():
        (bad / p.name).write_bytes(p.read_bytes()[:100])  # truncated JPEGs
    with pytest.raises(DataError, match=r"corrupt or unreadable image .*003.Sooty_Albatross/Sooty_Albatross_0006_0.jpg"):
        datamodule(copy.parent, tmp_path / "cache", download=False)
