"""mini-ImageNet in both on-disk forms (the mini-imagenet-cache-*.pkl pickles and Ravi &
Larochelle's images + CSVs), with the real class ids: decoding, cache, errors, splits, episodes."""
from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightmeta.datamodules import miniimagenet as mini
from lightmeta.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def pickles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mini.write_example(tmp_path_factory.mktemp("mini_pkl"), "pickle", images_per_class=3)


@pytest.fixture(scope="module")
def csvs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mini.write_example(tmp_path_factory.mktemp("mini_csv"), "csv", images_per_class=2)


def datamodule(root: Path, cache: Path, seed: int = 0, **cfg: object) -> mini.MiniImageNetDataModule:
    dm = mini.MiniImageNetDataModule({"root": str(root), "cache_dir": str(cache), "ways": 5, "shots": 1, "queries": 1,
                                      "meta_batch_size": 2, **cfg}, seed=seed)
    dm.setup("fit")
    return dm


def test_fixtures_have_the_real_layouts(pickles: Path, csvs: Path) -> None:
    blob = pickle.loads((pickles / "mini-imagenet-cache-train.pkl").read_bytes())
    assert set(blob) == {"image_data", "class_dict"}
    assert blob["image_data"].dtype == np.uint8 and blob["image_data"].shape == (64 * 3, 84, 84, 3)
    assert len(blob["class_dict"]) == 64 and all(len(v) == 3 for v in blob["class_dict"].values())
    with open(csvs / "val.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "label"] and len(rows) == 1 + 16 * 2
    assert rows[1][0] == f"{rows[1][1]}00000001.jpg" and (csvs / "images" / rows[1][0]).is_file()


def test_pickle_form_decodes_every_class_with_its_pixels(pickles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = datamodule(pickles, tmp_path / "cache")
    data = dm.decoded()
    assert data.images.shape == (300, 3, 84, 84) and data.images.dtype == torch.uint8 and data.counts == [3] * 100
    blob = pickle.loads((pickles / "mini-imagenet-cache-test.pkl").read_bytes())
    wnid = "n02110341"
    k = data.names.index(wnid)
    expected = torch.from_numpy(blob["image_data"][blob["class_dict"][wnid]]).permute(0, 3, 1, 2)
    assert torch.equal(data.images[3 * k : 3 * k + 3], expected)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".pt"]
    monkeypatch.setattr(mini, "read_pickles", lambda *a: pytest.fail("decoded again although the cache exists"))
    assert torch.equal(datamodule(pickles, tmp_path / "cache").decoded().images, data.images)


def test_csv_form_resizes_the_jpegs_and_matches_the_split(csvs: Path, tmp_path: Path) -> None:
    dm = datamodule(csvs, tmp_path / "cache")
    data = dm.decoded()
    assert data.images.shape == (200, 3, 84, 84) and data.counts == [2] * 100
    first = csvs / "images" / f"{data.names[0]}00000001.jpg"
    with Image.open(first) as im:
        assert im.size == (100, 90)
        expected = np.asarray(im.convert("RGB").resize((84, 84), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    assert torch.equal(data.images[0], torch.from_numpy(expected.copy()))
    assert {s: len(c) for s, c in dm.tasks.classes.items()} == {"train": 64, "val": 16, "test": 20}
    small = datamodule(csvs, tmp_path / "cache", image_size=32)
    assert small.task_info().in_shape == (3, 32, 32) and small.tasks.sample("val", [0], 0).support_x.shape == (1, 5, 3, 32, 32)


def test_auto_prefers_the_pickles_and_forms_can_be_forced(pickles: Path, csvs: Path, tmp_path: Path) -> None:
    both = tmp_path / "both"
    both.mkdir()
    for src in (pickles, csvs):
        for p in src.iterdir():
            (both / p.name).symlink_to(p)
    assert mini.choose_form(both, "auto") == "pickle" and mini.choose_form(both, "csv") == "csv"
    assert mini.choose_form(csvs, "auto") == "csv"
    with pytest.raises(DataError, match="data.form=pickle but a mini-imagenet-cache-\\*.pkl file is missing"):
        mini.choose_form(csvs, "pickle")


def test_validation_pickle_name_is_accepted(pickles: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for split, names in mini.PICKLES.items():
        (root / names[-1]).symlink_to(pickles / names[0])  # ...-validation.pkl
    assert mini.pickle_files(root)["val"].name == "mini-imagenet-cache-validation.pkl"
    assert len(datamodule(root, tmp_path / "cache").tasks.classes["val"]) == 16


def test_missing_data_names_both_layouts_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"mini-ImageNet not found in .* it has no official download: put mini-imagenet-cache-train\.pkl.*"
                                        r"'image_data': uint8 \[N, 84, 84, 3\].* or train\.csv, val\.csv and test\.csv \(columns "
                                        r"filename,label\) with the JPEGs in images/") as err:
        datamodule(tmp_path / "nothing", tmp_path / "cache")
    assert "\n" not in str(err.value)


def test_broken_sources_are_named(pickles: Path, csvs: Path, tmp_path: Path) -> None:
    root = tmp_path / "pkl"
    root.mkdir()
    for names in mini.PICKLES.values():
        (root / names[0]).write_bytes((pickles / names[0]).read_bytes())
    blob = pickle.loads((root / "mini-imagenet-cache-val.pkl").read_bytes())
    blob["class_dict"]["n01532829"] = [0]  # a training class again
    (root / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps(blob))
    with pytest.raises(DataError, match="class n01532829 is in both mini-imagenet-cache-train.pkl and mini-imagenet-cache-val.pkl"):
        datamodule(root, tmp_path / "cache")
    (root / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps({"images": blob["image_data"]}))
    with pytest.raises(DataError, match=r"has no 'image_data' entry \(found \['images'\]\)"):
        datamodule(root, tmp_path / "cache")
    copy = tmp_path / "csv"
    copy.mkdir()
    for p in csvs.iterdir():
        (copy / p.name).symlink_to(p)
    (copy / "test.csv").unlink()
    (copy / "test.csv").write_text("file,label\nx.jpg,n01930112\n")
    with pytest.raises(DataError, match=r"test.csv has columns \['file', 'label'\], expected filename,label"):
        datamodule(copy, tmp_path / "cache")
    (copy / "test.csv").write_text("filename,label\nmissing.jpg,n01930112\n")
    with pytest.raises(DataError, match="images/missing.jpg listed in test.csv is missing"):
        datamodule(copy, tmp_path / "cache")


def test_split_file_must_name_known_classes(pickles: Path, tmp_path: Path) -> None:
    blob = json.loads(mini.shipped_split("miniimagenet_ravi").read_text())
    blob["test"][0] = "n99999999"
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps(blob))
    with pytest.raises(DataError, match="names class 'n99999999' \\(test\\) that the data does not have"):
        datamodule(pickles, tmp_path / "cache", split_file=str(bad))


def test_episodes_shapes_determinism_and_impossible_specs(pickles: Path, tmp_path: Path) -> None:
    dm = datamodule(pickles, tmp_path / "cache", eval_ways=16, eval_shots=2, eval_queries=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 5, 3, 84, 84) and batch.query_x.shape == (2, 5, 3, 84, 84)
    test = next(iter(dm.test_dataloader()))
    assert test.support_x.shape[1:] == (32, 3, 84, 84) and test.query_y.shape[1] == 16
    other = datamodule(pickles, tmp_path / "cache", seed=5, eval_ways=16, eval_shots=2, eval_queries=1)
    assert not torch.equal(batch.support_x, next(iter(other.train_dataloader())).support_x)
    assert torch.equal(test.support_x, next(iter(other.test_dataloader())).support_x)
    with pytest.raises(ConfigError, match=r"data.eval_ways=17 exceeds the 16 classes of the 'val' split"):
        datamodule(pickles, tmp_path / "cache", eval_ways=17)
    with pytest.raises(ConfigError, match=r"data.shots \+ data.queries = 2 \+ 2 = 4 exceeds the 3 images"):
        datamodule(pickles, tmp_path / "cache", shots=2, queries=2, eval_shots=1, eval_queries=1)
