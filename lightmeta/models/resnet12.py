"""ResNet-12: the few-shot backbone of TADAM (Oreshkin et al. 2018) and MetaOptNet (Lee et al.
2019, https://arxiv.org/abs/1904.03758), widths 64-160-320-640, with DropBlock.

Four residual blocks; each is three ``conv3x3 -> BatchNorm -> LeakyReLU(0.1)`` layers (the last
activation after the residual sum), a ``conv1x1 -> BatchNorm`` shortcut, then 2x2 max-pooling
and regularisation: dropout in the first two blocks, DropBlock (Ghiasi et al. 2018,
https://arxiv.org/abs/1810.12890) in the last two, as in MetaOptNet's code. DropBlock's drop
rate ramps up linearly from 0 to ``drop_rate`` over ``dropblock_ramp_steps`` training forwards
(counted by the block's BatchNorm ``num_batches_tracked``, so the schedule survives checkpoints).
An 84x84 image gives a 640x5x5 map, flattened to 16,000 features (MetaOptNet's embedding), or
640 with ``global_pool: true``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lightmeta.errors import ConfigError
from lightmeta.models.base import Backbone
from lightmeta.plugin import PluginConfig
from lightmeta.registry import register_model

#: Blocks (counted from 0) regularised with DropBlock instead of dropout.
DROPBLOCK_FROM = 2


class ResNet12Config(PluginConfig):
    channels: list[int] = Field(default=[64, 160, 320, 640], min_length=4, max_length=4, description="widths of the 4 blocks")
    drop_rate: float = Field(default=0.1, ge=0, lt=1, description="dropout / DropBlock rate (MetaOptNet: 0.1)")
    dropblock_size: int = Field(default=5, ge=1, description="DropBlock block size (MetaOptNet: 5 for 84x84, 2 for 32x32)")
    dropblock_ramp_steps: int = Field(default=40000, ge=1, description="training forwards over which DropBlock's rate ramps up")
    leaky_slope: float = Field(default=0.1, ge=0, description="negative slope of the LeakyReLUs")
    global_pool: bool = Field(default=False, description="average the last map over space (640 features) instead of flattening")


def drop_block(x: Tensor, gamma: float, block: int) -> Tensor:
    """DropBlock: zero ``block x block`` squares whose top-left corners are drawn with
    probability ``gamma`` per valid position, then rescale to keep the expected activation."""
    n, c, h, w = x.shape
    block = min(block, h, w)
    corners = torch.bernoulli(torch.full((n, c, h - block + 1, w - block + 1), gamma, device=x.device, dtype=x.dtype))
    covered = F.max_pool2d(F.pad(corners, [block - 1] * 4), kernel_size=block, stride=1)  # [n, c, h, w]
    keep = 1 - covered
    return x * keep * (keep.numel() / keep.sum().clamp(min=1))


class ResBlock(nn.Module):
    """Three 3x3 convolutions with a 1x1 shortcut, max-pool, then dropout or DropBlock."""

    def __init__(self, cin: int, cout: int, slope: float, drop_rate: float, dropblock: bool, block: int, ramp: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(c, cout, 3, padding=1, bias=False) for c in (cin, cout, cout)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(cout) for _ in range(3)])
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.slope, self.drop_rate, self.dropblock, self.block, self.ramp = slope, drop_rate, dropblock, block, ramp

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            out = norm(conv(out))
            if i < 2:
                out = F.leaky_relu(out, self.slope)
        out = F.max_pool2d(F.leaky_relu(out + self.shortcut(x), self.slope), 2)
        if not self.training or self.drop_rate == 0:
            return out
        if not self.dropblock:
            return F.dropout(out, self.drop_rate, training=True)
        rate = self.drop_rate * min(1.0, float(self.norms[0].num_batches_tracked) / self.ramp)
        size = out.shape[-1]
        block = min(self.block, size)
        gamma = rate / block**2 * size**2 / (size - block + 1) ** 2
        return drop_block(out, gamma, block) if gamma > 0 else out


@register_model("resnet12")
class ResNet12(Backbone):
    """ResNet-12 (64-160-320-640, DropBlock) of TADAM/MetaOptNet; optional linear head."""

    Config = ResNet12Config
    config: ResNet12Config

    def __init__(self, config: ResNet12Config, in_shape: tuple[int, ...], out_features: int | None):
        super().__init__(config, in_shape, out_features)
        if len(in_shape) != 3:
            raise ConfigError(f"model 'resnet12' needs image inputs (channels, height, width), got in_shape={tuple(in_shape)}")
        channels, height, width = in_shape
        if height < 16 or width < 16:
            raise ConfigError(f"model 'resnet12': in_shape={tuple(in_shape)} is too small for 4 max-pools; use at least 16x16 images")
        blocks = []
        for i, cout in enumerate(config.channels):
            blocks.append(ResBlock(channels, cout, config.leaky_slope, config.drop_rate, i >= DROPBLOCK_FROM,
                                   config.dropblock_size, config.dropblock_ramp_steps))
            channels, height, width = cout, height // 2, width // 2
        self.blocks = nn.Sequential(*blocks)
        self.global_pool = config.global_pool
        self.feature_dim = channels if config.global_pool else channels * height * width
        self.head = nn.Linear(self.feature_dim, out_features) if out_features is not None else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        z = self.blocks(x)
        z = z.mean((2, 3)) if self.global_pool else z.flatten(1)
        return self.head(z) if self.head is not None else z


__all__ = ["ResNet12", "ResNet12Config", "drop_block"]
