"""Baseline / Baseline++: flat pre-training batches, and the per-task head fine-tuning against
torch.optim.SGD on an independent nn.Linear."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightmeta.config import validate_config
from lightmeta.datamodule import FlatBatch, FlatTrainBatches
from lightmeta.episodes import EpisodeSpec, TaskBatch
from lightmeta.errors import ConfigError
from lightmeta.registry import ALGORITHMS, DATAMODULES
from lightmeta.runner import build_datamodule, build_learner, fit
from lightmeta.task_info import TaskInfo
from lightmeta.testing import example_config

IDENTITY = {"name": "mlp", "hidden": []}


def make(features: int, **algo):
    info = TaskInfo(problem="classification", in_shape=(features,), train_ways=3, eval_ways=3, train_classes=7)
    return ALGORITHMS.get("baseline")(algo, model=IDENTITY, task=info)


def support_task(seed: int, tasks: int = 2, features: int = 6):
    g = torch.Generator().manual_seed(seed)
    y = torch.stack([torch.randperm(6, generator=g) % 3 for _ in range(tasks)])
    z = torch.randn(tasks, 6, features, generator=g) + 2 * F.one_hot(y, features).float()
    return z, y


def test_linear_head_fine_tuning_equals_torch_sgd() -> None:
    learner = make(6, finetune_steps=25, finetune_lr=0.1)
    z, y = support_task(0)
    weight, bias = learner.fit_head(z, y, EpisodeSpec(ways=3, shots=2, queries=1))
    for t in range(2):
        head = torch.nn.Linear(6, 3)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=0.001)
        for _ in range(25):
            opt.zero_grad()
            F.cross_entropy(head(z[t]), y[t]).backward()
            opt.step()
        torch.testing.assert_close(weight[t], head.weight.detach().T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias[t], head.bias.detach(), rtol=1e-5, atol=1e-6)
    # the fitted head separates the support set it was trained on
    logits = learner.head_logits((weight, bias), z)
    assert (logits.argmax(-1) == y).float().mean() == 1.0


def test_cosine_head_starts_from_class_means_and_equals_torch_sgd() -> None:
    z, y = support_task(1)
    spec = EpisodeSpec(ways=3, shots=2, queries=1)
    learner = make(6, head="cosine", finetune_steps=10, finetune_lr=0.5, cosine_scale=4.0)
    weight, _ = learner.fit_head(z, y, spec)
    for t in range(2):
        w = torch.stack([z[t][y[t] == k].mean(0) for k in range(3)], dim=1).requires_grad_(True)
        opt = torch.optim.SGD([w], lr=0.5, momentum=0.9, weight_decay=0.001)
        for _ in range(10):
            opt.zero_grad()
            logits = 4.0 * F.normalize(z[t], dim=-1) @ F.normalize(w, dim=0)
            F.cross_entropy(logits, y[t]).backward()
            opt.step()
        torch.testing.assert_close(weight[t], w.detach(), rtol=1e-5, atol=1e-6)
    assert "classifier.bias" not in dict(learner.named_parameters())


def test_tasks_of_an_evaluation_batch_are_fitted_independently() -> None:
    learner = make(6, finetune_steps=15)
    z, y = support_task(2, tasks=3)
    spec = EpisodeSpec(ways=3, shots=2, queries=1)
    together = learner.fit_head(z, y, spec)
    alone = learner.fit_head(z[1:2], y[1:2], spec)
    torch.testing.assert_close(together[0][1], alone[0][0], rtol=1e-5, atol=1e-6)


def test_flat_batches_are_seeded_and_split_across_ranks(tmp_path: Path) -> None:
    cfg = example_config("baseline", tmp_path)
    dm = build_datamodule(cfg)
    learner = build_learner(cfg, dm)
    dataset = dm.flat_train_dataset()
    assert learner.task_info.train_classes == dataset.num_classes == learner.classifier.out_features
    whole = FlatTrainBatches(dataset, 0, 8, 0, 1)[5]
    again = FlatTrainBatches(dataset, 0, 8, 0, 1)[5]
    assert isinstance(whole, FlatBatch) and whole.x.shape[0] == 8 and torch.equal(whole.x, again.x)
    halves = [FlatTrainBatches(dataset, 0, 8, r, 2)[5] for r in range(2)]
    assert torch.equal(torch.cat([h.x for h in halves]), whole.x) and torch.equal(torch.cat([h.y for h in halves]), whole.y)
    assert not torch.equal(FlatTrainBatches(dataset, 0, 8, 0, 1)[6].y, whole.y)


def test_fit_pretrains_on_flat_batches_over_all_training_classes(tmp_path: Path) -> None:
    seen: list[object] = []
    cls = ALGORITHMS.get("baseline")
    original = cls.meta_loss

    def spy(self, batch):
        seen.append(batch)
        return original(self, batch)

    cls.meta_loss = spy
    try:
        raw = example_config("baseline", tmp_path).model_dump()
        raw["algorithm"]["batch_size"] = 12
        cfg = validate_config(raw)
        run, results = fit(cfg)
    finally:
        cls.meta_loss = original
    assert seen and all(isinstance(b, FlatBatch) and len(b) == 12 for b in seen)
    assert max(int(b.y.max()) for b in seen) >= 3  # global labels, beyond any episode's ways (5)
    assert results is not None and results.n_tasks == cfg.data.test_tasks


def test_episodes_and_data_without_a_flat_view_are_refused() -> None:
    learner = make(6)
    z, y = support_task(0)
    with pytest.raises(ConfigError, match="flat labelled batches"):
        learner.meta_loss(TaskBatch(z, y, z, y, EpisodeSpec(3, 2, 2), torch.arange(2)))
    with pytest.raises(ConfigError, match="no flat labelled view"):
        DATAMODULES.get("sinusoid")({}).flat_train_dataset()
    info = TaskInfo(problem="classification", in_shape=(6,), train_ways=3, eval_ways=3)
    with pytest.raises(ConfigError, match="train_classes"):
        ALGORITHMS.get("baseline")({}, model=IDENTITY, task=info)
