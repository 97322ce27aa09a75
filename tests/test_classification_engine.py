"""The episodic classification engine on small synthetic class-indexed tensors."""
from __future__ import annotations

import pickle
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from lightmeta import classification as engine
from lightmeta.classification import ClassificationConfig, ClassificationDataModule, ClassificationTasks, ClassImages
from lightmeta.datamodule import TrainEpisodes
from lightmeta.episodes import EpisodeSpec, TaskBatch
from lightmeta.errors import ConfigError, DataError

SIDE = 4


def make_images(counts: list[int]) -> torch.Tensor:
    """Image ``m`` holds ``16 m + (0..15)``: every image and each of its rotations is unique."""
    m = sum(counts)
    grid = torch.arange(SIDE * SIDE, dtype=torch.float32).view(1, SIDE, SIDE)
    return torch.arange(m, dtype=torch.float32).view(m, 1, 1, 1) * SIDE * SIDE + grid


def identify(x: torch.Tensor, images: torch.Tensor) -> tuple[int, int]:
    """(image index, quarter turns) of an output image made by :func:`make_images`."""
    m = int(x.min()) // (SIDE * SIDE)
    for r in range(4):
        if torch.equal(torch.rot90(images[m], r, dims=(-2, -1)), x):
            return m, r
    raise AssertionError(f"output image is no rotation of image {m}")


def make_data(counts: list[int] | None = None, splits: dict[str, list[int]] | None = None) -> ClassImages:
    counts = counts or [6] * 12
    splits = splits or {"train": list(range(0, 6)), "val": [6, 7, 8], "test": [9, 10, 11]}
    names = [f"class{c}" for c in range(len(counts))]
    return ClassImages.from_counts(make_images(counts), counts, splits, class_names=names)


def tasks(data: ClassImages | None = None, train=(3, 2, 3), eval_=(3, 1, 2), rotations="none") -> ClassificationTasks:
    return ClassificationTasks(data or make_data(), EpisodeSpec(*train), EpisodeSpec(*eval_), rotations)


def class_of(data: ClassImages) -> dict[int, int]:
    return {int(m): c for c, members in enumerate(data.members) for m in members}


def test_shapes_dtypes_and_class_major_labels() -> None:
    s = tasks()
    b = s.sample("train", [4, 9], seed=0)
    assert b.support_x.shape == (2, 6, 1, SIDE, SIDE) and b.query_x.shape == (2, 9, 1, SIDE, SIDE)
    assert b.support_x.dtype == torch.float32 and b.support_y.dtype == torch.long
    assert b.support_y.tolist() == [[0, 0, 1, 1, 2, 2]] * 2
    assert b.query_y.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 2
    assert b.task_ids.tolist() == [4, 9] and b.spec == EpisodeSpec(3, 2, 3)
    e = s.sample("test", [0], seed=0)
    assert e.spec == EpisodeSpec(3, 1, 2) and e.support_x.shape == (1, 3, 1, SIDE, SIDE) and e.query_x.shape == (1, 6, 1, SIDE, SIDE)


def test_images_come_from_the_labelled_class_without_repeats() -> None:
    data = make_data()
    s, owner = tasks(data), class_of(data)
    ids = s.episode_classes("train", list(range(20)), seed=3)
    b = s.sample("train", list(range(20)), seed=3)
    for t in range(20):
        assert len(set(ids[t].tolist())) == 3
        used = []
        for x, y in [*zip(b.support_x[t], b.support_y[t]), *zip(b.query_x[t], b.query_y[t])]:
            m, r = identify(x, data.images)
            assert r == 0 and owner[m] == int(ids[t, y]) // 4
            assert owner[m] in data.splits["train"].tolist()
            used.append(m)
        assert len(used) == len(set(used)), "an image is both in support and query, or twice"


def test_labels_are_permuted_per_episode_and_classes_drawn_uniformly() -> None:
    s = tasks()
    ids = s.episode_classes("train", list(range(1200)), seed=0) // 4  # [T, 3] classes in label order
    counts = Counter((int(c), label) for row in ids for label, c in enumerate(row))
    expected = 1200 * 3 / 6 / 3  # each of 6 classes x 3 labels
    for c in range(6):
        for label in range(3):
            assert counts[(c, label)] > 0.7 * expected, f"class {c} rarely gets label {label}: {counts[(c, label)]}"
    per_class = Counter(int(c) for c in ids.flatten())
    assert min(per_class.values()) > 0.85 * 1200 * 3 / 6


def test_task_is_a_pure_function_of_seed_split_and_index() -> None:
    s = tasks()
    a = s.sample("train", [3, 5], seed=7)
    b = s.sample("train", [5], seed=7)
    assert torch.equal(a.support_x[1], b.support_x[0]) and torch.equal(a.query_x[1], b.query_x[0])
    c = tasks().sample("train", [3, 5], seed=7)
    assert torch.equal(a.support_x, c.support_x) and torch.equal(a.query_x, c.query_x)
    assert not torch.equal(s.sample("train", [3, 5], seed=8).query_x, a.query_x)
    val_a, val_b = s.episode_classes("val", list(range(30)), 0), s.episode_classes("test", list(range(30)), 0)
    assert not torch.equal(val_a, val_b)


def test_impossible_specs_fail_at_setup_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"data\.ways=7 exceeds the 6 classes of the 'train' split"):
        tasks(train=(7, 1, 1))
    with pytest.raises(ConfigError, match=r"data\.eval_ways=4 exceeds the 3 classes of the 'val' split"):
        tasks(eval_=(4, 1, 1))
    with pytest.raises(ConfigError, match=r"data\.shots \+ data\.queries = 2 \+ 5 = 7 exceeds the 6 images"):
        tasks(train=(2, 2, 5))
    counts = [6, 6, 6, 6, 6, 6, 6, 6, 3, 6, 6, 6]
    with pytest.raises(ConfigError, match=r"data\.eval_shots \+ data\.eval_queries = 1 \+ 3 = 4 exceeds the 3 images of class 'class8' in the 'val' split"):
        tasks(make_data(counts), eval_=(2, 1, 3))
    with pytest.raises(ConfigError, match="needs square images"):
        images = torch.zeros(12 * 6, 1, 4, 5)
        ClassificationTasks(ClassImages.from_counts(images, [6] * 12, make_data().splits), EpisodeSpec(2, 1, 1), EpisodeSpec(2, 1, 1), "train")


def test_classes_of_different_sizes_are_sampled_within_bounds() -> None:
    counts = [3, 4, 5, 6, 7, 8, 3, 4, 5, 3, 4, 5]
    data = make_data(counts)
    owner = class_of(data)
    s = tasks(data, train=(4, 1, 2), eval_=(3, 1, 2))
    seen_positions: dict[int, set[int]] = {}
    b = s.sample("train", list(range(300)), seed=1)
    ids = s.episode_classes("train", list(range(300)), seed=1) // 4
    for t in range(300):
        for x, y in zip(b.query_x[t], b.query_y[t]):
            m, _ = identify(x, data.images)
            assert owner[m] == int(ids[t, y])
            seen_positions.setdefault(owner[m], set()).add(m)
    for c in data.splits["train"].tolist():  # every image of every class gets used, none beyond it
        assert seen_positions[c] == set(data.members[c].tolist())


@pytest.mark.parametrize("mode, rotated_splits", [("none", set()), ("train", {"train"}), ("all", {"train", "val", "test"})])
def test_rotations_are_new_classes(mode: str, rotated_splits: set[str]) -> None:
    data = make_data()
    s, owner = tasks(data, train=(5, 1, 1), eval_=(3, 1, 1), rotations=mode), class_of(data)
    for split in ("train", "val", "test"):
        n_base = len(data.splits[split])
        assert len(s.classes[split]) == n_base * (4 if split in rotated_splits else 1)
        ids = s.episode_classes(split, list(range(40)), seed=2)
        b = s.sample(split, list(range(40)), seed=2)
        turns = set()
        for t in range(40):
            for x, y in zip(b.support_x[t], b.support_y[t]):
                m, r = identify(x, data.images)
                cid = int(ids[t, y])
                assert owner[m] == cid // 4 and r == cid % 4
                turns.add(r)
        assert turns == ({0, 1, 2, 3} if split in rotated_splits else {0})


def test_uint8_images_are_scaled_to_unit_range_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = [6] * 12
    images = torch.randint(0, 256, (72, 1, SIDE, SIDE), dtype=torch.uint8)
    data = ClassImages.from_counts(images, counts, make_data().splits)
    fast = ClassificationTasks(data, EpisodeSpec(3, 2, 2), EpisodeSpec(3, 1, 1), "train")
    assert fast.images.dtype == torch.float32  # small enough: converted once at setup
    monkeypatch.setattr(engine, "FLOAT_BUDGET_BYTES", 0)
    lean = ClassificationTasks(data, EpisodeSpec(3, 2, 2), EpisodeSpec(3, 1, 1), "train")
    assert lean.images.dtype == torch.uint8  # too big: converted batch by batch
    a, b = fast.sample("train", [0, 1, 2], 0), lean.sample("train", [0, 1, 2], 0)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert a.query_x.dtype == torch.float32 and 0 <= float(a.query_x.min()) and float(a.query_x.max()) <= 1
    values = set((images.float() / 255).flatten().tolist())
    assert set(a.support_x.flatten().tolist()) <= values


def test_sampler_survives_pickling() -> None:
    s = tasks(rotations="train")
    clone = pickle.loads(pickle.dumps(s))
    a, b = s.sample("train", [1, 2], 5), clone.sample("train", [1, 2], 5)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


def test_flat_dataset_lists_every_training_image_with_contiguous_labels() -> None:
    data = make_data()
    s, owner = tasks(data, rotations="train"), class_of(data)
    flat = s.flat_dataset("train")
    assert flat.num_classes == 6 * 4 and len(flat) == 6 * 6 * 4
    assert torch.equal(flat.class_ids, s.classes["train"])
    seen = set()
    for x, y in DataLoader(flat, batch_size=16, shuffle=True):
        assert x.shape[1:] == (1, SIDE, SIDE)
        for xi, yi in zip(x, y):
            m, r = identify(xi, data.images)
            cid = int(flat.class_ids[yi])
            assert owner[m] == cid // 4 and r == cid % 4
            seen.add((m, r))
    assert len(seen) == len(flat)
    x0, y0 = flat[0]
    assert x0.shape == (1, SIDE, SIDE) and int(y0) == 0


def test_class_images_reject_inconsistent_inputs() -> None:
    images = make_images([2, 2, 2])
    with pytest.raises(DataError, match="'b' is in both the 'train' and the 'val' split"):
        ClassImages.from_counts(images, [2, 2, 2], {"train": [0, 1], "val": [1], "test": [2]}, ["a", "b", "c"])
    with pytest.raises(DataError, match="exactly"):
        ClassImages.from_counts(images, [2, 2, 2], {"train": [0, 1], "test": [2]})
    with pytest.raises(DataError, match="counts sum to 5"):
        ClassImages.from_counts(images, [2, 2, 1], {"train": [0], "val": [1], "test": [2]})
    with pytest.raises(DataError, match="outside"):
        ClassImages(images, [torch.tensor([0, 9])], {"train": [0], "val": [], "test": []})


class ToyConfig(ClassificationConfig):
    classes: int = 12


class ToyDataModule(ClassificationDataModule):
    """A datamodule that only implements the two data methods."""

    Config = ToyConfig

    def image_shape(self) -> tuple[int, int, int]:
        return (1, SIDE, SIDE)

    def load_classes(self) -> ClassImages:
        return make_data()


def test_datamodule_base_links_specs_and_serves_dataloaders() -> None:
    dm = ToyDataModule({"ways": 4, "shots": 1, "queries": 2, "eval_ways": 3, "meta_batch_size": 4,
                        "train_batches_per_epoch": 3, "val_tasks": 5, "eval_batch_size": 2}, seed=1)
    info = dm.task_info()
    assert (info.problem, info.in_shape, info.train_ways, info.eval_ways) == ("classification", (1, SIDE, SIDE), 4, 3)
    assert dm.config.eval_spec == EpisodeSpec(3, 1, 2)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(isinstance(b, TaskBatch) and len(b) == 4 for b in batches)
    assert [b.task_ids.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    val = list(dm.val_dataloader())
    assert [len(b) for b in val] == [2, 2, 1] and val[0].spec == EpisodeSpec(3, 1, 2)
    other_run = ToyDataModule(dm.config, seed=2)  # another run seed: same evaluation tasks
    other_run.setup("fit")
    assert torch.equal(next(iter(other_run.val_dataloader())).query_x, val[0].query_x)
    assert not torch.equal(next(iter(other_run.train_dataloader())).query_x, batches[0].query_x)
    assert len(dm.flat_train_dataset()) == 6 * 6


def test_dataloader_workers_draw_the_same_episodes() -> None:
    cfg = {"ways": 3, "shots": 1, "queries": 1, "meta_batch_size": 2, "train_batches_per_epoch": 4}
    dm0, dm1 = ToyDataModule(cfg), ToyDataModule({**cfg, "num_workers": 1})
    dm0.setup(), dm1.setup()
    for a, b in zip(dm0.train_dataloader(), dm1.train_dataloader(), strict=True):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


def test_ranks_split_a_meta_batch_without_overlap() -> None:
    s = tasks()
    whole = TrainEpisodes(s, seed=0, meta_batch=4, rank=0, world_size=1)[3]
    parts = [TrainEpisodes(s, seed=0, meta_batch=4, rank=r, world_size=2)[3] for r in (0, 1)]
    assert set(parts[0].task_ids.tolist()).isdisjoint(parts[1].task_ids.tolist())
    assert torch.equal(torch.cat([p.query_x for p in parts]), whole.query_x)


def test_image_shape_mismatch_is_a_data_error() -> None:
    class Wrong(ToyDataModule):
        def image_shape(self) -> tuple[int, int, int]:
            return (3, SIDE, SIDE)

    with pytest.raises(DataError, match=r"images of shape \(1, 4, 4\), but image_shape\(\) says \(3, 4, 4\)"):
        Wrong().setup()
