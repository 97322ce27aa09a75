"""Prototypical Networks: Snell, Swersky & Zemel (2017), "Prototypical Networks for Few-shot
Learning", NeurIPS. https://arxiv.org/abs/1703.05175

Each class is represented by the mean of its support embeddings (its prototype); a query's
logit for class ``k`` is the negative squared Euclidean distance to prototype ``k`` (paper
eq. 1-2), so the softmax over logits is the paper's ``p(y = k | x)``. The number of classes
comes from each episode, so a model trained on 60-way episodes (the paper's Omniglot setup)
is evaluated on 5- or 20-way ones unchanged.

``distance: cosine`` replaces the distance by ``scale * cos(query, prototype)``. Cosine
similarity lies in [-1, 1], which makes the softmax nearly uniform, so it is multiplied by a
temperature ``scale`` (Oreshkin et al. 2018, TADAM, "metric scaling"; Chen et al. 2019,
Baseline++), initialised to ``cosine_scale`` and learned with the backbone unless
``learn_scale: false``. With ``scale = 1`` the logits equal learn2learn's
``PrototypicalClassifier(distance="cosine")``.
"""
from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from lightmeta.episodes import EpisodeSpec
from lightmeta.meta_learner import AlgorithmConfig
from lightmeta.metric import MetricMetaLearner
from lightmeta.registry import register_algorithm


class ProtoNetConfig(AlgorithmConfig):
    """ProtoNet hyperparameters; the defaults are the paper's (Adam 1e-3, squared Euclidean)."""

    distance: Literal["euclidean", "cosine"] = Field(
        default="euclidean", description="euclidean: -||q - c||^2 (the paper); cosine: scale * cos(q, c)"
    )
    cosine_scale: float = Field(default=10.0, gt=0, description="initial (or fixed) temperature of cosine logits")
    learn_scale: bool = Field(default=True, description="learn the cosine temperature with the backbone")


def class_means(z: Tensor, y: Tensor, ways: int) -> Tensor:
    """Per-task class means ``[T, ways, D]`` of embeddings ``[T, M, D]`` with labels ``[T, M]`` in
    ``0..ways-1``; the mean is taken over however many examples each class has."""
    onehot = F.one_hot(y, ways).to(z.dtype)  # [T, M, ways]
    counts = onehot.sum(1).clamp(min=1).unsqueeze(-1)  # [T, ways, 1]
    return onehot.transpose(1, 2) @ z / counts


def squared_euclidean(query: Tensor, prototypes: Tensor) -> Tensor:
    """``||q - c||^2`` for every query ``[T, Q, D]`` and prototype ``[T, N, D]`` -> ``[T, Q, N]``.

    Computed from differences, not the ``|q|^2 - 2 q.c + |c|^2`` expansion, which loses
    precision when embeddings are large and close together.
    """
    return (query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)


@register_algorithm("protonet")
class ProtoNet(MetricMetaLearner):
    """Prototypical Networks: nearest class mean in embedding space, trained end to end."""

    Config = ProtoNetConfig
    config: ProtoNetConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.distance == "cosine":
            self.add_logit_scale(self.config.cosine_scale, self.config.learn_scale)

    def fit_head(self, support_z: Tensor, support_y: Tensor, spec: EpisodeSpec) -> Tensor:
        """Prototypes ``[T, ways, D]``: the class means of the support embeddings."""
        return class_means(support_z.flatten(2), support_y, spec.ways)

    def head_logits(self, state: Tensor, query_z: Tensor) -> Tensor:
        query = query_z.flatten(2)
        if self.config.distance == "euclidean":
            return -squared_euclidean(query, state)
        cosine = F.normalize(query, dim=-1) @ F.normalize(state, dim=-1).transpose(1, 2)
        return self.scale * cosine
