"""ProtoNet and the metric-learner base: hand-computed logits, learn2learn parity, the batched
path against the per-task contract, run-time ways, and a short end-to-end fit."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from pydantic import Field
from torch import Tensor, nn

from helpers import require_peer
from lightmeta.config import validate_config
from lightmeta.datamodule import DataConfig, EpisodicDataModule, SplitName, TaskSampler
from lightmeta.episodes import EpisodeSpec, TaskBatch
from lightmeta.errors import ConfigError
from lightmeta.meta_learner import MetaLearner
from lightmeta.metric import MetricMetaLearner
from lightmeta.registry import ALGORITHMS, DATAMODULES
from lightmeta.runner import fit, load_learner
from lightmeta.seeding import generator_for
from lightmeta.task_info import TaskInfo

IDENTITY = {"name": "mlp", "hidden": []}  # Flatten only: embeddings are the inputs themselves


def make_learner(model: dict, in_shape: tuple[int, ...], ways: int = 5, eval_ways: int | None = None, **algo) -> MetricMetaLearner:
    info = TaskInfo(problem="classification", in_shape=in_shape, train_ways=ways, eval_ways=eval_ways or ways)
    return ALGORITHMS.get("protonet")(algo, model=model, task=info)


def make_batch(tasks: int, spec: EpisodeSpec, in_shape: tuple[int, ...], seed: int = 0) -> TaskBatch:
    """Random inputs with the labels of every task in a different random order."""
    g = torch.Generator().manual_seed(seed)

    def labels(per_class: int) -> Tensor:
        y = torch.arange(spec.ways).repeat_interleave(per_class)
        return torch.stack([y[torch.randperm(len(y), generator=g)] for _ in range(tasks)])

    sy, qy = labels(spec.shots), labels(spec.queries)
    sx = torch.randn(tasks, spec.support_size, *in_shape, generator=g) + sy.view(tasks, -1, *[1] * len(in_shape))
    qx = torch.randn(tasks, spec.query_size, *in_shape, generator=g) + qy.view(tasks, -1, *[1] * len(in_shape))
    return TaskBatch(sx, sy, qx, qy, spec, torch.arange(tasks))


# ---------------------------------------------------------------------- hand-computed reference
def reference_logits(support: np.ndarray, labels: list[int], query: np.ndarray, ways: int,
                     distance: str, scale: float = 1.0) -> np.ndarray:
    """ProtoNet logits with explicit loops: class means, then -squared distance or scaled cosine."""
    protos = []
    for k in range(ways):
        rows = [support[i] for i in range(len(labels)) if labels[i] == k]
        protos.append([sum(r[d] for r in rows) / len(rows) for d in range(support.shape[1])])
    out = np.zeros((len(query), ways))
    for i, q in enumerate(query):
        for k, c in enumerate(protos):
            if distance == "euclidean":
                out[i, k] = -sum((q[d] - c[d]) ** 2 for d in range(len(c)))
            else:
                dot = sum(q[d] * c[d] for d in range(len(c)))
                norms = math.sqrt(sum(v * v for v in q)) * math.sqrt(sum(v * v for v in c))
                out[i, k] = scale * dot / norms
    return out


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_logits_equal_a_hand_computed_reference(distance: str) -> None:
    support = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [3.0, 0.0, 0.0],
                        [-1.0, 2.0, 1.0], [0.5, 0.5, 0.5], [2.0, -2.0, 1.0]])
    labels = [2, 0, 1, 0, 2, 1]  # 3-way 2-shot, classes out of order
    query = np.array([[0.2, -0.3, 0.1], [1.0, 1.0, 1.0], [-2.0, 0.5, 3.0], [4.0, -1.0, 0.0]])
    learner = make_learner(IDENTITY, (3,), ways=3, distance=distance, cosine_scale=2.5)
    spec = EpisodeSpec(ways=3, shots=2, queries=1)
    state = learner.adapt(torch.tensor(support, dtype=torch.float64), torch.tensor(labels), spec)
    logits = learner.predict(state, torch.tensor(query, dtype=torch.float64))
    expected = reference_logits(support, labels, query, 3, distance, scale=2.5)
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- learn2learn parity
@pytest.mark.peer
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_matches_learn2learn_prototypical_classifier(distance: str) -> None:
    l2l = require_peer("learn2learn")
    spec = EpisodeSpec(ways=5, shots=3, queries=4)
    batch = make_batch(3, spec, (1, 28, 28), seed=1)
    # cosine with a fixed scale of 1 is learn2learn's PrototypicalClassifier(distance="cosine")
    learner = make_learner({"name": "conv4", "filters": 8}, (1, 28, 28), distance=distance,
                           cosine_scale=1.0, learn_scale=False).double().eval()
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    with torch.no_grad():
        ours = learner.episode_logits(batch.support_x, batch.support_y, batch.query_x, spec)
        for t, task in enumerate(batch.tasks()):
            single = learner.predict(learner.adapt(task.support_x, task.support_y, spec), task.query_x)
            peer = l2l.nn.PrototypicalClassifier(learner.model(task.support_x), task.support_y, distance=distance)
            expected = peer(learner.model(task.query_x))
            torch.testing.assert_close(ours[t], expected, rtol=1e-5, atol=0)
            torch.testing.assert_close(single, expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------- batched path == contract
def _grads(loss: Tensor, learner: nn.Module) -> list[Tensor]:
    return list(torch.autograd.grad(loss, [p for p in learner.parameters() if p.requires_grad]))


@pytest.mark.parametrize(
    ("model", "mode", "distance"),
    [
        ({"name": "conv4", "filters": 8}, "eval", "euclidean"),  # BatchNorm on running statistics
        ({"name": "conv4", "filters": 8}, "eval", "cosine"),
        ({"name": "mlp", "hidden": [32, 16]}, "train", "euclidean"),  # no BatchNorm: any mode
        ({"name": "mlp", "hidden": [32, 16]}, "train", "cosine"),
    ],
)
def test_batched_meta_loss_and_evaluation_equal_the_per_task_path(model: dict, mode: str, distance: str) -> None:
    in_shape = (1, 28, 28)
    learner = make_learner(model, in_shape, distance=distance).double()
    spec = EpisodeSpec(ways=5, shots=2, queries=3)
    warm = make_batch(4, spec, in_shape, seed=2)
    learner.train()
    learner.meta_loss(TaskBatch(warm.support_x.double(), warm.support_y, warm.query_x.double(), warm.query_y,
                                spec, warm.task_ids))  # moves BatchNorm running statistics off their init
    getattr(learner, mode)()
    batch = make_batch(4, spec, in_shape, seed=3)
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()

    loss, logs = learner.meta_loss(batch)
    ref_loss, ref_logs = MetaLearner.meta_loss(learner, batch)  # adapt/predict task by task
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(logs["acc"], ref_logs["acc"])
    for g, ref in zip(_grads(loss, learner), _grads(ref_loss, learner)):
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)

    per_task = learner.evaluate_batch(batch)
    ref_per_task = MetaLearner.evaluate_batch(learner, batch)  # evaluate_task on each task
    assert set(per_task) == set(ref_per_task) == set(learner.eval_metric_names()) == {"loss", "acc"}
    for k in per_task:
        assert per_task[k].shape == (len(batch),)
        torch.testing.assert_close(per_task[k], ref_per_task[k], rtol=1e-10, atol=0)


def test_training_batch_norm_normalises_over_the_whole_meta_batch() -> None:
    """The documented choice: one backbone call, so BatchNorm's batch statistics (and hence its
    running-mean update) cover the support and query images of every task."""
    learner = make_learner({"name": "conv4", "filters": 8}, (1, 28, 28)).train()
    spec = EpisodeSpec(ways=5, shots=1, queries=2)
    batch = make_batch(3, spec, (1, 28, 28), seed=4)
    conv, bn = learner.model.features[0], learner.model.features[1]
    every_image = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
    with torch.no_grad():
        expected = bn.momentum * conv(every_image).mean(dim=(0, 2, 3))
        first_task = bn.momentum * conv(torch.cat([batch.support_x[0], batch.query_x[0]])).mean(dim=(0, 2, 3))
    learner.meta_loss(batch)
    torch.testing.assert_close(bn.running_mean, expected)
    assert not torch.allclose(bn.running_mean, first_task)


# ---------------------------------------------------------------------- ways, parameters, errors
def test_ways_come_from_the_episode_not_the_constructor() -> None:
    learner = make_learner({"name": "conv4", "filters": 8}, (1, 28, 28), ways=60, eval_ways=5)
    for ways, shots in ((60, 1), (5, 5), (20, 1)):
        spec = EpisodeSpec(ways=ways, shots=shots, queries=2)
        batch = make_batch(2, spec, (1, 28, 28), seed=ways)
        logits = learner.episode_logits(batch.support_x, batch.support_y, batch.query_x, spec)
        assert logits.shape == (2, ways * 2, ways)
        assert torch.isfinite(learner.meta_loss(batch)[0])


@pytest.mark.parametrize(("learn_scale", "params_expected"), [(True, True), (False, False)])
def test_gradient_reaches_every_parameter_and_cosine_scale(learn_scale: bool, params_expected: bool) -> None:
    learner = make_learner({"name": "conv4", "filters": 8}, (1, 28, 28), distance="cosine", learn_scale=learn_scale)
    assert ("scale" in dict(learner.named_parameters())) is params_expected
    assert "scale" in learner.state_dict()  # saved with checkpoints either way
    batch = make_batch(2, EpisodeSpec(ways=5, shots=2, queries=2), (1, 28, 28))
    loss, _ = learner.meta_loss(batch)
    named = [(n, p) for n, p in learner.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    missing = [n for (n, _), g in zip(named, grads) if not torch.any(g != 0)]
    assert not missing, f"no gradient reached {missing}"


def test_euclidean_protonet_has_only_backbone_parameters() -> None:
    learner = make_learner({"name": "conv4", "filters": 8}, (1, 28, 28))
    assert {n for n, _ in learner.named_parameters()} == {f"model.{n}" for n, _ in learner.model.named_parameters()}
    assert learner.model.head is None  # a feature extractor: no linear head


def test_regression_data_is_rejected() -> None:
    info = TaskInfo(problem="regression", in_shape=(1,), train_ways=1, eval_ways=1)
    with pytest.raises(ConfigError, match="protonet.*classifier"):
        ALGORITHMS.get("protonet")({}, model={"name": "mlp"}, task=info)


def test_unknown_distance_is_rejected() -> None:
    with pytest.raises(ConfigError, match="distance"):
        validate_config({"algorithm": {"name": "protonet", "distance": "manhattan"},
                         "model": {"name": "conv4"}, "data": {"name": "sinusoid"}})


# ---------------------------------------------------------------------- end to end
class BlobsConfig(DataConfig):
    ways: int = Field(default=10, ge=2)
    shots: int = Field(default=1, ge=1)
    queries: int = Field(default=3, ge=1)
    eval_ways: int = Field(default=5, ge=2)
    eval_shots: int = Field(default=2, ge=1)
    eval_queries: int = Field(default=4, ge=1)


class BlobTasks(TaskSampler):
    """Class ``c`` is a Gaussian bump with its own centre and width on a 16x16 image; its images
    jitter the centre and add pixel noise. Disjoint classes per split; task ``i`` is a pure
    function of ``(seed, split, i)``."""

    SIZE = 16
    CLASSES = {"train": 40, "val": 15, "test": 15}

    def __init__(self, config: BlobsConfig) -> None:
        self.config = config
        g = generator_for(1234, "classes", 0)
        n = sum(self.CLASSES.values())
        self.centres = 3 + (self.SIZE - 6) * torch.rand(n, 2, generator=g)
        self.widths = 1.0 + 2.0 * torch.rand(n, generator=g)
        self.first = {"train": 0, "val": self.CLASSES["train"], "test": self.CLASSES["train"] + self.CLASSES["val"]}

    def _images(self, cls: int, n: int, g: torch.Generator) -> Tensor:
        grid = torch.arange(self.SIZE, dtype=torch.float32)
        centre = self.centres[cls] + 0.8 * torch.randn(n, 2, generator=g)
        dy = (grid.view(1, -1, 1) - centre[:, 0].view(-1, 1, 1)) ** 2
        dx = (grid.view(1, 1, -1) - centre[:, 1].view(-1, 1, 1)) ** 2
        img = torch.exp(-(dx + dy) / (2 * self.widths[cls] ** 2))
        return (img + 0.3 * torch.randn(n, self.SIZE, self.SIZE, generator=g)).unsqueeze(1)

    def sample(self, split: SplitName, task_ids: list[int], seed: int) -> TaskBatch:
        c = self.config
        ways, shots, queries = (c.ways, c.shots, c.queries) if split == "train" else (c.eval_ways, c.eval_shots, c.eval_queries)
        spec = EpisodeSpec(ways, shots, queries)
        parts: list[list[Tensor]] = [[], [], [], []]
        for i in task_ids:
            g = generator_for(seed, split, i)
            classes = self.first[split] + torch.randperm(self.CLASSES[split], generator=g)[:ways]
            images = torch.stack([self._images(int(k), shots + queries, g) for k in classes])  # [N, K+Q, 1, H, W]
            labels = torch.arange(ways).unsqueeze(1).expand(ways, shots + queries)
            parts[0].append(images[:, :shots].flatten(0, 1))
            parts[1].append(labels[:, :shots].flatten())
            parts[2].append(images[:, shots:].flatten(0, 1))
            parts[3].append(labels[:, shots:].flatten())
        sx, sy, qx, qy = (torch.stack(p) for p in parts)
        return TaskBatch(sx, sy, qx, qy, spec, torch.tensor(task_ids))


class BlobsDataModule(EpisodicDataModule):
    Config = BlobsConfig
    config: BlobsConfig

    def task_info(self) -> TaskInfo:
        return TaskInfo(problem="classification", in_shape=(1, BlobTasks.SIZE, BlobTasks.SIZE),
                        train_ways=self.config.ways, eval_ways=self.config.eval_ways)

    def build_sampler(self) -> BlobTasks:
        return BlobTasks(self.config)


@pytest.fixture
def blobs() -> Iterator[str]:
    name = "test_protonet_blobs"
    DATAMODULES.register(name)(BlobsDataModule)
    try:
        yield name
    finally:
        DATAMODULES.unregister(name)


def test_short_fit_end_to_end_with_different_train_and_test_ways(blobs: str, tmp_path: Path) -> None:
    cfg = validate_config({
        "seed": 0,
        "output_dir": str(tmp_path),
        "algorithm": {"name": "protonet", "lr": 3e-3},
        "model": {"name": "conv4", "filters": 16},
        "data": {"name": blobs, "ways": 10, "shots": 1, "queries": 3, "eval_ways": 5, "eval_shots": 2,
                 "eval_queries": 4, "meta_batch_size": 2, "train_batches_per_epoch": 20,
                 "val_tasks": 10, "test_tasks": 40, "eval_batch_size": 20},
        "trainer": {"max_steps": 40, "accelerator": "cpu", "enable_progress_bar": False,
                    "num_sanity_val_steps": 0, "log_every_n_steps": 5},
        "logger": {"name": "none"},
    })
    run, results = fit(cfg)
    assert results is not None and results.n_tasks == 40
    test = run.learner.last_results["test"]
    assert test["acc"]["n"] == 40 and test["loss"]["n"] == 40
    assert math.isfinite(test["loss"]["mean"]) and test["acc"]["ci95"] > 0
    # 5-way chance is 0.2; the untrained Conv4's features reach about 0.46 on these tasks, 40 steps about 0.9
    assert test["acc"]["mean"] > 0.75
    # the best checkpoint reloads and reproduces the meta-test figure exactly
    best = run.trainer.checkpoint_callback.best_model_path
    reloaded = load_learner(best).eval()
    batch = run.datamodule.eval_episodes("test")[0]
    torch.testing.assert_close(reloaded.evaluate_batch(batch)["acc"], run.learner.eval().evaluate_batch(batch)["acc"])
