"""Run configs: YAML + overrides, two-stage validation, clean CLI errors (exit 2, field path)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightmeta.cli import main
from lightmeta.config import apply_overrides, load_config, shipped_config_names, validate_config, resolve_config_path
from lightmeta.errors import ConfigError


def test_default_config_is_the_paper_sinusoid_setup() -> None:
    cfg = load_config()
    assert (cfg.algorithm.name, cfg.model.name, cfg.data.name) == ("maml", "mlp", "sinusoid")
    assert cfg.model.hidden == [40, 40] and cfg.data.shots == 10 and cfg.data.meta_batch_size == 25
    assert cfg.algorithm.inner_lr == 0.01 and cfg.algorithm.inner_steps == 1 and cfg.algorithm.lr == 1e-3


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(None, ["algorithm.inner_lr=0.4", "model.hidden=[8, 8]", "trainer.max_steps=7",
                             "algorithm.first_order=true", "logger.entity=null"])
    assert cfg.algorithm.inner_lr == 0.4 and cfg.model.hidden == [8, 8]
    assert cfg.trainer.max_steps == 7 and cfg.algorithm.first_order is True and cfg.logger.entity is None


def test_switching_plugin_drops_old_params() -> None:
    raw = {"algorithm": {"name": "maml", "inner_lr": 0.3}}
    assert apply_overrides(raw, ["algorithm=other"]) == {"algorithm": {"name": "other"}}
    assert apply_overrides(raw, ["algorithm=maml"]) == raw  # same plug-in keeps its params


@pytest.mark.parametrize("name", shipped_config_names())
def test_every_shipped_config_validates(name: str) -> None:
    path = resolve_config_path(name)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), f"{path} must start with a comment header (source, target, usage)"
    cfg = validate_config(yaml.safe_load(path.read_text()))
    assert cfg.algorithm.name and cfg.data.name


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["algorithm.inner_lrr=0.1"], "unknown key 'algorithm.inner_lrr' (did you mean 'inner_lr'?)"),
        (["trainer.max_step=5"], "unknown key 'trainer.max_step' (did you mean 'max_steps'?)"),
        (["data.shots=ten"], "data.shots=\"ten\""),
        (["algorithm.lr=-0.001"], "algorithm.lr=-0.001: Input should be greater than 0"),
        (["algorithm.inner_lr=0"], "algorithm.inner_lr=0: Input should be greater than 0"),
        (["algorithm=mamll"], "algorithm.name: unknown algorithm 'mamll' (did you mean 'maml'?)"),
        (["data=sinusiod"], "data.name: unknown datamodule 'sinusiod' (did you mean 'sinusoid'?)"),
        (["seed"], "override 'seed' must look like key.path=value"),
    ],
)
def test_bad_config_errors_name_the_field(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"algorithm": {"name": "maml", "lr": -1}, "model": {"name": "mlp"},
                                   "data": {"name": "sinusoid", "shots": "many"}}))
    proc = subprocess.run([sys.executable, "-m", "lightmeta", "fit", "--config", str(bad), f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "algorithm.lr=-1" in lines[0] and 'data.shots="many"' in lines[0]
    assert not any(tmp_path.glob("*/version_*")), "no run directory may be created for a bad config"


def test_cli_config_prints_resolved_yaml_and_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "algorithm.inner_lr=0.2"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["algorithm"]["inner_lr"] == 0.2
    assert resolved["trainer"]["precision"] == "32-true"  # defaults are filled in
    validate_config(resolved)  # the printed config round-trips

    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"algorithm", "model", "data", "trainer"} <= set(schema["properties"])
    assert "maml" in json.dumps(schema) and "sinusoid" in json.dumps(schema)


def test_missing_config_file_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--config", "maml/sinusoidd"]) == 2
    err = capsys.readouterr().err
    assert "config file 'maml/sinusoidd' not found (did you mean 'maml/sinusoid'?)" in err
