"""Inner-step checkpointing (``checkpoint_inner_steps``): the same meta-gradient as the plain path
for every registered gradient-based algorithm, and autograd-graph memory that grows with the
inner steps by little more than a copy of the fast weights per step."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import Tensor, nn

from helpers import assert_same_meta_gradient, graph_bytes, meta_gradients
from lightmeta import (
    ALGORITHMS,
    Backbone,
    EpisodeSpec,
    GradientMetaLearner,
    PluginConfig,
    TaskBatch,
    register_model,
)
from lightmeta.config import validate_config
from lightmeta.errors import ConfigError
from lightmeta.registry import MODELS
from lightmeta.runner import fit
from lightmeta.testing import example_config

GRADIENT = [n for n in ALGORITHMS.names() if issubclass(ALGORITHMS.get(n), GradientMetaLearner)]
CHECKPOINTABLE = [n for n in GRADIENT if ALGORITHMS.get(n).differentiates_inner_loop]
TASK = {"problem": "classification", "in_shape": [1, 16, 16], "train_ways": 3, "eval_ways": 3}
MODELS_BY_NORM = {
    "none": {"name": "mlp", "hidden": [16, 16]},
    "transductive": {"name": "conv4", "filters": 4},
    "inductive": {"name": "conv4", "filters": 4},
}


class DropoutMLPConfig(PluginConfig):
    p: float = 0.3


class DropoutMLP(Backbone):
    """An MLP with dropout: the recomputed inner steps must draw the same dropout masks."""

    Config = DropoutMLPConfig

    def __init__(self, config: DropoutMLPConfig, in_shape: tuple[int, ...], out_features: int | None):
        super().__init__(config, in_shape, out_features)
        width = 1
        for d in in_shape:
            width *= d
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(width, 16), nn.ReLU(), nn.Dropout(config.p))
        self.head = nn.Linear(16, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module", autouse=True)
def dropout_model() -> Iterator[None]:
    register_model("test_ckpt_dropout_mlp")(DropoutMLP)
    yield
    MODELS.unregister("test_ckpt_dropout_mlp")


def _batch(tasks: int = 2, dtype: torch.dtype = torch.float64) -> TaskBatch:
    g = torch.Generator().manual_seed(5)
    return TaskBatch(torch.randn(tasks, 6, 1, 16, 16, generator=g, dtype=dtype), torch.arange(3).repeat(2).expand(tasks, -1),
                     torch.randn(tasks, 9, 1, 16, 16, generator=g, dtype=dtype), torch.arange(3).repeat(3).expand(tasks, -1),
                     EpisodeSpec(3, 2, 3), torch.arange(tasks))


def _learner(name: str, model: dict, **params: object) -> GradientMetaLearner:
    torch.manual_seed(0)
    learner = ALGORITHMS.get(name)({"inner_lr": 0.3, "inner_steps": 3, **params}, model=model, task=TASK).double()
    learner.train()
    return learner


def _assert_same_meta_gradient(plain: GradientMetaLearner, ckpt: GradientMetaLearner, batch: TaskBatch) -> None:
    """Same loss, logs, meta-gradient (1e-6 relative per tensor) and BatchNorm running statistics."""
    loss_p, logs_p = plain.meta_loss(batch)
    loss_c, logs_c = ckpt.meta_loss(batch)
    assert torch.allclose(loss_c, loss_p, rtol=1e-12, atol=0)
    assert all(torch.allclose(logs_c[k], logs_p[k], rtol=1e-12, atol=0) for k in logs_p)
    assert_same_meta_gradient(meta_gradients(ckpt, loss_c), meta_gradients(plain, loss_p))
    # the backward pass recomputed the steps without updating running statistics a second time
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.equal(a, b), f"buffer {name} differs after the checkpointed backward"


@pytest.mark.parametrize("name", CHECKPOINTABLE)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("norm", list(MODELS_BY_NORM))
@pytest.mark.parametrize("batched", ["off", "on"])
def test_checkpointed_meta_gradient_equals_plain(name: str, first_order: bool, norm: str, batched: str) -> None:
    plain = _learner(name, MODELS_BY_NORM[norm], first_order=first_order, batch_norm=norm if norm != "none" else "transductive",
                     batched_tasks=batched)
    if batched == "on" and plain.config.batch_norm == "inductive":
        pytest.skip("inductive BatchNorm keeps the per-task loop (covered by batched=off)")
    ckpt = copy.deepcopy(plain)
    ckpt.config.checkpoint_inner_steps = True
    _assert_same_meta_gradient(plain, ckpt, _batch())


def test_running_statistics_are_updated_once() -> None:
    """Inductive BatchNorm (MAML++ per-step statistics): the checkpointed path leaves the same
    running statistics as the plain one, and they did move (the comparison is not vacuous)."""
    plain = _learner("mamlpp", MODELS_BY_NORM["inductive"])
    before = {k: v.clone() for k, v in plain.named_buffers()}
    ckpt = copy.deepcopy(plain)
    ckpt.config.checkpoint_inner_steps = True
    _assert_same_meta_gradient(plain, ckpt, _batch())
    assert any(not torch.equal(before[k], v) for k, v in plain.named_buffers() if "running_mean" in k)


def test_dropout_masks_are_replayed_in_the_recomputation() -> None:
    plain = _learner("maml", {"name": "test_ckpt_dropout_mlp"}, batched_tasks="off")
    ckpt = copy.deepcopy(plain)
    ckpt.config.checkpoint_inner_steps = True
    batch = _batch()
    torch.manual_seed(11)
    loss_p, _ = plain.meta_loss(batch)
    gp = meta_gradients(plain, loss_p)
    torch.manual_seed(11)
    loss_c, _ = ckpt.meta_loss(batch)
    gc = meta_gradients(ckpt, loss_c)  # recomputes each step; a fresh dropout mask would change the gradient
    assert torch.equal(loss_c, loss_p)
    for c, p in zip(gc, gp):
        assert (c - p).norm() <= 1e-6 * p.norm().clamp(min=1e-12)
    torch.manual_seed(12)
    other = meta_gradients(plain, plain.meta_loss(batch)[0])  # different masks do change it
    assert any(not torch.allclose(o, p) for o, p in zip(other, gp))


@pytest.mark.parametrize("batched", ["off", "on"])
def test_memory_grows_far_slower_than_linearly_with_inner_steps(batched: str) -> None:
    """Second-order MAML, 1 vs 8 inner steps: the graph's growth with checkpointing (per-task loop
    or batched) is a small fraction of the plain loop's, and is bounded by what it keeps: the fast
    weights of each step. (The plain batched path cannot be measured this way: torch.func.grad
    refuses saved-tensor hooks; it keeps the same per-task graphs as the loop.)"""
    batch = _batch(tasks=2, dtype=torch.float32)

    def growth(**params: object) -> int:
        sizes = []
        for steps in (1, 8):
            torch.manual_seed(0)
            learner = ALGORITHMS.get("maml")({"inner_steps": steps, **params}, model={"name": "conv4", "filters": 8}, task=TASK)
            learner.train()
            sizes.append(graph_bytes(learner, batch))
        return sizes[1] - sizes[0]

    plain = growth(batched_tasks="off")
    ckpt = growth(batched_tasks=batched, checkpoint_inner_steps=True)
    learner = ALGORITHMS.get("maml")({}, model={"name": "conv4", "filters": 8}, task=TASK)
    fast_weights = sum(p.numel() * p.element_size() for p in learner.parameters())
    assert plain > 0
    assert ckpt <= 0.1 * plain, f"checkpointed growth {ckpt} vs plain {plain} bytes"
    assert ckpt <= 7 * len(batch) * fast_weights * 1.5, f"checkpointing keeps {ckpt} bytes for 7 more steps"


@pytest.mark.parametrize("name", [n for n in GRADIENT if n not in CHECKPOINTABLE])
def test_learners_without_an_inner_graph_refuse_checkpointing(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"algorithm.checkpoint_inner_steps is not supported by '{name}'"):
        ALGORITHMS.get(name)({"checkpoint_inner_steps": True}, model={"name": "mlp", "hidden": [8]}, task=TASK)


def test_checkpointing_and_compile_are_refused_together() -> None:
    with pytest.raises(ConfigError, match="checkpoint_inner_steps cannot be combined with algorithm.compile"):
        ALGORITHMS.get("maml")({"checkpoint_inner_steps": True, "compile": True, "compile_backend": "eager"},
                               model={"name": "mlp", "hidden": [8]}, task=TASK)


def test_fit_with_checkpointing_matches_plain_training(tmp_path: Path) -> None:
    """Through Lightning (loss.backward, optimizer steps): the trained weights equal the plain run's."""
    weights = []
    for ckpt in (False, True):
        raw = example_config("maml", tmp_path / str(ckpt)).to_dict()
        raw["algorithm"].update(checkpoint_inner_steps=ckpt, inner_steps=3)
        run, _ = fit(validate_config(raw), test=False)
        weights.append(run.learner.state_dict())
    for k, v in weights[0].items():
        assert torch.allclose(weights[1][k], v, rtol=1e-5, atol=1e-7), k


def test_recomputation_replays_bf16_autocast() -> None:
    """Under bf16 autocast (trainer.precision=bf16-mixed) the recomputed steps run in bf16 as the
    forward did: the meta-gradient equals the plain bf16 one to bf16 rounding (summation order
    differs), where a float32 recomputation would be off by several percent on this conv net."""
    plain = ALGORITHMS.get("maml")({"inner_lr": 0.3, "inner_steps": 2, "batched_tasks": "off"},
                                   model=MODELS_BY_NORM["transductive"], task=TASK)
    plain.train()
    ckpt = copy.deepcopy(plain)
    ckpt.config.checkpoint_inner_steps = True
    batch = _batch(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_p, loss_c = plain.meta_loss(batch)[0], ckpt.meta_loss(batch)[0]
    assert torch.equal(loss_c, loss_p)
    gp, gc = (torch.cat([g.flatten() for g in meta_gradients(m, loss)]) for m, loss in ((plain, loss_p), (ckpt, loss_c)))
    assert (gc - gp).norm() <= 1e-2 * gp.norm(), f"relative difference {(gc - gp).norm() / gp.norm():.2e}"
