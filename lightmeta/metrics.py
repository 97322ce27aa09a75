"""Mean with a 95% confidence interval over evaluation tasks, synchronised across DDP ranks."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

Z_95 = 1.96


class MeanCI(Metric):
    """Mean of per-task values and its 95% CI ``1.96 * std / sqrt(n)`` (sample std, ddof=1).

    Sums are kept in float64 and reduced by summation, so the figure is identical whether
    the tasks were evaluated on one rank or split across many.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        v = values.detach().reshape(-1).to(torch.float64)
        self.total += v.sum()
        self.total_sq += (v * v).sum()
        self.count += v.numel()

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        mean = self.total / n.clamp(min=1)
        var = (self.total_sq - n * mean * mean) / (n - 1).clamp(min=1)
        ci = Z_95 * var.clamp(min=0).sqrt() / n.clamp(min=1).sqrt()
        return {"mean": mean, "ci95": ci, "n": n}


def mean_ci(values: Tensor | list[float]) -> tuple[float, float]:
    """Mean and 95% CI of a set of per-task values (ddof=1), for reports and tests."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), Z_95 * float(v.std(unbiased=True)) / math.sqrt(v.numel())
