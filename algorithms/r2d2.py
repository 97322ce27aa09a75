"""R2-D2: Bertinetto, Henriques, Torr & Vedaldi (2019), "Meta-learning with differentiable
closed-form solvers", ICLR. https://arxiv.org/abs/1805.08136

The per-task head is ridge regression from the support embeddings ``X [M, D]`` to one-hot
targets ``Y [M, ways]``, solved in closed form and back-propagated through:

    W = (X^T X + lambda I)^-1 X^T Y            (primal: a D x D system)
      = X^T (X X^T + lambda I)^-1 Y            (Woodbury identity: an M x M system)

The paper uses the Woodbury form because ``M = ways * shots`` is much smaller than ``D``;
``solver: auto`` picks whichever system is smaller. Query logits are ``scale * (Z W) + bias``
with a learned scalar scale and bias (the paper's "adjust" layer, needed because ridge outputs
live on the scale of one-hot targets and cross-entropy wants larger margins); the
regulariser ``lambda`` is learned too (in log space, so it stays positive).
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lightmeta.episodes import EpisodeSpec
from lightmeta.meta_learner import AlgorithmConfig
from lightmeta.metric import MetricMetaLearner
from lightmeta.registry import register_algorithm


class R2D2Config(AlgorithmConfig):
    """R2-D2 hyperparameters (Adam 1e-3 as in the paper)."""

    init_lambda: float = Field(default=1.0, gt=0, description="initial ridge regulariser lambda")
    learn_lambda: bool = Field(default=True, description="learn lambda with the backbone (the paper)")
    init_scale: float = Field(default=1.0, gt=0, description="initial scale of the ridge outputs")
    init_bias: float = Field(default=0.0, description="initial bias added to the scaled ridge outputs")
    solver: Literal["auto", "woodbury", "primal"] = Field(
        default="auto",
        description="woodbury: (ways*shots)^2 system; primal: features^2 system; auto: the smaller one",
    )


def ridge_weights(x: Tensor, y: Tensor, lam: Tensor, form: Literal["woodbury", "primal"]) -> Tensor:
    """Ridge solution ``W [T, D, C]`` of ``min ||X W - Y||^2 + lam ||W||^2`` for ``X [T, M, D]``,
    ``Y [T, M, C]``, by the Woodbury (``M x M``) or primal (``D x D``) linear system."""
    if form == "woodbury":
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        gram = x @ x.transpose(1, 2) + lam * eye
        return x.transpose(1, 2) @ torch.linalg.solve(gram, y)
    eye = torch.eye(x.shape[2], dtype=x.dtype, device=x.device)
    gram = x.transpose(1, 2) @ x + lam * eye
    return torch.linalg.solve(gram, x.transpose(1, 2) @ y)


@register_algorithm("r2d2")
class R2D2(MetricMetaLearner):
    """Ridge-regression head in closed form over learned embeddings, with learned lambda, scale, bias."""

    Config = R2D2Config
    config: R2D2Config

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        log_lambda = torch.tensor(math.log(self.config.init_lambda))
        if self.config.learn_lambda:
            self.log_lambda = nn.Parameter(log_lambda)
        else:
            self.register_buffer("log_lambda", log_lambda)
        self.scale = nn.Parameter(torch.tensor(float(self.config.init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(self.config.init_bias)))

    def solver_form(self, samples: int, features: int) -> Literal["woodbury", "primal"]:
        if self.config.solver != "auto":
            return self.config.solver
        return "woodbury" if samples < features else "primal"

    def fit_head(self, support_z: Tensor, support_y: Tensor, spec: EpisodeSpec) -> Tensor:
        """Ridge weights ``[T, D, ways]`` on one-hot targets. The base class runs the head in
        float32 at least with autocast off: a 16-bit linear solve would be too inexact."""
        x = support_z.flatten(2)
        y = F.one_hot(support_y, spec.ways).to(x.dtype)
        lam = self.log_lambda.exp().to(x.dtype)
        return ridge_weights(x, y, lam, self.solver_form(x.shape[1], x.shape[2]))

    def head_logits(self, state: Tensor, query_z: Tensor) -> Tensor:
        query = query_z.flatten(2).to(state.dtype)
        return self.scale * (query @ state) + self.bias
