"""Fully connected network: the Finn et al. (2017) sinusoid regressor is MLP 1-40-40-1 ReLU."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from lightmeta.models.base import Backbone
from lightmeta.plugin import PluginConfig
from lightmeta.registry import register_model

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLPConfig(PluginConfig):
    hidden: list[int] = Field(default=[40, 40], description="widths of the hidden layers")
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    batch_norm: bool = Field(default=False, description="BatchNorm1d after each hidden layer")


@register_model("mlp")
class MLP(Backbone):
    """Flatten, then ``Linear -> [BatchNorm] -> activation`` per hidden layer, then an optional head."""

    Config = MLPConfig

    def __init__(self, config: MLPConfig, in_shape: tuple[int, ...], out_features: int | None):
        super().__init__(config, in_shape, out_features)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for h in config.hidden:
            layers.append(nn.Linear(width, h))
            if config.batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(_ACTIVATIONS[config.activation]())
            width = h
        self.features = nn.Sequential(*layers)
        self.feature_dim = width
        self.head = nn.Linear(width, out_features) if out_features is not None else None

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x)
        return self.head(z) if self.head is not None else z
