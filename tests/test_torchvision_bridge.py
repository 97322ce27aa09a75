"""The torchvision bridge: EMNIST files written on disk in torchvision's raw format, FakeData in memory."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from lightmeta.datamodules.torchvision_bridge import TorchvisionDataModule
from lightmeta.errors import ConfigError, DataError

EPISODE = {"ways": 3, "shots": 1, "queries": 2, "split_ratio": [0.5, 0.25, 0.25]}
CLASSES, TRAIN, TEST = 12, 4, 2


def emnist_image(label: int, k: int) -> np.ndarray:
    """28x28: a stripe at row ``label`` and the constant ``10 * k`` elsewhere (unique per image)."""
    x = np.full((28, 28), 10 * k, dtype=np.uint8)
    x[label, :] = 255
    return x


def write_emnist(root: Path, split: str = "balanced") -> Path:
    """``root/EMNIST/raw/emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte`` in the
    idx format torchvision reads; labels 0..11, 4 train and 2 test images each."""
    raw = root / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    for part, per, offset in (("train", TRAIN, 0), ("test", TEST, TRAIN)):
        labels = [c for c in range(CLASSES) for _ in range(per)]
        images = np.stack([emnist_image(c, offset + k) for c in range(CLASSES) for k in range(per)])
        (raw / f"emnist-{split}-{part}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, len(labels), 28, 28) + images.tobytes())
        (raw / f"emnist-{split}-{part}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, len(labels)) + bytes(labels))
    return root


def emnist(root: Path, cache: Path, **params: object) -> TorchvisionDataModule:
    return TorchvisionDataModule({"dataset": "EMNIST", "root": str(root), "kwargs": {"split": "balanced"},
                                  "partitions": [{"train": True}, {"train": False}], "channels": 1, "image_size": 28,
                                  "cache_dir": str(cache), **EPISODE, **params})


def test_emnist_partitions_pool_into_classes_and_split(tmp_path: Path) -> None:
    root = write_emnist(tmp_path / "data")
    dm = emnist(root, tmp_path / "cache")
    dm.trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"), is_global_zero=True)
    dm.setup()
    tasks = dm.tasks
    assert tasks.counts.tolist() == [TRAIN + TEST] * CLASSES  # train and test images pooled per class
    balanced = torchvision.datasets.EMNIST.classes_split_dict["balanced"]
    assert tasks.class_names == balanced[:CLASSES]
    assert [len(tasks.classes[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    for c in range(CLASSES):  # every image of a class is that class's, decoded exactly
        got = (tasks.images[tasks.table[c, : TRAIN + TEST]] * 255).round().to(torch.uint8)[:, 0].numpy()
        want = np.stack([emnist_image(c, k) for k in range(TRAIN + TEST)])
        assert np.array_equal(got, want)
    batch = tasks.sample("train", [0, 1], seed=0)
    assert batch.support_x.shape == (2, 3, 1, 28, 28) and batch.query_x.shape == (2, 6, 1, 28, 28)
    kept = json.loads((tmp_path / "run" / "torchvision_split.json").read_text())
    assert sorted(kept["train"] + kept["val"] + kept["test"]) == sorted(balanced[:CLASSES])
    # the same names in a split file give the same split
    again = emnist(root, tmp_path / "cache", split_ratio=None, split_file=str(tmp_path / "run" / "torchvision_split.json"))
    again.setup()
    assert all(torch.equal(again.tasks.classes[s], tasks.classes[s]) for s in ("train", "val", "test"))


def test_fakedata_in_memory_resized_and_grouped_by_label(tmp_path: Path) -> None:
    kwargs = {"size": 96, "image_size": [3, 20, 24], "num_classes": 12}
    dm = TorchvisionDataModule({"dataset": "torchvision.datasets:FakeData", "kwargs": kwargs, "image_size": 16,
                                "cache_dir": str(tmp_path), **EPISODE})
    dm.setup()
    fake = torchvision.datasets.FakeData(size=96, image_size=(3, 20, 24), num_classes=12)
    labels = [int(fake[i][1]) for i in range(96)]
    assert dm.tasks.counts.tolist() == np.bincount(labels, minlength=12).tolist()
    assert dm.tasks.images.shape == (96, 3, 16, 16) and dm.image_shape() == (3, 16, 16)
    first_of_5 = labels.index(5)  # the first image of class 5 is FakeData's first item labelled 5
    expected = np.asarray(fake[first_of_5][0].resize((16, 16), Image.Resampling.LANCZOS), dtype=np.float32).transpose(2, 0, 1) / 255
    assert np.allclose(dm.tasks.images[dm.tasks.table[5, 0]].numpy(), expected, atol=1e-6)


def test_missing_files_and_bad_names_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        emnist(tmp_path / "empty", tmp_path / "cache").setup()
    msg = str(err.value)
    assert "EMNIST(" in msg and "download=true" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="did you mean 'EMNIST'"):
        TorchvisionDataModule({"dataset": "EMNST", "cache_dir": str(tmp_path)}).setup()
    with pytest.raises(ConfigError, match="cannot be imported"):
        TorchvisionDataModule({"dataset": "no_such_package:Thing", "cache_dir": str(tmp_path)}).setup()


class Captions(torch.utils.data.Dataset):
    """Items ``(image, caption)``: not a classification dataset."""

    def __init__(self, size: int = 8) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        return np.zeros((8, 8), dtype=np.uint8), f"caption {i}"


def test_items_that_are_not_image_label_pairs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = ModuleType("lightmeta_test_datasets")
    module.Captions = Captions  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    dm = TorchvisionDataModule({"dataset": "lightmeta_test_datasets:Captions", "kwargs": {"size": 8},
                                "cache_dir": str(tmp_path), **EPISODE})
    with pytest.raises(DataError, match=r"item 0 of lightmeta_test_datasets:Captions partition 0 \(\{\}\) is not an "
                                        r"\(image, class index\) pair"):
        dm.setup()
