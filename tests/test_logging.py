"""Loggers: CSV by default; W&B offline without credentials, with the resolved config."""
from __future__ import annotations

from pathlib import Path

import pytest

from wandb_log import summarize

from lightmeta.cli import main

SHORT = ["trainer.max_steps=4", "data.train_batches_per_epoch=2", "data.val_tasks=4", "data.test_tasks=4",
         "data.meta_batch_size=2", "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0",
         "trainer.log_every_n_steps=1"]


def test_wandb_runs_offline_without_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no cached login
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["fit", "logger=wandb", "experiment=wb", f"output_dir={tmp_path / 'runs'}", *SHORT]) == 0
    out = capsys.readouterr().out
    run_dir = Path(out.split("run directory: ")[1].split()[0])
    assert "wandb sync" in out
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), "an offline W&B run with its transaction log"
    logged = summarize(next(offline[0].glob("*.wandb")))
    assert logged["config"]["algorithm"]["name"] == "maml" and logged["config"]["data"]["shots"] == 10
    assert {"train/loss", "val/loss", "val/loss_ci95", "test/loss_step10"} <= logged["history_keys"]
    assert (run_dir / "metrics.csv").is_file()  # the CSV log is kept beside W&B
