"""Episodes built on the training device (``data.episode_transfer=uint8|indices``) are the
episodes the DataLoader builds itself (``float``): same draws, same pixels, same augmentation,
for training, validation and test, on every rank, through workers and through a real Trainer."""
from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightmeta import classification
from lightmeta.classification import ClassificationDataModule, ClassImages, EpisodePlan
from lightmeta.config import validate_config
from lightmeta.episodes import TaskBatch
from lightmeta.errors import ConfigError

SIDE = 8
COUNTS = [6, 7, 6, 8, 6, 9, 6, 7, 6, 6, 8, 6]  # unequal classes: the masked draw path too
SPLITS = {"train": [0, 1, 2, 3, 4, 5], "val": [6, 7, 8], "test": [9, 10, 11]}
JITTER = {"crop_padding": 2, "flip": True, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4}
BASE: dict[str, Any] = {"ways": 3, "shots": 2, "queries": 2, "eval_shots": 1, "meta_batch_size": 4,
                        "train_batches_per_epoch": 3, "val_tasks": 5, "test_tasks": 6, "eval_batch_size": 2,
                        "augment": JITTER}


def images(dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (sum(COUNTS), 3, SIDE, SIDE), dtype=torch.uint8, generator=g)
    return x if dtype == torch.uint8 else x.to(dtype) / 255


class RGBDataModule(ClassificationDataModule):
    """Random RGB images, 12 classes of unequal sizes."""

    pixels: torch.dtype = torch.uint8

    def image_shape(self) -> tuple[int, int, int]:
        return (3, SIDE, SIDE)

    def load_classes(self) -> ClassImages:
        return ClassImages.from_counts(images(self.pixels), COUNTS, SPLITS)


def datamodule(seed: int = 5, **params: Any) -> RGBDataModule:
    dm = RGBDataModule({**BASE, **params}, seed=seed)
    dm.setup("fit")
    return dm


def received(dm: ClassificationDataModule, split: str) -> list[Any]:
    """What a step receives: each loader item moved to the (CPU) device as Lightning moves it, then the hook."""
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return [dm.on_after_batch_transfer(move_data_to_device(item, torch.device("cpu")), 0) for item in loader]


def assert_same(a: TaskBatch, b: TaskBatch) -> None:
    assert isinstance(a, TaskBatch) and isinstance(b, TaskBatch)
    assert a.spec == b.spec and a.support_x.dtype == b.support_x.dtype
    for name in ("support_x", "support_y", "query_x", "query_y", "task_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("rotations", ["train", "all"])
@pytest.mark.parametrize("transfer", ["uint8", "indices"])
def test_device_built_episodes_equal_loader_built_ones(transfer: str, rotations: str) -> None:
    float_dm = datamodule(augment_rotations=rotations)
    device_dm = datamodule(augment_rotations=rotations, episode_transfer=transfer)
    plan = next(iter(device_dm.train_dataloader()))
    assert isinstance(plan, EpisodePlan) and len(plan) == 4
    if transfer == "uint8":  # the pixels travel as uint8, already gathered and rotated
        assert plan.support_x is not None and plan.support_x.dtype == torch.uint8
    else:  # only indices and draws travel
        assert plan.support_x is None and plan.query_x is None and plan.index.shape == (4, 3, 4)
    for split in ("train", "val", "test"):
        ours, theirs = received(device_dm, split), received(float_dm, split)
        assert len(ours) == len(theirs) > 1
        for a, b in zip(ours, theirs):
            assert_same(a, b)
    # the comparison covers augmentation and rotation: without them the training episodes differ
    plain = received(datamodule(augment_rotations="none", augment={}), "train")[0]
    assert not torch.equal(plain.support_x, received(float_dm, "train")[0].support_x)


@pytest.mark.parametrize("transfer", ["uint8", "indices"])
def test_each_rank_receives_its_share_of_the_same_episodes(transfer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = received(datamodule(), "train")
    for split in ("train", "val"):
        shares = []
        for rank in (0, 1):
            float_dm, device_dm = datamodule(), datamodule(episode_transfer=transfer)
            for dm in (float_dm, device_dm):
                monkeypatch.setattr(dm, "_rank_world", lambda rank=rank: (rank, 2))
            ours, theirs = received(device_dm, split), received(float_dm, split)
            for a, b in zip(ours, theirs, strict=True):
                assert_same(a, b)
            shares.append(ours)
        if split == "train":  # the two ranks' halves make up the single-process meta-batch
            for b, (r0, r1) in enumerate(zip(*shares)):
                assert torch.equal(torch.cat([r0.query_x, r1.query_x]), whole[b].query_x)
                assert not set(r0.task_ids.tolist()) & set(r1.task_ids.tolist())


def test_plans_travel_through_worker_processes() -> None:
    ours = received(datamodule(episode_transfer="indices", num_workers=1), "train")
    for a, b in zip(ours, received(datamodule(), "train"), strict=True):
        assert_same(a, b)


class Recorder(L.LightningModule):
    """Keeps every batch its steps receive."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.seen: dict[str, list[TaskBatch]] = {"train": [], "val": []}

    def training_step(self, batch: TaskBatch, batch_idx: int) -> torch.Tensor:
        self.seen["train"].append(batch)
        return self.weight * batch.support_x.float().mean()

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self.seen["val"].append(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trained(transfer: str, precision: str) -> Recorder:
    module = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=RGBDataModule({**BASE, "episode_transfer": transfer, "augment_rotations": "train"}, seed=5))
    return module


def test_a_trainer_steps_on_the_same_episodes_in_the_training_precision() -> None:
    # bf16-true casts batches before the transfer: the device path must cast the built episode
    # instead, and its augmentation draws must arrive unrounded
    reference = trained("float", "bf16-true")
    for transfer in ("uint8", "indices"):
        module = trained(transfer, "bf16-true")
        for split in ("train", "val"):
            assert len(module.seen[split]) == len(reference.seen[split]) > 0
            for a, b in zip(module.seen[split], reference.seen[split]):
                assert a.support_x.dtype == torch.bfloat16
                assert_same(a, b)


def test_indices_refuses_a_dataset_that_does_not_fit_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    dm = datamodule(episode_transfer="indices")
    size = images().numel()
    monkeypatch.setattr(classification, "device_memory_bytes", lambda device: 2 * size - 1)  # just under twice the data
    plan = next(iter(dm.train_dataloader()))
    with pytest.raises(ConfigError, match=r"^data\.episode_transfer=indices holds the whole dataset on cpu, .* exceed 50% "
                                          r"of the device's .* set data\.episode_transfer=uint8") as err:
        dm.on_after_batch_transfer(plan, 0)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(classification, "device_memory_bytes", lambda device: 2 * size)  # exactly fits
    assert isinstance(dm.on_after_batch_transfer(plan, 0), TaskBatch)


def test_uint8_transfer_needs_uint8_images() -> None:
    class FloatImages(RGBDataModule):
        pixels = torch.float32

    with pytest.raises(ConfigError, match=r"data\.episode_transfer=uint8 .* images are torch\.float32; set data\.episode_transfer"):
        FloatImages({**BASE, "episode_transfer": "uint8"}).setup("fit")
    # indices holds float images on the device as they are: same episodes as the loader's
    float_dm, device_dm = FloatImages(BASE, seed=1), FloatImages({**BASE, "episode_transfer": "indices"}, seed=1)
    float_dm.setup("fit"), device_dm.setup("fit")
    assert_same(received(device_dm, "train")[0], received(float_dm, "train")[0])


def test_datamodules_without_device_episodes_reject_the_option(tmp_path: Any) -> None:
    run = {"output_dir": str(tmp_path), "algorithm": {"name": "protonet"}, "model": {"name": "conv4"}}
    with pytest.raises(ConfigError, match=r"unknown key 'data\.episode_transfer'"):
        validate_config({**run, "data": {"name": "synthetic", "episode_transfer": "indices"}})
    source = {"name": "imagefolder", "root": str(tmp_path), "episode_transfer": "uint8"}
    with pytest.raises(ConfigError, match=r"sources\[0\]\.episode_transfer: the mixture builds its episodes in the DataLoader"):
        validate_config({**run, "data": {"name": "mixture", "sources": [source]}})
