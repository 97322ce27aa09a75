"""FC100: the super-class split on a CIFAR-100 archive in the official format (download,
checksum and extraction are shared with CIFAR-FS and tested in test_cifarfs.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightmeta.datamodules import _cifar100 as cifar
from lightmeta.datamodules._benchmark import shipped_split
from lightmeta.datamodules.fc100 import FC100DataModule
from lightmeta.errors import DataError


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fc100_src")
    cifar.write_example(folder, train_per_class=3, test_per_class=1)
    return folder


def datamodule(root: Path, cache: Path, seed: int = 0, **cfg: object) -> FC100DataModule:
    dm = FC100DataModule({"root": str(root), "cache_dir": str(cache), "download": False, "ways": 5, "shots": 2,
                          "queries": 2, **cfg}, seed=seed)
    dm.setup("fit")
    return dm


def test_split_is_by_superclass(root: Path, tmp_path: Path) -> None:
    dm = datamodule(root, tmp_path / "cache")
    names = dm.decoded().names
    split = dm.splits(names)
    assert {s: len(v) for s, v in split.items()} == {"train": 60, "val": 20, "test": 20}
    parent = cifar.superclasses(dm.cache_path())
    supers = {s: {parent[c] for c in v} for s, v in split.items()}
    assert {s: len(v) for s, v in supers.items()} == {"train": 12, "val": 4, "test": 4}
    assert supers["test"] == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    assert not (supers["train"] & supers["val"] or supers["train"] & supers["test"] or supers["val"] & supers["test"])
    # the archive's coarse labels, not the split file, decide the hierarchy: 5 classes per super-class
    assert all(sum(p == s for p in parent.values()) == 5 for s in set(parent.values()))
    ids = dm.tasks.episode_classes("val", list(range(30)), 0)
    assert {parent[names[c // 4]] for c in ids.flatten().tolist()} <= supers["val"]


def test_episodes(root: Path, tmp_path: Path) -> None:
    dm = datamodule(root, tmp_path / "cache", meta_batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (3, 10, 3, 32, 32) and batch.query_x.shape == (3, 10, 3, 32, 32)
    again = datamodule(root, tmp_path / "cache", meta_batch_size=3)
    assert torch.equal(batch.support_x, next(iter(again.train_dataloader())).support_x)
    assert dm.task_info().in_shape == (3, 32, 32)


def test_a_split_that_cuts_a_superclass_is_refused(root: Path, tmp_path: Path) -> None:
    blob = json.loads(shipped_split("fc100_oreshkin").read_text())
    moved = blob["superclasses"]["test"]["people"][0]  # 'baby' leaves its super-class's split
    blob["test"].remove(moved)
    blob["train"].append(moved)
    bad = tmp_path / "cut.json"
    bad.write_text(json.dumps(blob))
    with pytest.raises(DataError, match=r"the 'train' split's classes are not exactly those of its super-classes .*'baby' is in "
                                        r"the archive's super-class 'people'"):
        datamodule(root, tmp_path / "cache", split_file=str(bad))
    plain = tmp_path / "plain.json"  # a user split without 'superclasses' is taken as it is
    plain.write_text(json.dumps({s: blob[s] for s in ("train", "val", "test")}))
    assert len(datamodule(root, tmp_path / "cache", split_file=str(plain)).tasks.classes["train"]) == 61
