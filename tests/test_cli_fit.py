"""End to end through the real CLI entry point: fit, results table, checkpoints, test/validate --ckpt."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightmeta import ALGORITHMS
from lightmeta.cli import main
from lightmeta.config import load_config
from lightmeta.runner import fit, load_learner

REDUCED = ["trainer.max_steps=300", "data.train_batches_per_epoch=100", "data.val_tasks=50",
           "data.test_tasks=200", "trainer.enable_progress_bar=false"]


def _lightmeta(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lightmeta", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.mark.slow
def test_default_fit_end_to_end_adapts(tmp_path: Path) -> None:
    proc = _lightmeta("fit", *REDUCED, f"output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "meta-test results: maml on sinusoid, 200 tasks" in proc.stdout
    assert "MSE before adaptation" in proc.stdout and "MSE after 10 steps" in proc.stdout
    run_dir = Path(proc.stdout.split("run directory: ")[1].split()[0])
    results = {r["metric"]: r for r in json.loads((run_dir / "results_test.json").read_text())["rows"]}
    assert results["loss_step10"]["n"] == 200
    assert results["loss_step1"]["mean"] < results["loss_step0"]["mean"]
    assert results["loss_step10"]["mean"] < results["loss_step0"]["mean"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.csv").is_file()
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "val/loss_ci95", "test/loss_step0"} <= set(header)

    # the best checkpoint evaluated again through `test --ckpt` reproduces the figures exactly
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    again = _lightmeta("test", "--ckpt", str(best), f"output_dir={tmp_path / 'eval'}", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    eval_dir = Path(again.stdout.split("run directory: ")[1].split()[0])
    rerun = {r["metric"]: r for r in json.loads((eval_dir / "results_test.json").read_text())["rows"]}
    assert rerun["loss_step10"]["mean"] == pytest.approx(results["loss_step10"]["mean"], rel=1e-6)


def test_checkpoint_reloads_with_identical_predictions(tmp_path: Path) -> None:
    cfg = load_config(None, ["trainer.max_steps=20", "data.train_batches_per_epoch=10", "data.val_tasks=5",
                             "data.test_tasks=5", "trainer.enable_progress_bar=false", "logger=none",
                             f"output_dir={tmp_path}"])
    run, _ = fit(cfg)
    best = run.trainer.checkpoint_callback.best_model_path
    reloaded = ALGORITHMS.get("maml").load_from_checkpoint(best, weights_only=True)
    assert reloaded.config == run.learner.config and reloaded.task_info == run.learner.task_info
    x = torch.linspace(-5, 5, 50).unsqueeze(1)
    run.learner.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(run.learner(x), reloaded(x))
    assert torch.equal(load_learner(best)(x).detach(), reloaded(x).detach())


def test_ckpt_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", "--ckpt", str(tmp_path / "missing.ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "missing.ckpt' does not exist" in err and err.count("\n") == 1
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["validate", "--ckpt", str(junk)]) == 1
    err = capsys.readouterr().err
    assert "refusing to load checkpoint" in err and "junk.ckpt': it is not a weights-only checkpoint" in err


def test_list_shows_plugins_with_hyperparameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ALGORITHMS.names():
        assert f"  {name}  (" in out
    assert "inner_lr: float = 0.01" in out and "shots: int = 10" in out and "maml/sinusoid" in out
