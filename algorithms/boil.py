"""BOIL (Body Only update in Inner Loop): Oh, Yoo, Kim & Yun (2021), "BOIL: Towards Representation
Change for Few-shot Learning", ICLR. https://arxiv.org/abs/2008.08882

The mirror image of ANIL: the inner loop adapts every trainable parameter except the backbone's
``head``, which stays at its meta-learned value during adaptation (the paper's head learning
rate 0) and is trained by the outer loop only. Forcing adaptation into the body is the paper's
"representation change".
"""
from __future__ import annotations

from typing import Any

from lightmeta.algorithms.anil import head_param_names
from lightmeta.gradient import GradientConfig, GradientMetaLearner
from lightmeta.registry import register_algorithm
from lightmeta.task_info import TaskInfo


class BOILConfig(GradientConfig):
    """BOIL hyperparameters; ``inner_lr`` applies to the body (the paper: 0.5 with Conv4 images)."""


@register_algorithm("boil")
class BOIL(GradientMetaLearner):
    """MAML with a body-only inner loop (frozen head during adaptation)."""

    Config = BOILConfig

    def __init__(self, algorithm: dict[str, Any] | None = None, *, model: dict[str, Any],
                 task: dict[str, Any] | TaskInfo) -> None:
        super().__init__(algorithm, model=model, task=task)
        head = set(head_param_names(self, "boil"))
        self._body_names = [n for n in super().inner_param_names() if n not in head]

    def inner_param_names(self) -> list[str]:
        return list(self._body_names)
