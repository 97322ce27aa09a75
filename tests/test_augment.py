"""Batched episode augmentation: torchvision semantics, one batched call, determinism per
(seed, task), training episodes only."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from pydantic import ValidationError

from lightmeta import augment
from lightmeta.augment import DRAWS_PER_IMAGE, AugmentConfig, augment_images, augment_task_batch, random_crop
from lightmeta.classification import ClassificationConfig, ClassificationTasks, ClassImages
from lightmeta.episodes import EpisodeSpec, TaskBatch

JITTER = AugmentConfig(crop_padding=2, flip=True, brightness=0.4, contrast=0.4, saturation=0.4)


def rgb_data(classes: int = 12, per_class: int = 6, side: int = 8) -> ClassImages:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, 3, side, side), dtype=torch.uint8, generator=g)
    splits = {"train": list(range(6)), "val": [6, 7, 8], "test": [9, 10, 11]}
    return ClassImages.from_counts(images, [per_class] * classes, splits)


def sampler(config: AugmentConfig | None) -> ClassificationTasks:
    return ClassificationTasks(rgb_data(), EpisodeSpec(3, 2, 2), EpisodeSpec(3, 1, 2), augment=config)


def test_each_operation_matches_torchvision() -> None:
    x = torch.rand(5, 3, 6, 7, generator=torch.Generator().manual_seed(1))
    u = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.6, 0.8]] * 5)
    u[:, 3:] = torch.linspace(0.05, 0.95, 5).unsqueeze(1)
    lo, hi = 0.6, 1.4  # factor range of strength 0.4
    factors = lo + u[:, 3] * (hi - lo)
    for name, fn in (("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast), ("saturation", TF.adjust_saturation)):
        got = augment_images(x, AugmentConfig(**{name: 0.4}), u)
        want = torch.stack([fn(img, float(f)) for img, f in zip(x, factors)])
        assert torch.allclose(got, want, atol=1e-6), name
    flipped = augment_images(x, AugmentConfig(flip=True), u)  # u[:, 2] = 0.2 < 0.5: flip
    assert torch.equal(flipped, x.flip(-1))
    assert torch.equal(augment_images(x, AugmentConfig(flip=True), torch.full((5, DRAWS_PER_IMAGE), 0.7)), x)
    grey = x[:, :1]
    assert torch.equal(augment_images(grey, AugmentConfig(saturation=0.9), u), grey)  # saturation: RGB only


def test_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    x = torch.rand(3, 2, 5, 6)
    p = 2
    u_row, u_col = torch.tensor([0.0, 0.5, 0.99]), torch.tensor([0.99, 0.0, 0.5])
    out = random_crop(x, p, u_row, u_col)
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    for i in range(3):
        top, left = int(u_row[i] * (2 * p + 1)), int(u_col[i] * (2 * p + 1))
        assert torch.equal(out[i], padded[i, :, top : top + 5, left : left + 6])
    assert out.shape == x.shape


def test_augmentation_is_one_batched_call_over_the_whole_meta_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    original = augment.augment_images

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(augment, "augment_images", spy)
    batch = sampler(JITTER).sample("train", [0, 1, 2, 3], seed=0)
    # 4 tasks x (3 ways x (2 shots + 2 queries)) images, augmented in one call
    assert calls == [(4 * 12, 3, 8, 8)]
    assert batch.support_x.shape == (4, 6, 3, 8, 8) and batch.query_x.shape == (4, 6, 3, 8, 8)


def test_changes_pixels_of_training_episodes_only() -> None:
    plain, augmented = sampler(None), sampler(JITTER)
    a, b = plain.sample("train", [0, 1], seed=3), augmented.sample("train", [0, 1], seed=3)
    assert torch.equal(a.support_y, b.support_y) and torch.equal(a.query_y, b.query_y)
    for x, y in ((a.support_x, b.support_x), (a.query_x, b.query_x)):
        changed = (x != y).flatten(2).any(-1).float().mean()
        assert changed > 0.9, f"only {changed:.0%} of the training images changed"
    assert b.support_x.min() >= 0 and b.support_x.max() <= 1  # uint8 data: blends clamp to [0, 1]
    for split in ("val", "test"):
        assert torch.equal(plain.sample(split, [0, 1], 0).support_x, augmented.sample(split, [0, 1], 0).support_x)
        assert torch.equal(plain.sample(split, [0, 1], 0).query_x, augmented.sample(split, [0, 1], 0).query_x)


def test_deterministic_per_seed_and_task_whatever_the_batch() -> None:
    s = sampler(JITTER)
    whole = s.sample("train", [4, 5, 6, 7], seed=11)
    again = sampler(JITTER).sample("train", [4, 5, 6, 7], seed=11)
    part = s.sample("train", [6, 7], seed=11)  # e.g. rank 1 of 2
    assert torch.equal(whole.support_x, again.support_x) and torch.equal(whole.query_x, again.query_x)
    assert torch.equal(whole.support_x[2:], part.support_x) and torch.equal(whole.query_x[2:], part.query_x)
    other = s.sample("train", [4, 5, 6, 7], seed=12)
    assert not torch.equal(whole.support_x, other.support_x)


def test_augment_task_batch_on_any_batch_and_noop_when_off() -> None:
    x = torch.rand(2, 4, 1, 6, 6)
    batch = TaskBatch(x, torch.zeros(2, 4, dtype=torch.long), x.clone(), torch.zeros(2, 4, dtype=torch.long),
                      EpisodeSpec(2, 2, 2), torch.tensor([0, 1]))
    assert augment_task_batch(batch, AugmentConfig(), seed=0) is batch
    out = augment_task_batch(batch, AugmentConfig(crop_padding=1, brightness=0.5), seed=0, clamp=False)
    assert out.support_x.shape == x.shape and not torch.equal(out.support_x, x)
    # support and query images draw their own parameters: identical inputs come out differently
    assert not torch.equal(out.support_x, out.query_x)


def test_config_on_the_engine() -> None:
    c = ClassificationConfig.model_validate({"augment": {"crop_padding": 4, "flip": True}})
    assert c.augment.active and c.augment.crop_padding == 4
    assert not ClassificationConfig().augment.active
    assert AugmentConfig.standard(8) == AugmentConfig(crop_padding=8, flip=True, brightness=0.4, contrast=0.4, saturation=0.4)
    with pytest.raises(ValidationError):
        ClassificationConfig.model_validate({"augment": {"crop": 4}})
    with pytest.raises(ValidationError):
        AugmentConfig(brightness=-1)
