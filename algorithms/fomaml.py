"""FOMAML: first-order MAML, Finn, Abbeel & Levine (2017), "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks", ICML, §5.2 ("first-order approximation").
https://arxiv.org/abs/1703.03400

The same algorithm as ``maml`` with ``first_order: true`` by default: the inner gradients are
treated as constants, so the meta-gradient is the query-loss gradient at the adapted weights
(no Hessian-vector products, memory linear in nothing but one inner step's activations).
Registered separately so that configs, tables and the conformance harness name it directly.
"""
from __future__ import annotations

from pydantic import Field

from lightmeta.algorithms.maml import MAML, MAMLConfig
from lightmeta.registry import register_algorithm


class FOMAMLConfig(MAMLConfig):
    """MAML hyperparameters with the first-order approximation on by default."""

    first_order: bool = Field(default=True, description="drop second-order terms of the meta-gradient (FOMAML)")


@register_algorithm("fomaml")
class FOMAML(MAML):
    """First-order MAML: MAML whose meta-gradient ignores second derivatives."""

    Config = FOMAMLConfig
