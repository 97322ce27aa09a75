"""Relation Networks: Sung, Yang, Zhang, Xiang, Torr & Hospedales (2018), "Learning to Compare:
Relation Network for Few-Shot Learning", CVPR. https://arxiv.org/abs/1711.06025

The embedding module maps each image to a feature map; a class is represented by the
element-wise **sum** of its support feature maps (paper §3.2, K-shot). A learned *relation
module* scores each (query, class) pair from the channel-wise concatenation of the two maps:
two ``conv3x3 (padding 1) -> BatchNorm -> ReLU -> 2x2 max-pool`` blocks, then ``FC -> ReLU ->
FC -> sigmoid``, a relation score in [0, 1] (paper Fig. 2). The paper's embedding is Conv4 with
max-pooling in the first two blocks only: ``model: {name: conv4, keep_spatial: true,
pooled_blocks: 2}``. A block's pooling is skipped when the map is already 1x1, so other
backbone settings work too; a backbone with flat features gets the same relation module
without the conv blocks (an MLP on the concatenated vectors).

Loss: as in the paper, the mean squared error between the relation scores and the one-hot
query labels (``loss_fn``/``batch_metrics`` are overridden; the scores are returned as the
"logits", so accuracy is their argmax). The reported ``loss`` is that MSE.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lightmeta.algorithms.protonet import class_means
from lightmeta.episodes import EpisodeSpec
from lightmeta.meta_learner import AlgorithmConfig
from lightmeta.metric import MetricMetaLearner
from lightmeta.registry import register_algorithm

CONV_BLOCKS = 2


class RelationNetConfig(AlgorithmConfig):
    """Relation Network hyperparameters (the paper's: Adam 1e-3, 64 relation channels, FC 8)."""

    relation_channels: int = Field(default=64, ge=1, description="channels of the relation module's conv blocks")
    relation_hidden: int = Field(default=8, ge=1, description="width of the relation module's hidden FC layer")


class RelationModule(nn.Module):
    """Scores concatenated (query, class) features ``[B, 2C, H, W]`` or ``[B, 2D]`` -> ``[B]`` in [0, 1]."""

    def __init__(self, feature_shape: tuple[int, ...], channels: int, hidden: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if len(feature_shape) == 3:
            c, h, w = feature_shape
            in_channels = 2 * c
            for _ in range(CONV_BLOCKS):
                layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
                if h >= 2 and w >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
                in_channels = channels
            flat = channels * h * w
        else:
            flat = 2 * feature_shape[0]
        layers += [nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, pairs: Tensor) -> Tensor:
        return self.net(pairs).squeeze(-1)


@register_algorithm("relationnet")
class RelationNet(MetricMetaLearner):
    """A learned relation module scores query/class pairs of feature maps; MSE to one-hot."""

    Config = RelationNetConfig
    config: RelationNetConfig
    example_model = {"name": "conv4", "filters": 8, "keep_spatial": True, "pooled_blocks": 2}
    fp32_head = False  # the relation module is a learned conv net: it keeps mixed precision's speed

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        shape = tuple(getattr(self.model, "feature_shape", (self.model.feature_dim,)))
        self.relation = RelationModule(shape, self.config.relation_channels, self.config.relation_hidden)

    def fit_head(self, support_z: Tensor, support_y: Tensor, spec: EpisodeSpec) -> Tensor:
        """Class representations ``[T, ways, *F]``: the sum of each class's support features."""
        flat = support_z.flatten(2)
        counts = F.one_hot(support_y, spec.ways).sum(1).to(flat.dtype).unsqueeze(-1)  # [T, ways, 1]
        sums = class_means(flat, support_y, spec.ways) * counts
        return sums.view(*sums.shape[:2], *support_z.shape[2:])

    def head_logits(self, state: Tensor, query_z: Tensor) -> Tensor:
        """Relation scores ``[T, Q, ways]`` in [0, 1] of every query/class pair."""
        t, q, n = state.shape[0], query_z.shape[1], state.shape[1]
        feature = query_z.shape[2:]
        queries = query_z.unsqueeze(2).expand(t, q, n, *feature)
        classes = state.unsqueeze(1).expand(t, q, n, *feature)
        pairs = torch.cat([queries, classes], dim=3)  # channels (or vector entries) concatenated
        return self.relation(pairs.flatten(0, 2)).view(t, q, n)

    def loss_fn(self, preds: Tensor, targets: Tensor) -> Tensor:
        """Mean squared error between relation scores and one-hot labels (the paper's loss)."""
        return F.mse_loss(preds, F.one_hot(targets, preds.shape[-1]).to(preds.dtype))

    def batch_metrics(self, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Per-task query MSE ``loss`` and ``acc``, each ``[T]``."""
        onehot = F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
        correct = (logits.argmax(-1) == targets).float()
        return {"loss": (logits - onehot).pow(2).mean((1, 2)), "acc": correct.mean(1)}
