"""Bad-input catalogue, checkpoints and output folders: one clean line, nothing half-written."""
from __future__ import annotations

from pathlib import Path

import pytest

from lightmeta.cli import main
from lightmeta.config import load_config
from lightmeta.runner import fit

SHORT = ["trainer.max_steps=2", "data.train_batches_per_epoch=2", "data.val_tasks=4", "data.test_tasks=4",
         "data.meta_batch_size=2", "trainer.enable_progress_bar=false", "logger=none", "trainer.num_sanity_val_steps=0"]


@pytest.fixture(scope="module")
def maml_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    run, _ = fit(load_config(None, [*SHORT, f"output_dir={out}"]), test=False)
    return run.run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(("command", "overrides", "expected"), [
    ("test", ["algorithm=protonet", "data=synthetic"], "holds algorithm 'maml' but the config asks for 'protonet'"),
    ("fit", ["algorithm=protonet", "data=synthetic"], "holds algorithm 'maml' but the config asks for 'protonet'"),
    ("fit", ["model.hidden=[8,8]"], "was trained with model"),
    ("fit", ["data=synthetic"], "was trained on data 'sinusoid' but the config has 'synthetic'"),
    ("test", ["data=synthetic", "algorithm=maml"], "was trained on regression tasks but data 'synthetic' is classification"),
])
def test_incompatible_checkpoint_is_refused(maml_ckpt: Path, command: str, overrides: list[str], expected: str,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([command, "--ckpt", str(maml_ckpt), *overrides, *SHORT, f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not list(tmp_path.rglob("version_*")), "a refused run must not leave a run directory"


def test_unwritable_output_dir_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    original = Path.mkdir

    def read_only(self: Path, *args, **kwargs) -> None:
        if self.name.startswith("version_"):
            raise PermissionError(13, "Permission denied")
        original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)  # root ignores chmod, so simulate a read-only folder
    assert main(["fit", *SHORT, f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "cannot create the run directory" in err and "Permission denied" in err and "choose a writable output_dir" in err
