"""Relation Networks: spatial Conv4 features, class sums, relation scores, MSE loss, gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightmeta.episodes import EpisodeSpec, TaskBatch
from lightmeta.errors import ConfigError
from lightmeta.models import build_model
from lightmeta.registry import ALGORITHMS
from lightmeta.task_info import TaskInfo

SPATIAL = {"name": "conv4", "filters": 8, "keep_spatial": True, "pooled_blocks": 2}


def make(model: dict, in_shape=(1, 28, 28), **algo):
    info = TaskInfo(problem="classification", in_shape=in_shape, train_ways=3, eval_ways=3)
    return ALGORITHMS.get("relationnet")(algo, model=model, task=info)


def test_conv4_keeps_feature_maps_and_pools_only_the_first_blocks() -> None:
    model = build_model(SPATIAL, (1, 28, 28), None)
    z = model(torch.randn(3, 1, 28, 28))
    assert z.shape == (3, 8, 7, 7) and model.feature_shape == (8, 7, 7) and model.feature_dim == 8 * 49
    flat = build_model({"name": "conv4", "filters": 8}, (1, 28, 28), None)
    assert flat(torch.randn(3, 1, 28, 28)).shape == (3, 8) and flat.feature_shape == (8,)
    strided = build_model({"name": "conv4", "filters": 8, "pool": "stride", "pooled_blocks": 1, "keep_spatial": True}, (1, 28, 28), None)
    assert strided(torch.randn(2, 1, 28, 28)).shape == (2, 8, 14, 14)
    with pytest.raises(ConfigError, match="keep_spatial=true"):
        build_model({**SPATIAL, "global_pool": True}, (1, 28, 28), None)


def episode(tasks: int = 2, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    spec = EpisodeSpec(ways=3, shots=2, queries=2)
    sy = torch.stack([torch.randperm(6, generator=g) % 3 for _ in range(tasks)])
    qy = torch.stack([torch.randperm(6, generator=g) % 3 for _ in range(tasks)])
    return TaskBatch(torch.randn(tasks, 6, 1, 28, 28, generator=g), sy, torch.randn(tasks, 6, 1, 28, 28, generator=g),
                     qy, spec, torch.arange(tasks))


def test_class_representation_is_the_sum_of_support_maps() -> None:
    learner = make(SPATIAL)
    z = torch.randn(2, 6, 8, 7, 7)
    y = torch.tensor([[0, 1, 2, 2, 1, 0], [1, 1, 0, 0, 2, 2]])
    state = learner.fit_head(z, y, EpisodeSpec(ways=3, shots=2, queries=1))
    assert state.shape == (2, 3, 8, 7, 7)
    for t in range(2):
        for k in range(3):
            torch.testing.assert_close(state[t, k], sum(z[t, i] for i in range(6) if y[t, i] == k))


def test_relation_scores_loss_and_gradients() -> None:
    torch.manual_seed(0)
    learner = make(SPATIAL)
    batch = episode()
    learner.train()
    scores = learner.episode_logits(batch.support_x, batch.support_y, batch.query_x, batch.spec)
    assert scores.shape == (2, 6, 3) and (scores >= 0).all() and (scores <= 1).all()
    loss, logs = learner.meta_loss(batch)
    onehot = F.one_hot(batch.query_y, 3).float()
    torch.testing.assert_close(loss, F.mse_loss(scores, onehot))
    loss.backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the pair (query i, class k) is scored from that query and that class only
    learner.eval()
    with torch.no_grad():
        z_support = learner.embed(batch.support_x)
        z_query = learner.embed(batch.query_x)
        state = learner.fit_head(z_support, batch.support_y, batch.spec)
        full = learner.head_logits(state, z_query)
        single = learner.relation(torch.cat([z_query[1, 4], state[1, 2]], dim=0).unsqueeze(0))
    torch.testing.assert_close(full[1, 4, 2], single[0])


def test_per_task_contract_reports_the_same_mse_as_the_batched_path() -> None:
    torch.manual_seed(1)
    learner = make(SPATIAL).eval()
    batch = episode(seed=3)
    batched = learner.evaluate_batch(batch)
    for t in range(2):
        single = learner.evaluate_task(batch.task(t))
        torch.testing.assert_close(single["loss"], batched["loss"][t])
        torch.testing.assert_close(single["acc"], batched["acc"][t])


def test_flat_features_get_an_mlp_relation_module() -> None:
    learner = make({"name": "mlp", "hidden": [16]}, in_shape=(10,))
    assert not any(isinstance(m, torch.nn.Conv2d) for m in learner.relation.modules())
    z = torch.randn(1, 6, 16)
    state = learner.fit_head(z, torch.tensor([[0, 1, 2, 0, 1, 2]]), EpisodeSpec(ways=3, shots=2, queries=1))
    scores = learner.head_logits(state, torch.randn(1, 4, 16))
    assert scores.shape == (1, 4, 3) and ((scores >= 0) & (scores <= 1)).all()
