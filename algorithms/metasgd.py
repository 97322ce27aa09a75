"""Meta-SGD: Li, Zhou, Chen & Li (2017), "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning". https://arxiv.org/abs/1707.09835

MAML whose inner step uses a learned learning rate per parameter element:
``phi = theta - alpha * grad`` with ``alpha`` a tensor shaped like ``theta`` (direction and
size of the update are both meta-learned). The rates live in ``inner_lrs`` (one entry per
adapted parameter, initialised to ``inner_lr``, as learn2learn's ``MetaSGD(lr=...)``) and are
trained by the outer optimizer with the network.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightmeta.gradient import GradientConfig, GradientMetaLearner, Params, param_key
from lightmeta.registry import register_algorithm
from lightmeta.task_info import TaskInfo


class MetaSGDConfig(GradientConfig):
    """Meta-SGD hyperparameters; ``inner_lr`` is the initial value of every learned rate."""


@register_algorithm("metasgd")
class MetaSGD(GradientMetaLearner):
    """MAML with learned per-parameter inner learning rates."""

    Config = MetaSGDConfig

    def __init__(self, algorithm: dict[str, Any] | None = None, *, model: dict[str, Any],
                 task: dict[str, Any] | TaskInfo) -> None:
        super().__init__(algorithm, model=model, task=task)
        named = dict(self.model.named_parameters())
        self.inner_lrs = nn.ParameterDict({
            param_key(n): nn.Parameter(torch.full_like(named[n].detach(), self.config.inner_lr))
            for n in self.inner_param_names()
        })

    def inner_update(self, params: Params, grads: Params, step: int) -> Params:
        return {k: p - self.inner_lrs[param_key(k)] * grads[k] for k, p in params.items()}
