"""R2-D2: the closed-form head against an independent solve of the ridge normal equations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightmeta.episodes import EpisodeSpec
from lightmeta.registry import ALGORITHMS
from lightmeta.task_info import TaskInfo

IDENTITY = {"name": "mlp", "hidden": []}


def make(features: int, **algo) -> torch.nn.Module:
    info = TaskInfo(problem="classification", in_shape=(features,), train_ways=3, eval_ways=3)
    return ALGORITHMS.get("r2d2")(algo, model=IDENTITY, task=info).double()


def normal_equation_weights(x: torch.Tensor, y: torch.Tensor, ways: int, lam: float) -> torch.Tensor:
    """``(X^T X + lam I) W = X^T Y`` solved one task at a time."""
    onehot = F.one_hot(y, ways).double()
    return torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ onehot)


@pytest.mark.parametrize(("features", "solver"), [(12, "woodbury"), (12, "primal"), (12, "auto"), (4, "auto")])
def test_head_equals_the_ridge_normal_equations(features: int, solver: str) -> None:
    g = torch.Generator().manual_seed(0)
    spec = EpisodeSpec(ways=3, shots=2, queries=2)
    learner = make(features, solver=solver, init_lambda=0.7, init_scale=2.0, init_bias=0.3)
    sx = torch.randn(2, spec.support_size, features, generator=g, dtype=torch.float64)
    sy = torch.stack([torch.randperm(6, generator=g) % 3 for _ in range(2)])
    qx = torch.randn(2, spec.query_size, features, generator=g, dtype=torch.float64)
    w = learner.fit_head(sx, sy, spec)
    logits = learner.head_logits(w, qx)
    lam = learner.log_lambda.exp().item()  # 0.7 up to the float32 rounding of its logarithm
    assert math.isclose(lam, 0.7, rel_tol=1e-6)
    for t in range(2):
        ref = normal_equation_weights(sx[t], sy[t], 3, lam)
        torch.testing.assert_close(w[t], ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(logits[t], learner.scale.item() * qx[t] @ ref + learner.bias.item(), rtol=1e-10, atol=1e-12)
    # the ridge solution is not trivially zero or the least-squares fit
    assert w.abs().max() > 1e-3


def test_woodbury_and_primal_forms_agree_and_auto_picks_the_smaller_system() -> None:
    g = torch.Generator().manual_seed(1)
    spec = EpisodeSpec(ways=4, shots=3, queries=1)
    sx = torch.randn(3, spec.support_size, 20, generator=g, dtype=torch.float64)
    sy = (torch.arange(12) % 4).repeat(3, 1)
    ws = {s: make(20, solver=s).fit_head(sx, sy, spec) for s in ("woodbury", "primal")}
    torch.testing.assert_close(ws["woodbury"], ws["primal"], rtol=1e-10, atol=1e-12)
    learner = make(20)
    assert learner.solver_form(12, 20) == "woodbury" and learner.solver_form(30, 20) == "primal"


def test_lambda_scale_and_bias_are_learned() -> None:
    g = torch.Generator().manual_seed(2)
    spec = EpisodeSpec(ways=3, shots=2, queries=2)
    learner = make(8)
    sx = torch.randn(1, 6, 8, generator=g, dtype=torch.float64)
    sy = torch.tensor([[0, 1, 2, 0, 1, 2]])
    qx = torch.randn(1, 6, 8, generator=g, dtype=torch.float64)
    loss = F.cross_entropy(learner.head_logits(learner.fit_head(sx, sy, spec), qx)[0], sy[0])
    loss.backward()
    for name in ("log_lambda", "scale", "bias"):
        grad = getattr(learner, name).grad
        assert grad is not None and grad.abs() > 0, name
    assert math.isclose(learner.log_lambda.exp().item(), 1.0)
    fixed = make(8, learn_lambda=False)
    assert "log_lambda" not in dict(fixed.named_parameters())
