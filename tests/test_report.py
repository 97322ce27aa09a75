"""The paper-figure header convention, results tables and ``python -m lightmeta report``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from figure_checks import assert_png_shows_something

from lightmeta.cli import main
from lightmeta.config import load_config, resolve_config_path, shipped_config_names
from lightmeta.errors import ConfigError
from lightmeta.paper import PaperFigure, parse_header, read_paper_figures
from lightmeta.report import format_value, markdown, table_rows
from lightmeta.runner import fit

SHORT = ["trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0", "data.val_tasks=4",
         "data.test_tasks=4", "data.eval_batch_size=4"]
FINN = "# paper: test/acc = 98.7 ± 0.4 % (Finn, Abbeel & Levine 2017, Table 1 (Omniglot))"


# ---------------------------------------------------------------------- the header convention
def test_paper_lines_parse_in_every_spelling() -> None:
    text = "\n".join([
        "# MAML on Omniglot.", FINN,
        "#paper: test/acc_step0=0.2",
        "# Paper: val/loss = 1.5e-1 +- 2e-2 (made up)",
        "# paper: test/loss = 0.30 +/- 0.05",
        "algorithm: {name: maml}",
        "# paper: test/acc = 1.0  (after the header: ignored)",
    ])
    figures = parse_header(text)
    assert [(f.metric, f.value, f.ci95, f.source) for f in figures] == [
        ("test/acc", pytest.approx(0.987), pytest.approx(0.004), "Finn, Abbeel & Levine 2017, Table 1 (Omniglot)"),
        ("test/acc_step0", 0.2, None, ""),
        ("val/loss", 0.15, 0.02, "made up"),
        ("test/loss", 0.30, 0.05, ""),
    ]


@pytest.mark.parametrize("line", ["# paper: acc = 98.7", "# paper: test/acc = high", "# paper: test/acc 98.7 %",
                                  "# paper: train/acc = 0.9", "# paper: test/acc = 98.7 ± %"])
def test_malformed_paper_line_names_file_and_line(line: str) -> None:
    with pytest.raises(ConfigError, match=r"^cfg\.yaml:2: malformed paper figure .*write it as '# paper: test/acc = "):
        parse_header(f"# header\n{line}\n", "cfg.yaml")


def test_figures_carry_the_setting_of_their_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"{FINN}\nalgorithm: {{name: maml}}\ndata: {{name: omniglot, ways: 20, shots: 5, eval_ways: 5, eval_shots: 1}}\n")
    (fig,) = read_paper_figures(path)
    assert (fig.ways, fig.shots) == (5, 1)
    assert fig.applies_to(5, 1) and not fig.applies_to(5, 5) and not fig.applies_to(20, 1)
    assert PaperFigure.from_dict(fig.to_dict()) == fig


def test_every_shipped_config_header_parses() -> None:
    for name in shipped_config_names():
        for fig in read_paper_figures(resolve_config_path(name)):  # raises on a malformed line
            assert fig.metric.split("/")[0] in ("val", "test") and fig.value > 0, name


def test_table_rows_compare_only_the_same_setting() -> None:
    metrics = {"acc": {"mean": 0.95, "ci95": 0.01, "n": 600}, "loss": {"mean": 0.2, "ci95": 0.02, "n": 600},
               "acc_step0": {"mean": 0.2, "ci95": 0.01, "n": 600}, "acc_step10": {"mean": 0.95, "ci95": 0.01, "n": 600}}
    fig = PaperFigure("test/acc", 0.987, 0.004, "Finn et al. 2017", ways=5, shots=1)
    config = {"algorithm": {"name": "maml"}, "data": {"name": "omniglot", "ways": 5, "shots": 1}}
    rows = table_rows(metrics, config, [fig], "exp/version_0")
    assert [(r.metric, r.setting, r.tasks, r.paper) for r in rows] == [
        ("acc", "5-way 1-shot", 600, 0.987), ("loss", "5-way 1-shot", 600, None)]
    assert "| exp/version_0 | maml | omniglot | 5-way 1-shot | accuracy | 95.00 ± 1.00% | 600 | 98.70 ± 0.40% " \
           "(Finn et al. 2017) |" in markdown(rows)
    five_shot = {**config, "data": {"name": "omniglot", "ways": 5, "shots": 5}}
    assert all(r.paper is None for r in table_rows(metrics, five_shot, [fig], "exp/version_1"))
    assert format_value(0.51234, "loss", 0.01) == "0.5123 ± 0.0100" and format_value(None, "acc") == "-"


# ---------------------------------------------------------------------- report on real runs
def _short_run(tmp_path: Path, config: str | None, *overrides: str) -> Path:
    cfg = load_config(config, [*overrides, *SHORT, "trainer.max_steps=2", "data.train_batches_per_epoch=2",
                               "data.meta_batch_size=2", "data.image_shape=[1,8,8]", "model.hidden=[16]",
                               "logger=csv", f"output_dir={tmp_path / 'runs'}"])
    run, results = fit(cfg)
    assert results is not None
    return run.run_dir


def test_report_puts_two_runs_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header_config = tmp_path / "maml_synthetic.yaml"
    header_config.write_text(f"# MAML, synthetic 5-way 1-shot.\n{FINN}\nalgorithm: {{name: maml, eval_inner_steps: 2}}\n"
                             "model: {name: mlp}\ndata: {name: synthetic, ways: 5, shots: 1}\nexperiment: maml-syn\n")
    maml = _short_run(tmp_path, str(header_config))
    proto = _short_run(tmp_path, None, "algorithm=protonet", "data=synthetic", "experiment=proto-syn")
    assert (maml / "paper.json").is_file() and not (proto / "paper.json").exists()

    out = tmp_path / "report"
    assert main(["report", str(maml), str(proto), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert lines[0].startswith("| run | algorithm |") and len(lines) == 3
    for run_dir, line, paper in ((maml, lines[1], "98.70 ± 0.40% (Finn, Abbeel & Levine 2017, Table 1 (Omniglot))"),
                                 (proto, lines[2], "-")):
        rows = {r["metric"]: r for r in json.loads((run_dir / "results_test.json").read_text())["rows"]}
        acc = rows.get("acc") or rows["acc_step2"]  # a gradient learner's headline is its last inner step
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [f"{run_dir.parent.name}/{run_dir.name}", "maml" if run_dir == maml else "protonet",
                         "synthetic", "5-way 1-shot", "accuracy", f"{100 * acc['mean']:.2f} ± {100 * acc['ci95']:.2f}%",
                         str(acc["n"]), paper]
        assert line in printed
    assert_png_shows_something(out / "report.png")

    # a metric only one run reports, an unknown metric, a folder without results: one clear error line
    assert main(["report", str(maml), str(proto), "--metric", "acc_step0", "--out", str(out)]) == 2
    assert f"run '{proto}' does not report it" in capsys.readouterr().err
    assert main(["report", str(maml), "--metric", "f1", "--out", str(out)]) == 2
    assert f"run '{maml}' does not report it; it has acc, acc_step0" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no meta-test results" in err and len(err.strip().splitlines()) == 1
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
