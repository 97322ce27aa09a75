"""Mixed precision: bf16-mixed trains every registered algorithm; fp16 is refused where unsound."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from lightmeta import ALGORITHMS, GradientMetaLearner
from lightmeta.errors import ConfigError
from lightmeta.runner import fit
from lightmeta.testing import example_config


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_bf16_mixed_trains_every_algorithm(name: str, tmp_path: Path) -> None:
    cfg = example_config(name, tmp_path, trainer={"precision": "bf16-mixed"})
    run, results = fit(cfg)
    assert run.trainer.precision == "bf16-mixed"
    assert results is not None and all(math.isfinite(r.mean) for r in results.rows)
    # weights stay float32 (autocast computes in bf16, the optimiser updates fp32 master weights)
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in run.learner.parameters())


@pytest.mark.parametrize("name", [n for n in ALGORITHMS.names() if issubclass(ALGORITHMS.get(n), GradientMetaLearner)])
def test_fp16_is_refused_for_gradient_based_learners(name: str, tmp_path: Path) -> None:
    cfg = example_config(name, tmp_path, trainer={"precision": "16-mixed"})
    with pytest.raises(ConfigError, match="trainer.precision=16-mixed is not supported .* use trainer.precision=bf16-mixed"):
        fit(cfg)
    assert not any(tmp_path.rglob("version_*")), "a refused run must not leave a run directory"
