"""The README's "Add your own algorithm" example, executed exactly as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightmeta import ALGORITHMS
from lightmeta.config import load_config
from lightmeta.runner import fit
from lightmeta.testing import check_algorithm

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    match = re.search(rf"<!-- example: {marker} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no python block after <!-- example: {marker} -->"
    return match.group(1)


@pytest.fixture
def ridge_head():
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(readme_block("ridge_head"), str(README), "exec"), namespace)
    yield namespace["RidgeHead"]
    ALGORITHMS.unregister("ridge_head")


def test_example_is_short() -> None:
    code = [line for line in readme_block("ridge_head").splitlines() if line.strip()]
    assert len(code) <= 35


def test_example_passes_the_conformance_harness(ridge_head, tmp_path: Path) -> None:
    assert ALGORITHMS.get("ridge_head") is ridge_head
    check_algorithm("ridge_head", tmp_path)


def test_example_learns_sinusoids(ridge_head, tmp_path: Path) -> None:
    """Meta-learned features plus the closed-form head beat predicting zero by a wide margin."""
    cfg = load_config(None, ["algorithm=ridge_head", "trainer.max_steps=150", "data.train_batches_per_epoch=150",
                             "data.val_tasks=20", "data.test_tasks=100", "logger=none",
                             "trainer.enable_progress_bar=false", f"output_dir={tmp_path}"])
    _, results = fit(cfg)
    # predicting 0 scores E[A^2 sin^2] = E[A^2]/2 ~ 4.2 on these tasks
    assert results.get("loss").mean < 1.0
