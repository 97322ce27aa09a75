"""Test helpers shared by the test modules (``from helpers import require_data``).

Real-data and peer tests use :func:`require_data` / :func:`require_peer`: they skip when the data
(``LIGHTMETA_DATA_DIR``) or the peer library is absent, unless CI sets ``LIGHTMETA_REQUIRE_DATA=1``
/ ``LIGHTMETA_REQUIRE_PEERS=1``, which turns the skip into a failure.
"""
from __future__ import annotations

import gc
import importlib
import os
import weakref
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from lightmeta import Backbone, MetaLearner, PluginConfig, TaskBatch


def _required(var: str) -> bool:
    return os.environ.get(var, "") not in ("", "0", "false")


def require_peer(module: str = "learn2learn") -> ModuleType:
    """Import a peer library, or skip (fail under ``LIGHTMETA_REQUIRE_PEERS=1``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if _required("LIGHTMETA_REQUIRE_PEERS"):
            pytest.fail(f"peer '{module}' is required (LIGHTMETA_REQUIRE_PEERS=1) but cannot be imported: {exc}")
        pytest.skip(f"peer '{module}' not installed (bash ../shared/peers/install-learn2learn.sh)")


def require_data(*parts: str) -> Path:
    """``$LIGHTMETA_DATA_DIR/<parts>``, or skip (fail under ``LIGHTMETA_REQUIRE_DATA=1``)."""
    root = os.environ.get("LIGHTMETA_DATA_DIR")
    path = Path(root, *parts) if root else None
    if path is None or not path.exists():
        msg = f"real data {'/'.join(parts)} not found under LIGHTMETA_DATA_DIR={root!r}"
        if _required("LIGHTMETA_REQUIRE_DATA"):
            pytest.fail(msg + " (LIGHTMETA_REQUIRE_DATA=1)")
        pytest.skip(msg)
    return path


class TinyConvConfig(PluginConfig):
    channels: int = 4


class TinyConvBN(Backbone):
    """Two conv+BatchNorm blocks and a linear head: a small stand-in for Conv4."""

    Config = TinyConvConfig

    def __init__(self, config: TinyConvConfig, in_shape: tuple[int, ...], out_features: int | None):
        super().__init__(config, in_shape, out_features)
        c = config.channels
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[0], c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.feature_dim = c * (in_shape[1] // 4) * (in_shape[2] // 4)
        self.head = nn.Linear(self.feature_dim, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def graph_bytes(learner: MetaLearner, batch: TaskBatch) -> int:
    """Bytes of the distinct storages that the autograd graph of one meta-loss keeps for backward.

    Every tensor saved for backward passes the hook; those still alive once ``meta_loss`` has
    returned (held by the graph of the loss) are what the backward pass needs kept, while the
    graphs built and freed inside it (the checkpointed steps' forward, the tasks back-propagated
    by ``task_backward``) are gone.
    """
    saved: list[weakref.ref[torch.Tensor]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = learner.meta_loss(batch)
    gc.collect()
    alive = [t for t in (r() for r in saved) if t is not None]
    total = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}.values())
    del loss
    return total


def meta_gradients(learner: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    """d ``loss`` / d each trainable parameter of ``learner`` (zeros where it is unused)."""
    params = [p for p in learner.parameters() if p.requires_grad]
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]


def assert_same_meta_gradient(ours: list[torch.Tensor], ref: list[torch.Tensor], rtol: float = 1e-6,
                              floor: float = 1e-6) -> None:
    """``ours`` equals ``ref`` to ``rtol`` relative per tensor; tensors whose true gradient is ~0
    (a conv bias before BatchNorm) are held to the same bound relative to ``floor`` times the
    whole meta-gradient."""
    whole = torch.cat([g.flatten() for g in ref]).norm()
    assert whole > 0
    for o, r in zip(ours, ref):
        assert (o - r).norm() <= rtol * max(r.norm(), whole * floor), \
            f"meta-gradient differs by {(o - r).norm() / r.norm():.2e}"
