"""Batched image augmentation of training episodes: random crop with padding, horizontal flip,
colour jitter.

The standard few-shot augmentations (e.g. MetaOptNet, Lee et al. 2019, and RFS, Tian et al.
2020, on mini-ImageNet and CIFAR-FS: ``RandomCrop(size, padding)``, ``ColorJitter(0.4, 0.4,
0.4)``, ``RandomHorizontalFlip``) are applied here to a whole :class:`TaskBatch` with a handful
of tensor operations, not per image in Python:

* every image draws :data:`DRAWS_PER_IMAGE` uniforms (crop row, crop column, flip, brightness,
  contrast, saturation) from ``generator_for(seed, "augment-train", task_id)``, one call per
  task, support images first, then query images. An image's augmentation is therefore a pure
  function of ``(seed, task id, position)``: independent of the meta-batch it is in, the DDP
  rank that draws it and of which options are switched on;
* crop: zero-pad by ``crop_padding`` pixels and cut the original size at a random offset
  (two ``gather`` calls over the batch); flip: one ``torch.where``;
* colour jitter follows torchvision's ``ColorJitter`` factors (uniform in
  ``[max(0, 1 - s), 1 + s]``) and blends (brightness: towards black; contrast: towards the
  image's mean grey level; saturation: towards its greyscale copy; ITU-R 601 luma weights),
  in the fixed order brightness, contrast, saturation (torchvision shuffles the order).
  Saturation leaves one-channel images unchanged. Blends clamp to ``[0, 1]`` when the images
  are in that range (``clamp=True``, images decoded from ``uint8``).

Training episodes only: the datamodules call :func:`augment_task_batch` for the ``train``
split, so validation and test tasks stay the fixed, un-augmented benchmark tasks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from lightmeta.episodes import TaskBatch
from lightmeta.plugin import PluginConfig
from lightmeta.seeding import generator_for

STREAM = "augment-train"
#: uniforms drawn per image: crop row, crop column, flip, brightness, contrast, saturation
DRAWS_PER_IMAGE = 6
_LUMA = (0.2989, 0.587, 0.114)


class AugmentConfig(PluginConfig):
    """Augmentations of training episodes (all off by default: the MAML/ProtoNet protocols use none)."""

    crop_padding: int = Field(default=0, ge=0, description="random crop of the original size from the image zero-padded by this many pixels (0: off)")
    flip: bool = Field(default=False, description="horizontal flip with probability 1/2")
    brightness: float = Field(default=0.0, ge=0, description="brightness factor uniform in [max(0, 1-b), 1+b] (0: off)")
    contrast: float = Field(default=0.0, ge=0, description="contrast factor uniform in [max(0, 1-c), 1+c] (0: off)")
    saturation: float = Field(default=0.0, ge=0, description="saturation factor uniform in [max(0, 1-s), 1+s] (0: off; RGB only)")

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip or self.brightness or self.contrast or self.saturation)

    @classmethod
    def standard(cls, crop_padding: int) -> "AugmentConfig":
        """The common recipe: crop with ``crop_padding`` (8 at 84x84, 4 at 32x32), flip, jitter 0.4."""
        return cls(crop_padding=crop_padding, flip=True, brightness=0.4, contrast=0.4, saturation=0.4)


def draw_uniforms(task_ids: list[int], images_per_task: int, seed: int) -> Tensor:
    """Uniforms ``[T, images_per_task, DRAWS_PER_IMAGE]``, task ``t`` from its own generator."""
    rows = [torch.rand(images_per_task, DRAWS_PER_IMAGE, generator=generator_for(seed, STREAM, int(i)))
            for i in task_ids]
    return torch.stack(rows) if rows else torch.empty(0, images_per_task, DRAWS_PER_IMAGE)


def _factor(u: Tensor, strength: float) -> Tensor:
    lo = max(0.0, 1.0 - strength)
    return lo + u * (1.0 + strength - lo)


def _grey(x: Tensor) -> Tensor:
    """Greyscale ``[B, 1, H, W]`` of ``[B, C, H, W]`` (C = 1 or 3)."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(x: Tensor, other: Tensor, factor: Tensor, clamp: bool) -> Tensor:
    out = factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other
    return out.clamp_(0, 1) if clamp else out


def random_crop(x: Tensor, padding: int, u_row: Tensor, u_col: Tensor) -> Tensor:
    """Crop ``[B, C, H, W]`` from the zero-padded images at offsets ``floor(u * (2p + 1))``."""
    b, c, h, w = x.shape
    span = 2 * padding + 1
    padded = F.pad(x, (padding, padding, padding, padding))
    top = (u_row * span).long().clamp_(max=span - 1)
    left = (u_col * span).long().clamp_(max=span - 1)
    rows = (top.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * padding)
    cols = (left.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def augment_images(x: Tensor, config: AugmentConfig, u: Tensor, clamp: bool = True) -> Tensor:
    """Augment images ``[B, C, H, W]`` with per-image uniforms ``u [B, DRAWS_PER_IMAGE]`` (one call, batched)."""
    u = u.to(device=x.device, dtype=x.dtype)
    if config.crop_padding:
        x = random_crop(x, config.crop_padding, u[:, 0], u[:, 1])
    if config.flip:
        x = torch.where((u[:, 2] < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
    if config.brightness:
        x = _blend(x, torch.zeros_like(x), _factor(u[:, 3], config.brightness), clamp)
    if config.contrast:
        mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
        x = _blend(x, mean.expand_as(x), _factor(u[:, 4], config.contrast), clamp)
    if config.saturation and x.shape[1] == 3:
        x = _blend(x, _grey(x).expand_as(x), _factor(u[:, 5], config.saturation), clamp)
    return x


def augment_task_batch(batch: TaskBatch, config: AugmentConfig, seed: int, clamp: bool = True) -> TaskBatch:
    """The batch with every support and query image augmented (a new :class:`TaskBatch`)."""
    if not config.active or len(batch) == 0:
        return batch
    n = batch.support_x.shape[1] + batch.query_x.shape[1]
    return augment_drawn(batch, config, draw_uniforms(batch.task_ids.tolist(), n, seed), clamp)


def augment_drawn(batch: TaskBatch, config: AugmentConfig, uniforms: Tensor, clamp: bool = True) -> TaskBatch:
    """:func:`augment_task_batch` with the draws ``uniforms [T, S+Q, DRAWS_PER_IMAGE]`` of
    :func:`draw_uniforms` given: drawn in a DataLoader worker, applied on the training device."""
    if not config.active or len(batch) == 0:
        return batch
    t, n_s, n_q = len(batch), batch.support_x.shape[1], batch.query_x.shape[1]
    shape = batch.support_x.shape[2:]
    x = torch.cat([batch.support_x, batch.query_x], dim=1).reshape(t * (n_s + n_q), *shape)
    x = augment_images(x, config, uniforms.reshape(-1, DRAWS_PER_IMAGE), clamp).view(t, n_s + n_q, *shape)
    return TaskBatch(x[:, :n_s].contiguous(), batch.support_y, x[:, n_s:].contiguous(), batch.query_y,
                     batch.spec, batch.task_ids)
