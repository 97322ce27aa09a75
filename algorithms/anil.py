"""ANIL (Almost No Inner Loop): Raghu, Raghu, Bengio & Vinyals (2020), "Rapid Learning or Feature
Reuse? Towards Understanding the Effectiveness of MAML", ICLR. https://arxiv.org/abs/1909.09157

MAML whose inner loop adapts only the backbone's ``head`` (the final linear layer); the body is
meta-learned by the outer loop alone. The outer gradient reaches the body through the query
features and, second order, through the head's inner gradients (learn2learn's ANIL recipe:
``features = body(x)``, ``l2l.algorithms.MAML(head)`` adapted on the features).
"""
from __future__ import annotations

from typing import Any

from lightmeta.errors import ConfigError
from lightmeta.gradient import GradientConfig, GradientMetaLearner
from lightmeta.registry import register_algorithm
from lightmeta.task_info import TaskInfo


class ANILConfig(GradientConfig):
    """ANIL hyperparameters; ``inner_lr`` applies to the head only (the paper: MAML's values)."""


def head_param_names(learner: GradientMetaLearner, algorithm: str) -> list[str]:
    """Trainable parameter names of the backbone's ``head``, or a ConfigError naming the fix."""
    head = getattr(learner.model, "head", None)
    names = [f"head.{n}" for n, p in head.named_parameters() if p.requires_grad] if head is not None else []
    if not names:
        model = getattr(learner.model, "registered_name", type(learner.model).__name__)
        raise ConfigError(
            f"algorithm '{algorithm}' splits the network into body and `head`, but model '{model}' has no "
            "trainable `head`; use a backbone that exposes one (mlp, conv4, ...)"
        )
    return names


@register_algorithm("anil")
class ANIL(GradientMetaLearner):
    """MAML with a head-only inner loop."""

    Config = ANILConfig

    def __init__(self, algorithm: dict[str, Any] | None = None, *, model: dict[str, Any],
                 task: dict[str, Any] | TaskInfo) -> None:
        super().__init__(algorithm, model=model, task=task)
        self._head_names = head_param_names(self, "anil")

    def inner_param_names(self) -> list[str]:
        return list(self._head_names)
