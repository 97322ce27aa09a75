"""Conformance checks that every registered plug-in must pass.

lightmeta's own tests run them over the whole registry, so a new algorithm or datamodule is
tested the moment it is registered; third-party plug-in authors call the same functions from
their test suites (as torchmetrics offers ``MetricTester``)::

    from lightmeta.testing import check_algorithm, check_datamodule
    def test_my_algorithm(tmp_path): check_algorithm("my_algo", tmp_path)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from pydantic import ValidationError

from lightmeta.config import RunConfig, validate_config
from lightmeta.datamodule import EpisodicDataModule, EvalEpisodes, FlatBatch, FlatTrainBatches, TaskSampler, TrainEpisodes
from lightmeta.episodes import TaskBatch
from lightmeta.meta_learner import MetaLearner
from lightmeta.registry import ALGORITHMS, DATAMODULES
from lightmeta.runner import build_datamodule, build_learner, fit

#: The datamodule the harness pairs with an algorithm, per problem type.
EXAMPLE_DATA = {"regression": "sinusoid", "classification": "synthetic"}

#: Overrides that make a run take seconds on a CPU.
TINY_RUN = {
    "trainer": {"max_steps": 4, "enable_progress_bar": False, "num_sanity_val_steps": 0, "accelerator": "cpu"},
    "logger": {"name": "none"},
}
TINY_DATA = {"meta_batch_size": 2, "eval_batch_size": 4, "train_batches_per_epoch": 2, "val_tasks": 4, "test_tasks": 6}


def example_config(algorithm: str, workdir: Path, problem: str | None = None, **sections: Any) -> RunConfig:
    """A tiny valid run of ``algorithm`` on a datamodule of a problem type it supports."""
    cls = ALGORITHMS.get(algorithm)
    problem = problem or cls.problems[0]
    data_cls = DATAMODULES.get(EXAMPLE_DATA[problem])
    raw: dict[str, Any] = {
        "experiment": f"conformance-{algorithm}",
        "output_dir": str(workdir),
        "algorithm": {"name": algorithm},
        "model": dict(cls.example_model),
        "data": {"name": EXAMPLE_DATA[problem], **data_cls.example_config(workdir), **TINY_DATA},
        **TINY_RUN,
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate_config(raw)


def check_algorithm_config(name: str) -> None:
    """Defaults validate and an unknown hyperparameter is rejected."""
    cls = ALGORITHMS.get(name)
    cls.Config()
    try:
        cls.Config.model_validate({"surely_not_a_field": 1})
    except ValidationError:
        return
    raise AssertionError(f"{name}.Config accepts unknown keys; derive it from lightmeta.PluginConfig")


def _first_batch(dm: EpisodicDataModule) -> TaskBatch:
    dm.setup("fit")
    return TrainEpisodes(dm.sampler, dm.seed, dm.config.meta_batch_size, 0, 1)[0]


def _first_flat_batch(dm: EpisodicDataModule, learner: MetaLearner) -> FlatBatch:
    """The first pre-training batch of a learner with ``training_data = "flat"``."""
    dm.setup("fit")
    return FlatTrainBatches(dm.flat_train_dataset(), dm.seed, learner.flat_batch_size, 0, 1)[0]


def check_algorithm_step(name: str, workdir: Path) -> None:
    """One meta-step per supported problem: prediction shapes, a finite loss, and an outer
    gradient that reaches every trainable parameter."""
    cls = ALGORITHMS.get(name)
    for problem in cls.problems:
        cfg = example_config(name, workdir, problem)
        dm = build_datamodule(cfg)
        learner: MetaLearner = build_learner(cfg, dm)
        batch = _first_batch(dm)
        learner.train()
        train_batch = _first_flat_batch(dm, learner) if learner.training_data == "flat" else batch
        loss, logs = learner.meta_loss(train_batch)
        assert loss.ndim == 0 and math.isfinite(loss.item()), f"{name}: meta-loss {loss} on {problem}"
        assert "loss" in logs
        loss.backward()
        missing = [n for n, p in learner.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{name}: the outer gradient does not reach {missing}"
        bad = [n for n, p in learner.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"{name}: non-finite outer gradient in {bad}"
        assert any(p.grad.abs().sum() > 0 for p in learner.parameters() if p.grad is not None), f"{name}: zero meta-gradient"

        learner.zero_grad()
        learner.eval()
        task = batch.task(0)
        with torch.set_grad_enabled(learner.needs_grad_at_eval):  # as the trainer runs evaluation
            state = learner.adapt(task.support_x, task.support_y, task.spec)
        with torch.no_grad():
            preds = learner.predict(state, task.query_x)
        info = dm.task_info()
        width = task.spec.ways if problem == "classification" else info.out_dim
        assert preds.shape == (task.query_x.shape[0], width), f"{name}: predictions {tuple(preds.shape)} on {problem}"
        per_task = learner.evaluate_batch(batch)
        assert set(per_task) == set(learner.eval_metric_names())
        assert all(v.shape == (len(batch),) for v in per_task.values())


def check_algorithm_fit(name: str, workdir: Path) -> None:
    """A short fit + meta-test through the runner, then a checkpoint round trip."""
    cls = ALGORITHMS.get(name)
    for problem in cls.problems:
        cfg = example_config(name, workdir / problem, problem)
        run, results = fit(cfg)
        assert results is not None and results.n_tasks == cfg.data.test_tasks
        assert all(math.isfinite(r.mean) for r in results.rows)
        headline = "acc" if problem == "classification" else "loss"
        assert any(r.metric.startswith(headline) and r.n == cfg.data.test_tasks for r in results.rows)
        ckpt = run.trainer.checkpoint_callback.best_model_path
        reloaded = cls.load_from_checkpoint(ckpt, weights_only=True)
        learner = run.learner
        batch = _first_batch(run.datamodule)
        learner.eval()
        reloaded.eval()
        torch.manual_seed(0)
        ours = learner.evaluate_batch(batch)
        torch.manual_seed(0)
        theirs = reloaded.evaluate_batch(batch)
        for k in ours:
            assert torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6), f"{name}: '{k}' differs after reload"


def check_algorithm(name: str, workdir: Path) -> None:
    """Every algorithm check."""
    check_algorithm_config(name)
    check_algorithm_step(name, workdir / "step")
    check_algorithm_fit(name, workdir / "fit")


def check_datamodule(name: str, workdir: Path) -> None:
    """The episodic contract: shapes match ``task_info``, training tasks are a pure function of
    (seed, index), DDP ranks split each meta-batch disjointly and exactly, evaluation tasks are
    fixed (independent of the run seed) and sharded across ranks without loss or overlap; image
    datamodules build the same episodes on the device (``data.episode_transfer``) as in the loader."""
    cls = DATAMODULES.get(name)
    params = {**cls.example_config(workdir), **TINY_DATA, "meta_batch_size": 4}
    config = cls.Config.model_validate(params)
    dm = cls(config, seed=7)
    info = dm.task_info()
    batch = _first_batch(dm)
    assert tuple(batch.support_x.shape[2:]) == tuple(info.in_shape), f"{name}: inputs {tuple(batch.support_x.shape)} vs {info.in_shape}"
    assert batch.support_x.shape[1] == batch.spec.support_size and batch.query_x.shape[1] == batch.spec.query_size
    target = () if info.problem == "classification" else (info.out_dim,)
    assert batch.support_y.shape == (*batch.support_x.shape[:2], *target), f"{name}: support_y {tuple(batch.support_y.shape)}"
    assert batch.query_y.shape == (*batch.query_x.shape[:2], *target), f"{name}: query_y {tuple(batch.query_y.shape)}"
    assert torch.isfinite(batch.support_x).all() and torch.isfinite(batch.query_x).all()
    if info.problem == "classification":
        ways = batch.spec.ways
        for y, per_class in ((batch.support_y, batch.spec.shots), (batch.query_y, batch.spec.queries)):
            counts = torch.stack([torch.bincount(row, minlength=ways) for row in y])
            assert (counts == per_class).all(), f"{name}: labels must be 0..{ways - 1}, {per_class} each"

    # determinism: a second datamodule with the same seed draws identical tasks; another seed does not
    same = _first_batch(cls(config, seed=7))
    other = _first_batch(cls(config, seed=8))
    assert torch.equal(batch.support_x, same.support_x) and torch.equal(batch.query_y, same.query_y)
    assert not torch.equal(batch.support_x, other.support_x), f"{name}: the run seed does not change training tasks"

    # ranks: two ranks' shares are disjoint and together equal the single-process meta-batch
    m = config.meta_batch_size
    shares = [TrainEpisodes(dm.sampler, 7, m, r, 2)[3] for r in range(2)]
    whole = TrainEpisodes(dm.sampler, 7, m, 0, 1)[3]
    assert not set(shares[0].task_ids.tolist()) & set(shares[1].task_ids.tolist())
    assert torch.equal(torch.cat([s.support_x for s in shares]), whole.support_x)
    assert torch.equal(torch.cat([s.query_y for s in shares]), whole.query_y)

    # evaluation tasks: fixed across run seeds, sharded without loss or duplication
    for split in ("val", "test"):
        n = config.val_tasks if split == "val" else config.test_tasks
        a = EvalEpisodes(dm.sampler, split, n, config.eval_seed, config.eval_batch_size, 0, 1)
        b = EvalEpisodes(_sampler(cls, config, seed=12345), split, n, config.eval_seed, config.eval_batch_size, 0, 1)
        assert torch.equal(a[0].support_x, b[0].support_x), f"{name}: {split} tasks depend on the run seed"
        ids = [i for r in range(2) for batch_ids in EvalEpisodes(dm.sampler, split, n, config.eval_seed,
                                                                 config.eval_batch_size, r, 2).batches for i in batch_ids]
        assert sorted(ids) == list(range(n)), f"{name}: {split} shards lose or duplicate tasks"
    assert not torch.equal(EvalEpisodes(dm.sampler, "val", 4, config.eval_seed, 4, 0, 1)[0].support_x,
                           EvalEpisodes(dm.sampler, "test", 4, config.eval_seed, 4, 0, 1)[0].support_x)

    # image datamodules: episodes built on the training device (data.episode_transfer) are the
    # loader-built ones (the "device" here is the CPU, as Lightning moves and finishes a batch)
    if "episode_transfer" in cls.Config.model_fields:
        for transfer in ("uint8", "indices"):
            built = cls(cls.Config.model_validate({**params, "episode_transfer": transfer}), seed=7)
            built.setup("fit")
            plans = built.loader_sampler()
            pairs = [(TrainEpisodes(plans, 7, m, 0, 1)[0], batch)]
            pairs += [(EvalEpisodes(plans, s, 4, config.eval_seed, 4, 0, 1)[0], EvalEpisodes(dm.sampler, s, 4, config.eval_seed, 4, 0, 1)[0])
                      for s in ("val", "test")]
            for plan, want in pairs:
                got = built.on_after_batch_transfer(move_data_to_device(plan, torch.device("cpu")), 0)
                assert all(torch.equal(getattr(got, f), getattr(want, f)) for f in ("support_x", "support_y", "query_x", "query_y", "task_ids")), \
                    f"{name}: data.episode_transfer={transfer} builds other episodes than the DataLoader"


def _sampler(cls: type[EpisodicDataModule], config: Any, seed: int) -> TaskSampler:
    dm = cls(config, seed=seed)
    dm.setup("fit")
    return dm.sampler
