"""Variable ways/shots per episode: drawn per training meta-batch, inside the ranges, deterministic."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from lightmeta.classification import ClassificationConfig, ClassificationDataModule, ClassificationTasks, ClassImages, EpisodeSpecs
from lightmeta.datamodule import TrainEpisodes
from lightmeta.episodes import EpisodeSpec
from lightmeta.errors import ConfigError

WAYS, SHOTS = (2, 5), (1, 3)


def data(classes: int = 20, per_class: int = 8) -> ClassImages:
    images = torch.arange(classes * per_class, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    splits = {"train": list(range(10)), "val": list(range(10, 15)), "test": list(range(15, 20))}
    return ClassImages.from_counts(images, [per_class] * classes, splits)


def tasks(group: int = 4, ways=WAYS, shots=SHOTS) -> ClassificationTasks:
    return ClassificationTasks(data(), EpisodeSpec(5, 1, 3), EpisodeSpec(4, 2, 3), ways_range=ways, shots_range=shots, spec_group=group)


def test_specs_stay_in_range_cover_it_and_shape_the_batch() -> None:
    s = tasks()
    seen: Counter = Counter()
    for b in range(60):
        batch = s.sample("train", list(range(4 * b, 4 * b + 4)), seed=1)
        spec = batch.spec
        assert WAYS[0] <= spec.ways <= WAYS[1] and SHOTS[0] <= spec.shots <= SHOTS[1] and spec.queries == 3
        assert batch.support_x.shape == (4, spec.ways * spec.shots, 1, 4, 4)
        assert batch.query_x.shape == (4, spec.ways * 3, 1, 4, 4)
        assert batch.support_y[0].tolist() == torch.arange(spec.ways).repeat_interleave(spec.shots).tolist()
        seen[(spec.ways, spec.shots)] += 1
    assert {w for w, _ in seen} == set(range(WAYS[0], WAYS[1] + 1))
    assert {k for _, k in seen} == set(range(SHOTS[0], SHOTS[1] + 1))


def test_spec_is_a_function_of_seed_and_meta_batch() -> None:
    a, b = tasks(), tasks()
    specs = [a.episode_spec("train", [4 * i], seed=5) for i in range(20)]
    assert specs == [b.episode_spec("train", [4 * i], seed=5) for i in range(20)]
    assert specs != [a.episode_spec("train", [4 * i], seed=6) for i in range(20)]
    # every task of a meta-batch (any rank's share) has the meta-batch's spec
    for i in range(20):
        assert all(a.episode_spec("train", [4 * i + j], seed=5) == specs[i] for j in range(4))
    # ranks: two shares of a meta-batch stack to the single-process batch
    whole = TrainEpisodes(a, 5, 4, 0, 1)[7]
    shares = [TrainEpisodes(a, 5, 4, r, 2)[7] for r in range(2)]
    assert all(s.spec == whole.spec for s in shares)
    assert torch.equal(torch.cat([s.support_x for s in shares]), whole.support_x)


def test_evaluation_keeps_the_fixed_spec() -> None:
    s = tasks()
    for i in range(10):
        assert s.sample("val", [i], seed=0).spec == EpisodeSpec(4, 2, 3)
        assert s.sample("test", [i, i + 1], seed=0).spec == EpisodeSpec(4, 2, 3)


def test_one_range_alone_keeps_the_other_value() -> None:
    s = ClassificationTasks(data(), EpisodeSpec(3, 2, 3), EpisodeSpec(3, 2, 3), ways_range=(2, 4), spec_group=1)
    specs = [s.episode_spec("train", [i], seed=0) for i in range(30)]
    assert {sp.shots for sp in specs} == {2} and {sp.ways for sp in specs} == {2, 3, 4}
    assert not EpisodeSpecs(EpisodeSpec(3, 1, 1), EpisodeSpec(3, 1, 1)).variable


def test_impossible_ranges_fail_at_setup_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"data.ways_range\[1\]=11 exceeds the 10 classes"):
        tasks(ways=(2, 11))
    with pytest.raises(ConfigError, match=r"data.shots_range\[1\] \+ data.queries = 6 \+ 3 = 9 exceeds the 8 images"):
        tasks(shots=(1, 6))
    for bad in ([3, 2], [0, 2]):
        with pytest.raises(ValidationError, match="ways_range"):
            ClassificationConfig.model_validate({"ways_range": bad})


class Tiny(ClassificationDataModule):
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 4, 4)

    def load_classes(self) -> ClassImages:
        return data()


def test_datamodule_passes_ranges_and_head_width() -> None:
    dm = Tiny({"ways": 3, "ways_range": [2, 5], "shots_range": [1, 2], "queries": 3, "eval_ways": 5, "meta_batch_size": 2})
    assert dm.task_info().train_ways == 5 and dm.task_info().eval_ways == 5
    dm.setup()
    specs = {TrainEpisodes(dm.sampler, 0, 2, 0, 1)[b].spec.ways for b in range(40)}
    assert specs == {2, 3, 4, 5}
    assert Tiny({"ways": 3}).task_info().train_ways == 3
