"""The ImageFolder datamodule on generated folders: layouts, splits, decoding, cache, errors."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from lightmeta.class_splits import DEFAULT_RATIO, split_counts
from lightmeta.config import apply_overrides
from lightmeta.datamodules.imagefolder import ImageFolderDataModule, example_image, write_example
from lightmeta.errors import ConfigError, DataError
from lightmeta.image_cache import decode_all, file_loader, to_array

EPISODE = {"ways": 3, "shots": 1, "queries": 2}
HALVES = [0.5, 0.25, 0.25]  # 12 classes -> 6/3/3


def module(root: Path, cache: Path, **params: object) -> ImageFolderDataModule:
    config = {"root": str(root), "cache_dir": str(cache), "image_size": 16, "split_ratio": HALVES, **EPISODE, **params}
    return ImageFolderDataModule(config)


def split_of(dm: ImageFolderDataModule) -> dict[str, list[str]]:
    names = dm.tasks.class_names
    assert names is not None
    return {s: sorted(names[int(c) // 4] for c in dm.tasks.classes[s]) for s in ("train", "val", "test")}  # ids are 4c + r


def test_ratio_split_sizes_and_the_copy_kept_with_the_run(tmp_path: Path) -> None:
    root = write_example(tmp_path / "images", classes=25, per_class=4)
    dm = module(root, tmp_path / "cache", split_ratio=None)
    run_dir = tmp_path / "run"
    dm.trainer = SimpleNamespace(default_root_dir=str(run_dir), is_global_zero=True)
    dm.setup("fit")
    splits = split_of(dm)
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == split_counts(25, DEFAULT_RATIO) == (16, 4, 5)
    assert sorted(sum(splits.values(), [])) == [f"class_{c:03d}" for c in range(25)]
    kept = json.loads((run_dir / "imagefolder_split.json").read_text())
    assert {s: kept[s] for s in splits} == splits and "seed 0" in kept["source"]
    assert dm.split_path is not None and dm.split_path.parent == tmp_path / "cache"
    # the kept file reproduces the split; another seed draws another one; the same seed the same one
    again = module(root, tmp_path / "cache", split_ratio=None, split_file=str(run_dir / "imagefolder_split.json"))
    again.setup()
    assert split_of(again) == splits
    same = module(root, tmp_path / "cache", split_ratio=None)
    same.setup()
    assert split_of(same) == splits
    other = module(root, tmp_path / "cache", split_ratio=None, split_seed=1)
    other.setup()
    assert split_of(other) != splits
    custom = module(root, tmp_path / "cache", split_ratio=[0.6, 0.2, 0.2])
    custom.setup()
    assert [len(split_of(custom)[s]) for s in ("train", "val", "test")] == [15, 5, 5]


def test_one_tree_per_split(tmp_path: Path) -> None:
    root = write_example(tmp_path / "images", classes=12, split_folders=True)
    dm = module(root, tmp_path / "cache", split_ratio=None)
    dm.setup()
    splits = split_of(dm)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert all(name.startswith(f"{s}/class_") for s, names in splits.items() for name in names)
    with pytest.raises(DataError, match="remove data.split_ratio"):
        module(root, tmp_path / "cache").setup()
    (root / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(DataError, match="has no val/"):
        module(root, tmp_path / "cache", split_ratio=None).setup()


def test_images_are_decoded_to_the_configured_tensor(tmp_path: Path) -> None:
    root = write_example(tmp_path / "images", classes=12)
    dm = module(root, tmp_path / "cache")
    dm.setup()
    files = sorted((root / "class_004").rglob("img_*"), key=lambda p: (p.parent != root / "class_004", p.name))
    first = dm.tasks.table[4, 0]
    want = to_array(Image.open(files[0]), 16, 3)
    got = (dm.tasks.images[first] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(got, want)
    assert dm.tasks.counts.tolist() == [6] * 12  # the nested sub-folder's image counts for its class
    grey = module(root, tmp_path / "cache", channels=1, image_size=20, resize="crop")
    grey.setup()
    assert tuple(grey.tasks.images.shape[1:]) == (1, 20, 20) == grey.image_shape()
    # crop keeps the aspect ratio: a 20x16 image is scaled to 25x20 and its centre cut
    im = example_image(3, 1, (20, 16))
    expected = np.asarray(im.convert("L").resize((25, 20), Image.Resampling.LANCZOS).crop((2, 0, 22, 20)))
    assert np.array_equal(to_array(im, 20, 1, "crop")[0], expected)


def test_corrupt_image_error_names_the_file(tmp_path: Path) -> None:
    root = write_example(tmp_path / "images", classes=12)
    bad = root / "class_007" / "img_002.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    with pytest.raises(DataError, match=f"corrupt or unreadable image {bad}"):
        module(root, tmp_path / "cache").setup()
    files = sorted(root.rglob("*.png"))
    with pytest.raises(DataError, match=str(bad)):  # the same through a process pool
        decode_all(len(files), file_loader(files), 8, 3, processes=2)


def test_parallel_decoding_equals_sequential(tmp_path: Path) -> None:
    files = sorted(write_example(tmp_path / "images", classes=12).rglob("img_*"))
    one, _ = decode_all(len(files), file_loader(files), 12, 3, processes=1)
    two, _ = decode_all(len(files), file_loader(files), 12, 3, processes=2, describe=lambda i: str(files[i]))
    assert one.dtype == torch.uint8 and one.shape == (len(files), 3, 12, 12) and torch.equal(one, two)


def test_unpicklable_describe_works_with_a_process_pool(tmp_path: Path) -> None:
    """ImageFolder passes a lambda; the pool must not try to pickle it (regression)."""
    files = sorted(write_example(tmp_path / "images", classes=12).rglob("img_*"))
    labels = [f"image number {i}" for i in range(len(files))]
    load = file_loader(files)
    with pytest.raises(DataError, match="cannot decode image number 3"):  # item 3 is not an image
        decode_all(len(files), lambda i: ("not an image", 0) if i == 3 else load(i), 8, 3, processes=2,
                   describe=lambda i: labels[i])


def test_listing_errors_and_ignored_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        module(tmp_path / "nowhere", tmp_path / "cache").setup()
    root = write_example(tmp_path / "images", classes=12)
    (root / ".hidden_class").mkdir()
    (root / "class_000" / "notes.txt").write_text("not an image")
    (root / "class_000" / ".thumb.png").write_bytes(b"junk")
    dm = module(root, tmp_path / "cache")
    dm.setup()
    assert dm.tasks.class_names is not None and len(dm.tasks.class_names) == 12 and dm.tasks.counts[0] == 6
    (root / "class_empty").mkdir()
    with pytest.raises(DataError, match="class_empty holds no images"):
        module(root, tmp_path / "cache").setup()


def test_cache_is_reused_and_rebuilt_when_images_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_example(tmp_path / "images", classes=12)
    module(root, tmp_path / "cache").setup()
    caches = list((tmp_path / "cache").glob("*.pt"))
    assert len(caches) == 1

    def no_decoding(self: ImageFolderDataModule) -> None:
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(ImageFolderDataModule, "decode", no_decoding)
    module(root, tmp_path / "cache").setup()
    monkeypatch.undo()
    example_image(0, 99).save(root / "class_000" / "img_099.png")
    dm = module(root, tmp_path / "cache")
    dm.setup()
    assert dm.tasks.counts[0] == 7 and len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_split_file_errors_and_impossible_episodes(tmp_path: Path) -> None:
    root = write_example(tmp_path / "images", classes=12)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["class_000", "class_001", "class_002"], "val": ["class_003", "class_004", "class_005"],
                                 "test": ["class_006", "class_077", "class_008"]}))
    with pytest.raises(DataError, match="names class 'class_077'"):
        module(root, tmp_path / "cache", split_file=str(split)).setup()
    with pytest.raises(ConfigError, match="data.eval_ways=4 exceeds the 3 classes of the 'val' split"):
        module(root, tmp_path / "cache", ways=4).setup()
    with pytest.raises(ValidationError, match="summing to 1"):
        module(root, tmp_path / "cache", split_ratio=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="leaves the 'val' split of 12 classes empty"):
        module(root, tmp_path / "cache", split_ratio=[0.96, 0.0, 0.04]).setup()


def test_switching_to_image_data_switches_to_its_default_model() -> None:
    raw = {"algorithm": {"name": "maml"}, "model": {"name": "mlp", "hidden": [40, 40]}, "data": {"name": "sinusoid", "shots": 10}}
    assert apply_overrides(raw, ["data=imagefolder", "data.root=x"])["model"] == {"name": "conv4"}
    assert apply_overrides(raw, ["data=imagefolder", "model.hidden=[8]"])["model"] == {"name": "mlp", "hidden": [8]}
    assert apply_overrides(raw, ["data=synthetic"])["model"] == raw["model"]  # no default model declared
    assert apply_overrides(raw, ["data.shots=5"])["model"] == raw["model"]  # the plug-in is not switched
    conv = {**raw, "model": {"name": "conv4", "filters": 32}}
    assert apply_overrides(conv, ["data=imagefolder"])["model"] == {"name": "conv4", "filters": 32}
