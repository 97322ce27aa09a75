"""The learn2learn bridge against real learn2learn TaskDatasets built on an in-memory dataset."""
from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from typing import Any

import lightning as L
import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import TensorDataset

from helpers import require_peer
from lightmeta import ALGORITHMS, DATAMODULES
from lightmeta.config import load_config
from lightmeta.datamodule import TrainEpisodes
from lightmeta.datamodules.learn2learn_bridge import Learn2LearnDataModule
from lightmeta.errors import ConfigError, DataError
from lightmeta.runner import build_datamodule

CLASSES, PER_CLASS, SIDE = 12, 6, 16
SPLIT_CLASSES = {"train": range(0, 6), "val": range(6, 9), "test": range(9, 12)}
EPISODE = {"ways": 3, "shots": 2, "queries": 1, "eval_shots": 1, "eval_queries": 2}


def dataset(classes: range) -> TensorDataset:
    """Image ``k`` of class ``c`` is the constant ``c * PER_CLASS + k``: pixels name class and image."""
    y = torch.tensor([c for c in classes for _ in range(PER_CLASS)])
    ids = torch.tensor([c * PER_CLASS + k for c in classes for k in range(PER_CLASS)], dtype=torch.float32)
    return TensorDataset(ids.view(-1, 1, 1, 1).expand(-1, 1, SIDE, SIDE).clone(), y)


def tasksets(l2l: Any, ways: int = 3, samples: tuple[int, int] = (3, 3)) -> Any:
    t = l2l.data.transforms
    out = []
    for split, classes in SPLIT_CLASSES.items():
        meta = l2l.data.MetaDataset(dataset(classes))
        k = samples[0] if split == "train" else samples[1]
        out.append(l2l.data.Taskset(meta, [t.NWays(meta, ways), t.KShots(meta, k), t.LoadData(meta),
                                               t.RemapLabels(meta), t.ConsecutiveLabels(meta)], num_tasks=-1))
    return l2l.vision.benchmarks.BenchmarkTasksets(*out)


def classes_of(x: torch.Tensor) -> torch.Tensor:
    return x[..., 0, 0, 0].long() // PER_CLASS


def check_episode_labels(batch: Any, split: str) -> None:
    """Every label is one class of the split, in support and query alike; labels are distinct classes."""
    for t in range(len(batch)):
        s_cls, q_cls = classes_of(batch.support_x[t]), classes_of(batch.query_x[t])
        per_label = {}
        for label in range(batch.spec.ways):
            found = set(s_cls[batch.support_y[t] == label].tolist()) | set(q_cls[batch.query_y[t] == label].tolist())
            assert len(found) == 1, f"label {label} mixes classes {found}"
            per_label[label] = found.pop()
        assert len(set(per_label.values())) == batch.spec.ways
        assert set(per_label.values()) <= set(SPLIT_CLASSES[split])
        ids = torch.cat([batch.support_x[t], batch.query_x[t]])[:, 0, 0, 0]
        assert len(set(ids.tolist())) == len(ids)  # no image twice in a task


def test_from_tasksets_episodes_are_correct_and_deterministic() -> None:
    l2l = require_peer("learn2learn")
    sets = tasksets(l2l)
    dm = Learn2LearnDataModule.from_tasksets(sets, seed=3, **EPISODE)
    info = dm.task_info()
    assert info.in_shape == (1, SIDE, SIDE) and info.train_ways == 3
    state = random.getstate()
    batch = TrainEpisodes(dm.sampler, 3, 4, 0, 1)[0]
    assert random.getstate() == state  # the global generators are restored
    assert batch.support_x.shape == (4, 6, 1, SIDE, SIDE) and batch.query_x.shape == (4, 3, 1, SIDE, SIDE)
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2] and batch.query_y[0].tolist() == [0, 1, 2]
    check_episode_labels(batch, "train")
    for split in ("val", "test"):
        ev = dm.sampler.sample(split, [0, 1, 2], seed=0)
        assert ev.spec.shots == 1 and ev.spec.queries == 2
        check_episode_labels(ev, split)

    same = Learn2LearnDataModule.from_tasksets(tasksets(l2l), seed=3, **EPISODE)
    again = TrainEpisodes(same.sampler, 3, 4, 0, 1)[0]
    assert torch.equal(batch.support_x, again.support_x) and torch.equal(batch.query_x, again.query_x)
    share = TrainEpisodes(dm.sampler, 3, 4, 1, 2)[0]  # rank 1 of 2 draws tasks 2 and 3 identically
    assert torch.equal(share.support_x, batch.support_x[2:])
    other = TrainEpisodes(dm.sampler, 4, 4, 0, 1)[0]
    assert not torch.equal(batch.support_x, other.support_x)
    # labels are permuted per episode: label 0 is not always the smallest class
    first = [int(classes_of(dm.sampler.sample("train", [i], 0).support_x[0, 0])) for i in range(20)]
    smallest = [min(classes_of(dm.sampler.sample("train", [i], 0).support_x[0]).tolist()) for i in range(20)]
    assert first != smallest


def test_from_datasets_and_a_short_fit() -> None:
    require_peer("learn2learn")
    dm = Learn2LearnDataModule.from_datasets(*(dataset(c) for c in SPLIT_CLASSES.values()), seed=0,
                                             meta_batch_size=2, val_tasks=2, test_tasks=2, train_batches_per_epoch=2, **EPISODE)
    check_episode_labels(dm.sampler.sample("train", [0, 1], 0), "train")
    learner = ALGORITHMS.get("protonet")({}, model={"name": "conv4", "filters": 4}, task=dm.task_info())
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False, accelerator="cpu")
    trainer.fit(learner, datamodule=dm)
    trainer.test(learner, datamodule=dm, verbose=False)
    assert 0 <= learner.last_results["test"]["acc"]["mean"] <= 1


def tiny_benchmark(train_ways: int, train_samples: int, test_ways: int, test_samples: int, root: str,
                   device: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """A learn2learn benchmark function (datasets, transforms), as get_tasksets expects."""
    l2l = require_peer("learn2learn")
    t = l2l.data.transforms
    metas = [l2l.data.MetaDataset(dataset(c)) for c in SPLIT_CLASSES.values()]
    spec = [(train_ways, train_samples), (test_ways, test_samples), (test_ways, test_samples)]
    transforms = [[t.NWays(m, n), t.KShots(m, k), t.LoadData(m), t.RemapLabels(m), t.ConsecutiveLabels(m)]
                  for m, (n, k) in zip(metas, spec)]
    return metas, transforms


def test_config_use_with_a_get_tasksets_name(monkeypatch: pytest.MonkeyPatch) -> None:
    l2l = require_peer("learn2learn")
    monkeypatch.setitem(l2l.vision.benchmarks._TASKSETS, "tiny", tiny_benchmark)
    cfg = load_config(None, ["data=learn2learn", "data.benchmark=tiny", "data.ways=2", "data.shots=1", "data.queries=2",
                             "data.eval_shots=2", "data.eval_queries=1"])
    assert cfg.model.name == "conv4"  # the datamodule's default model replaced the default config's MLP
    dm = build_datamodule(cfg)
    batch = dm.sampler.sample("train", [0, 1], seed=0)
    assert batch.support_x.shape == (2, 2, 1, SIDE, SIDE) and batch.query_x.shape == (2, 4, 1, SIDE, SIDE)
    check_episode_labels(batch, "train")
    check_episode_labels(dm.sampler.sample("test", [0], seed=0), "test")
    with pytest.raises(ConfigError, match="is not a learn2learn benchmark; choose one of"):
        Learn2LearnDataModule({"benchmark": "tinyy"}).setup()
    with pytest.raises(ConfigError, match="data.benchmark is required"):
        Learn2LearnDataModule({}).setup()


def test_mismatched_tasks_and_unsupported_options_fail_clearly() -> None:
    l2l = require_peer("learn2learn")
    dm = Learn2LearnDataModule.from_tasksets(tasksets(l2l, ways=2), **EPISODE)
    with pytest.raises(DataError) as err:
        dm.setup()
    assert "has 2 classes" in str(err.value) and "3-way" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValidationError, match="ways_range"):
        Learn2LearnDataModule({"ways_range": [2, 3]})
    with pytest.raises(ConfigError, match="expected \\(train, validation, test\\) task sets"):
        Learn2LearnDataModule.from_tasksets(object())


def test_missing_learn2learn_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # import learn2learn now raises ImportError
    assert DATAMODULES.get("learn2learn") is Learn2LearnDataModule
    with pytest.raises(ConfigError, match="needs the learn2learn package") as err:
        Learn2LearnDataModule({"benchmark": "omniglot"})
    assert "\n" not in str(err.value)


def test_lightmeta_never_imports_learn2learn() -> None:
    """Importing lightmeta and every registered plug-in leaves learn2learn unimported; without
    it (blocked) the bridge is still registered and refuses construction in one line."""
    script = textwrap.dedent("""
        import sys
        import lightmeta
        from lightmeta import ALGORITHMS, DATAMODULES, MODELS
        from lightmeta.errors import ConfigError
        ALGORITHMS.names(), MODELS.names()
        cls = DATAMODULES.get("learn2learn")
        assert not [m for m in sys.modules if m.startswith("learn2learn")], "lightmeta imported learn2learn"
        sys.modules["learn2learn"] = None  # any `import learn2learn` now raises ImportError
        try:
            cls({"benchmark": "omniglot"})
        except ConfigError as exc:
            print("refused:", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused: data=learn2learn needs the learn2learn package")
