"""Backbone base class and the factory that builds one from a config section."""
from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from lightmeta.plugin import PluginConfig
from lightmeta.registry import MODELS


class Backbone(nn.Module):
    """A network built from ``(config, in_shape, out_features)``.

    ``out_features=None`` means a feature extractor; ``feature_dim`` then says its width.
    """

    Config: ClassVar[type[PluginConfig]] = PluginConfig
    registered_name: ClassVar[str]
    feature_dim: int

    def __init__(self, config: PluginConfig, in_shape: tuple[int, ...], out_features: int | None):
        super().__init__()
        self.config = config
        self.in_shape = tuple(in_shape)
        self.out_features = out_features


def build_model(section: dict[str, Any], in_shape: tuple[int, ...], out_features: int | None) -> Backbone:
    """Build the backbone named by ``section['name']`` with the rest of ``section`` as params."""
    params = dict(section)
    cls = MODELS.get(params.pop("name"))
    return cls(cls.Config(**params), tuple(in_shape), out_features)
