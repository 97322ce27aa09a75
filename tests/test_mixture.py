"""Multi-dataset task mixtures over two generated image folders (RGB 16x16 and greyscale 20x20)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from lightmeta.config import validate_config
from lightmeta.datamodule import TrainEpisodes
from lightmeta.datamodules.imagefolder import write_example
from lightmeta.datamodules.mixture import MixtureDataModule
from lightmeta.errors import ConfigError


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("mixture")
    return {"rgb": write_example(base / "rgb"), "grey": write_example(base / "grey", split_folders=True), "cache": base / "cache"}


def config(folders: dict[str, Path], weights: tuple[float, float] = (2, 1), **params: Any) -> dict[str, Any]:
    cache = str(folders["cache"])
    return {"ways": 3, "shots": 1, "queries": 2, "image_size": 16, "channels": 3, "meta_batch_size": 4, **params,
            "sources": [
                {"name": "imagefolder", "weight": weights[0], "root": str(folders["rgb"]), "image_size": 16,
                 "split_ratio": [0.5, 0.25, 0.25], "cache_dir": cache},
                {"name": "imagefolder", "weight": weights[1], "root": str(folders["grey"]), "image_size": 20, "channels": 1,
                 "cache_dir": cache},
            ]}


def mixture(folders: dict[str, Path], seed: int = 0, **params: Any) -> MixtureDataModule:
    dm = MixtureDataModule(config(folders, **params), seed=seed)
    dm.setup()
    return dm


def is_grey(x: torch.Tensor) -> bool:
    return bool(torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2]))


def test_weights_are_respected(folders: dict[str, Path]) -> None:
    tasks = mixture(folders).tasks
    n, p = 3000, 2 / 3
    tolerance = 4.5 * math.sqrt(p * (1 - p) / n)  # 4.5 sigma: fails for a wrong weighting, not by chance
    for split in ("train", "val"):
        share = float((tasks.source_of(split, list(range(n)), seed=1) == 0).float().mean())
        assert abs(share - p) < tolerance, f"{split}: source 0 drew {share:.3f} of the tasks, expected {p:.3f}"
        assert abs(share - 0.5) > tolerance  # an unweighted (uniform) choice would be caught
    even = mixture(folders, weights=(1, 1)).tasks
    share = float((even.source_of("train", list(range(n)), seed=1) == 0).float().mean())
    assert abs(share - 0.5) < 4.5 * math.sqrt(0.25 / n)


def test_episodes_come_from_the_drawn_source_in_one_shape(folders: dict[str, Path]) -> None:
    dm = mixture(folders)
    assert dm.task_info().in_shape == (3, 16, 16)
    ids = list(range(16))
    batch = dm.sampler.sample("train", ids, seed=2)
    chosen = dm.tasks.source_of("train", ids, seed=2)
    assert batch.support_x.shape == (16, 3, 3, 16, 16) and batch.query_x.shape == (16, 6, 3, 16, 16)
    assert 0 < int(chosen.sum()) < 16  # both sources appear in this meta-batch
    for t in range(16):
        assert is_grey(batch.support_x[t]) == bool(chosen[t] == 1)
        assert batch.support_y[t].tolist() == [0, 1, 2]


def test_deterministic_in_seed_and_index(folders: dict[str, Path]) -> None:
    a, b, c = mixture(folders, seed=5), mixture(folders, seed=5), mixture(folders, seed=6)
    whole_a, whole_b = TrainEpisodes(a.sampler, 5, 4, 0, 1)[3], TrainEpisodes(b.sampler, 5, 4, 0, 1)[3]
    assert torch.equal(whole_a.support_x, whole_b.support_x) and torch.equal(whole_a.query_x, whole_b.query_x)
    shares = [TrainEpisodes(a.sampler, 5, 4, r, 2)[3] for r in range(2)]
    assert torch.equal(torch.cat([s.support_x for s in shares]), whole_a.support_x)
    ids = list(range(200))
    assert torch.equal(a.tasks.source_of("train", ids, 5), b.tasks.source_of("train", ids, 5))
    assert not torch.equal(a.tasks.source_of("train", ids, 5), c.tasks.source_of("train", ids, 6))
    # evaluation tasks use data.eval_seed: identical whatever the run seed
    assert torch.equal(a.sampler.sample("test", [0, 1, 2], 0).support_x, c.sampler.sample("test", [0, 1, 2], 0).support_x)


def test_meta_batch_granularity(folders: dict[str, Path]) -> None:
    tasks = mixture(folders, granularity="meta_batch").tasks
    chosen = tasks.source_of("train", list(range(2400)), seed=0).view(600, 4)
    assert (chosen == chosen[:, :1]).all()  # one source per meta-batch of 4
    share = float((chosen[:, 0] == 0).float().mean())
    assert abs(share - 2 / 3) < 4.5 * math.sqrt(2 / 9 / 600)
    val = tasks.source_of("val", list(range(400)), seed=0).view(100, 4)
    assert not (val == val[:, :1]).all()  # evaluation tasks are drawn one by one


def test_variable_ways_and_augmentation_through_the_mixture(folders: dict[str, Path]) -> None:
    dm = mixture(folders, ways_range=[2, 3], augment={"flip": True, "brightness": 0.5})
    plain = mixture(folders)
    ways = {TrainEpisodes(dm.sampler, 0, 4, 0, 1)[b].spec.ways for b in range(30)}
    assert ways == {2, 3}
    assert dm.task_info().train_ways == 3
    assert torch.equal(dm.sampler.sample("val", [0, 1], 0).support_x, plain.sampler.sample("val", [0, 1], 0).support_x)
    batch = dm.sampler.sample("train", [0, 1, 2, 3], 0)
    assert batch.support_x.min() >= 0 and batch.support_x.max() <= 1


def test_configuration_errors(folders: dict[str, Path]) -> None:
    bad_source = config(folders)
    bad_source["sources"][0]["ways"] = 5
    with pytest.raises(ValidationError, match=r"sources\[0\].ways: set episode shapes"):
        MixtureDataModule(bad_source)
    unknown = config(folders)
    unknown["sources"][1]["name"] = "imagefolders"
    with pytest.raises(ValidationError, match=r"sources\[1\].name: unknown datamodule 'imagefolders' \(did you mean 'imagefolder'"):
        MixtureDataModule(unknown)
    typo = config(folders)
    typo["sources"][1]["image_sise"] = 3
    with pytest.raises(ConfigError, match=r"sources\[1\] \(imagefolder\).image_sise: unknown key"):
        validate_config({"algorithm": {"name": "protonet"}, "model": {"name": "conv4"}, "data": {"name": "mixture", **typo}})
    with pytest.raises(ValidationError, match="weight"):
        MixtureDataModule(config(folders, weights=(1, -1)))
    with pytest.raises(ConfigError, match=r"different image shapes \(imagefolder: \(3, 16, 16\), imagefolder: \(1, 20, 20\)\)"):
        MixtureDataModule(config(folders, image_size=None, channels=None)).task_info()
