"""Wide ResNet: Zagoruyko & Komodakis (2016), "Wide Residual Networks", BMVC.
https://arxiv.org/abs/1605.07146 -- WRN-28-10 is the backbone of LEO (Rusu et al. 2019),
S2M2 (Mangla et al. 2020) and many few-shot baselines.

A 3x3 stem with 16 channels, then three groups of ``(depth - 4) / 6`` pre-activation basic
blocks (``BN -> ReLU -> conv3x3 -> BN -> ReLU -> dropout -> conv3x3``, a 1x1 shortcut where
the shape changes) with ``16k, 32k, 64k`` channels (``k = widen``) and strides 1, 2, 2; a final
``BN -> ReLU`` and a spatial mean: 640 features for WRN-28-10 on any input size.
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from lightmeta.errors import ConfigError
from lightmeta.models.base import Backbone
from lightmeta.plugin import PluginConfig
from lightmeta.registry import register_model


class WRNConfig(PluginConfig):
    depth: int = Field(default=28, ge=10, description="total depth; (depth - 4) must be divisible by 6")
    widen: int = Field(default=10, ge=1, description="width multiplier k")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout between the two convolutions of a block")

    @field_validator("depth")
    @classmethod
    def _depth(cls, depth: int) -> int:
        if (depth - 4) % 6:
            raise ValueError(f"depth - 4 must be divisible by 6 (e.g. 10, 16, 22, 28, 40), got depth={depth}")
        return depth


class WideBlock(nn.Module):
    """Pre-activation basic block with optional dropout and a 1x1 shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if (cin != cout or stride != 1) else None
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.dropout(F.relu(self.bn2(out)), self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


@register_model("wrn")
class WideResNet(Backbone):
    """WRN-depth-widen (default WRN-28-10) with global average pooling; optional linear head."""

    Config = WRNConfig
    config: WRNConfig

    def __init__(self, config: WRNConfig, in_shape: tuple[int, ...], out_features: int | None):
        super().__init__(config, in_shape, out_features)
        if len(in_shape) != 3:
            raise ConfigError(f"model 'wrn' needs image inputs (channels, height, width), got in_shape={tuple(in_shape)}")
        n = (config.depth - 4) // 6
        widths = [16 * config.widen, 32 * config.widen, 64 * config.widen]
        layers: list[nn.Module] = [nn.Conv2d(in_shape[0], 16, 3, padding=1, bias=False)]
        cin = 16
        for cout, stride in zip(widths, (1, 2, 2)):
            for i in range(n):
                layers.append(WideBlock(cin, cout, stride if i == 0 else 1, config.dropout))
                cin = cout
        layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = cin
        self.head = nn.Linear(cin, out_features) if out_features is not None else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x)
        return self.head(z) if self.head is not None else z


__all__ = ["WideResNet", "WRNConfig"]
