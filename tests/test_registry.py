"""Registries: decorator registration, entry-point plug-ins, dotted paths, no generic top-level names."""
from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from lightmeta import ALGORITHMS, DATAMODULES, MODELS, MetaLearner
from lightmeta.config import load_config
from lightmeta.errors import ConfigError, PluginError
from lightmeta.registry import Registry
from lightmeta.runner import fit

SHORT = ["trainer.max_steps=3", "data.train_batches_per_epoch=3", "data.val_tasks=4", "data.test_tasks=4",
         "data.meta_batch_size=2", "trainer.enable_progress_bar=false", "logger=none", "trainer.num_sanity_val_steps=0"]


def test_builtins_are_registered_under_lightmeta_only() -> None:
    assert "maml" in ALGORITHMS.names() and "sinusoid" in DATAMODULES.names() and "mlp" in MODELS.names()
    assert "algorithms" not in sys.modules and "datamodules" not in sys.modules
    assert ALGORITHMS.get("maml").__module__ == "lightmeta.algorithms.maml"


def test_duplicate_name_raises() -> None:
    maml = ALGORITHMS.get("maml")

    class Impostor(maml):
        pass

    with pytest.raises(PluginError, match="registered twice"):
        ALGORITHMS.register("maml")(Impostor)
    assert ALGORITHMS.get("maml") is maml
    ALGORITHMS.register("maml")(maml)  # the same class again is harmless


def _write_plugin_distribution(root: Path) -> None:
    """A package plus a ``.dist-info`` on a path entry: what ``pip install`` would leave, minus pip."""
    pkg = root / "fake_lightmeta_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from lightmeta import GradientMetaLearner, GradientConfig

        class HalfStepConfig(GradientConfig):
            factor: float = 0.5

        class HalfStepMAML(GradientMetaLearner):
            """MAML whose inner step is scaled by a factor: a third-party plug-in."""
            Config = HalfStepConfig

            def inner_update(self, params, grads, step):
                lr = self.config.inner_lr * self.config.factor
                return {k: p - lr * grads[k] for k, p in params.items()}
    '''))
    dist = root / "fake_lightmeta_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-lightmeta-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[lightmeta.algorithms]\nhalfstep = fake_lightmeta_plugin:HalfStepMAML\n"
        "broken = fake_lightmeta_missing_module:Nothing\n"
    )


def test_entry_point_plugin_registers_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_plugin_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ALGORITHMS.reload_entry_points()
    try:
        cls = ALGORITHMS.get("halfstep")
        assert issubclass(cls, MetaLearner) and cls.registered_name == "halfstep"
        # the broken plug-in names its distribution, and the others keep working
        assert any("fake-lightmeta-plugin" in str(w.message) for w in caught)
        with pytest.raises(PluginError, match="'broken' from distribution 'fake-lightmeta-plugin' failed to import"):
            ALGORITHMS.get("broken")
        assert "maml" in ALGORITHMS.names()

        cfg = load_config(None, ["algorithm=halfstep", "algorithm.factor=0.25", f"output_dir={tmp_path}", *SHORT])
        run, results = fit(cfg)
        assert type(run.learner).__name__ == "HalfStepMAML" and run.learner.config.factor == 0.25
        assert results is not None and results.get("loss_step10").n == 4
    finally:
        ALGORITHMS.unregister("halfstep")
        ALGORITHMS.unregister("broken")


def test_dotted_class_path_in_config(tmp_path: Path) -> None:
    cfg = load_config(None, ["algorithm=lightmeta.algorithms.maml:MAML", f"output_dir={tmp_path}", *SHORT])
    assert cfg.algorithm.inner_lr == 0.01
    with pytest.raises(ConfigError, match="cannot import algorithm 'nowhere.module:Thing'"):
        load_config(None, ["algorithm=nowhere.module:Thing"])


def test_fresh_registry_lists_nothing_unknown() -> None:
    reg: Registry = Registry("widget", "lightmeta.test_widgets", "lightmeta.models")
    with pytest.raises(PluginError, match="unknown widget 'x'"):
        reg.get("x")
