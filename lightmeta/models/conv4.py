"""Conv4: the four-block convolutional backbone of few-shot image classification.

Vinyals et al. (2016), Snell et al. (2017, ProtoNet) and Finn et al. (2017, MAML) use four
blocks of ``3x3 conv (padding 1) -> BatchNorm -> ReLU -> 2x2 max-pool`` with 64 filters;
MAML's mini-ImageNet model has 32 filters (registered as ``conv4_32``). MAML's reference code
for Omniglot downsamples with stride-2 convolutions instead of max-pooling and averages the
last feature map over space (``pool: stride``, ``global_pool: true``), which is also four
times cheaper in the first layer. Relation Networks (Sung et al. 2018) downsample in the
first two blocks only and compare feature maps: ``pooled_blocks: 2, keep_spatial: true``
(``feature_shape`` then says ``(C, H, W)``).

Plain ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` modules, so ``torch.func.functional_call``
can swap any parameter, and BatchNorm follows whatever mode the caller sets (the gradient
learners' transductive mode included).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from lightmeta.errors import ConfigError
from lightmeta.models.base import Backbone
from lightmeta.plugin import PluginConfig
from lightmeta.registry import register_model

BLOCKS = 4


class Conv4Config(PluginConfig):
    filters: int = Field(default=64, ge=1, description="channels of every conv layer")
    pool: Literal["max", "stride"] = Field(
        default="max",
        description="max: conv stride 1 then 2x2 max-pool (the papers); stride: stride-2 conv, no pool "
        "(MAML's Omniglot reference code)",
    )
    global_pool: bool = Field(
        default=False, description="average the last feature map over space (features = filters) instead of flattening"
    )
    pooled_blocks: int = Field(
        default=BLOCKS, ge=0, le=BLOCKS,
        description="how many of the blocks (the first ones) downsample; Relation Networks pool only in the first 2",
    )
    keep_spatial: bool = Field(
        default=False,
        description="return feature maps (C, H, W) instead of flattened features (Relation Networks' relation "
        "module compares maps); only without global_pool and a linear head",
    )
    batch_norm_momentum: float = Field(default=0.1, gt=0, le=1, description="BatchNorm running-statistics momentum")
    init: Literal["default", "maml"] = Field(
        default="default",
        description="default: PyTorch's initialisation; maml: Glorot-uniform conv/linear weights and zero "
        "biases (MAML's reference code, learn2learn's maml_init_)",
    )


def _downsampled(size: int, pool: str) -> int:
    """Spatial size after one block: 2x2 max-pool floors, a stride-2 3x3 conv (padding 1) ceils."""
    return size // 2 if pool == "max" else (size + 1) // 2


@register_model("conv4")
class Conv4(Backbone):
    """Four ``conv3x3 -> BatchNorm -> ReLU -> downsample`` blocks, flattened; optional linear head."""

    Config = Conv4Config
    config: Conv4Config

    def __init__(self, config: Conv4Config, in_shape: tuple[int, ...], out_features: int | None):
        super().__init__(config, in_shape, out_features)
        if len(in_shape) != 3:
            raise ConfigError(
                f"model '{self.registered_name}' needs image inputs (channels, height, width), got in_shape={tuple(in_shape)}; "
                "use model.name=mlp for vector inputs"
            )
        if config.keep_spatial and (config.global_pool or out_features is not None):
            raise ConfigError(
                f"model '{self.registered_name}': keep_spatial=true returns feature maps, so it needs "
                "global_pool=false and an algorithm that uses raw features (no linear head)"
            )
        channels, height, width = in_shape
        layers: list[nn.Module] = []
        for block in range(BLOCKS):
            downsample = block < config.pooled_blocks
            stride = 2 if downsample and config.pool == "stride" else 1
            layers += [
                nn.Conv2d(channels, config.filters, kernel_size=3, stride=stride, padding=1),
                nn.BatchNorm2d(config.filters, momentum=config.batch_norm_momentum),
                nn.ReLU(),
            ]
            if downsample and config.pool == "max":
                layers.append(nn.MaxPool2d(2))
            channels = config.filters
            if downsample:
                height, width = _downsampled(height, config.pool), _downsampled(width, config.pool)
            if height < 1 or width < 1:
                raise ConfigError(
                    f"model '{self.registered_name}': in_shape={tuple(in_shape)} is too small for {config.pooled_blocks} "
                    f"2x downsampling blocks; images need at least {2 ** config.pooled_blocks}x{2 ** config.pooled_blocks} "
                    "pixels with pool=max"
                )
        if config.global_pool:
            layers.append(nn.AdaptiveAvgPool2d(1))
            height = width = 1
        if not config.keep_spatial:
            layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.feature_dim = channels * height * width
        #: shape of one example's features: (C, H, W) with keep_spatial, else (feature_dim,)
        self.feature_shape: tuple[int, ...] = (channels, height, width) if config.keep_spatial else (self.feature_dim,)
        self.head = nn.Linear(self.feature_dim, out_features) if out_features is not None else None
        if config.init == "maml":
            self._maml_init()

    def _maml_init(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x)
        return self.head(z) if self.head is not None else z


class Conv4x32Config(Conv4Config):
    filters: int = Field(default=32, ge=1, description="channels of every conv layer")


@register_model("conv4_32")
class Conv4x32(Conv4):
    """Conv4 with 32 filters: MAML's mini-ImageNet backbone (Finn et al. 2017, §5.2)."""

    Config = Conv4x32Config


__all__ = ["Conv4", "Conv4Config", "Conv4x32", "Conv4x32Config"]
