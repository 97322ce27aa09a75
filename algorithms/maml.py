"""MAML: Finn, Abbeel & Levine (2017), "Model-Agnostic Meta-Learning for Fast Adaptation of
Deep Networks", ICML. https://arxiv.org/abs/1703.03400

The inner loop (``GradientMetaLearner.inner_loop``) takes ``inner_steps`` SGD steps on each
task's support loss from the shared initialisation; the outer loop differentiates the mean
query loss through them (second order) or treats the inner gradients as constants
(``first_order: true``, FOMAML).
"""
from __future__ import annotations

from lightmeta.gradient import GradientConfig, GradientMetaLearner
from lightmeta.registry import register_algorithm


class MAMLConfig(GradientConfig):
    """MAML hyperparameters; the defaults are the paper's sinusoid setup (§5.1)."""


@register_algorithm("maml")
class MAML(GradientMetaLearner):
    """Model-Agnostic Meta-Learning (second order by default)."""

    Config = MAMLConfig
