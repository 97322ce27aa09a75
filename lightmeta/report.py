"""Results tables next to the paper's figures, for one run (W&B) or several (``report``).

A row is one metric of one run in its evaluation setting (ways, shots): mean ± 95% CI over
the meta-test tasks, the number of tasks, and the published figure where the config's header
states one for that setting (:mod:`lightmeta.paper`). ``python -m lightmeta report RUN_DIR ...``
reads ``results_test.json``, ``config.yaml`` and ``paper.json`` of each run directory and
writes a markdown table and a bar chart with the CIs side by side.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from lightmeta.errors import ConfigError, DataError
from lightmeta.paper import PaperFigure, eval_setting
from lightmeta.results import _label

PAPER_FILE = "paper.json"
_STEP = re.compile(r"_step\d+$")
COLUMNS = ["run", "algorithm", "data", "setting", "ways", "shots", "metric", "label", "mean", "ci95",
           "tasks", "paper", "paper_ci95", "paper_source"]


@dataclass
class TableRow:
    """One metric of one run, with the paper's figure for the same setting (or ``None``)."""

    run: str
    algorithm: str
    data: str
    ways: int | None
    shots: int | None
    metric: str
    label: str
    mean: float
    ci95: float
    tasks: int
    paper: float | None = None
    paper_ci95: float | None = None
    paper_source: str = ""

    @property
    def setting(self) -> str:
        return setting_label(self.ways, self.shots)

    def values(self) -> list[Any]:
        """The row in :data:`COLUMNS` order (for a ``wandb.Table``)."""
        return [getattr(self, c) for c in COLUMNS]


def setting_label(ways: int | None, shots: int | None) -> str:
    """``5-way 1-shot``; ``10-shot`` for regression (no ways)."""
    parts = [f"{ways}-way"] if ways is not None else []
    parts += [f"{shots}-shot"] if shots is not None else []
    return " ".join(parts) or "-"


def format_value(value: float | None, metric: str, ci: float | None = None) -> str:
    """``98.70 ± 0.31%`` for accuracies, ``0.5123 ± 0.0100`` otherwise; ``-`` when missing."""
    if value is None:
        return "-"
    if metric.startswith("acc"):
        return f"{100 * value:.2f}" + (f" ± {100 * ci:.2f}" if ci is not None else "") + "%"
    return f"{value:.4f}" + (f" ± {ci:.4f}" if ci is not None else "")


def table_rows(metrics: dict[str, dict[str, float]], config: dict[str, Any], figures: Iterable[PaperFigure],
               run: str, names: list[str] | None = None, split: str = "test") -> list[TableRow]:
    """Rows for the metrics ``names`` a run reports (default: the headline metrics, those without
    ``_stepK``, and any metric a paper figure names).

    ``metrics`` maps metric name to ``{mean, ci95, n}`` (``MetaLearner.last_results[split]``);
    ``config`` is the resolved run config as a dict.
    """
    data = config.get("data", {})
    ways, shots = eval_setting(data)
    regression = "acc" not in metrics
    applicable = {f.metric.split("/", 1)[1]: f for f in figures
                  if f.metric.startswith(f"{split}/") and f.applies_to(ways, shots)}
    if names is None:
        names = [k for k in metrics if not _STEP.search(k)] + [k for k in applicable if _STEP.search(k)]
    names = [k for k in names if k in metrics]
    rows = []
    for name in names:
        m, fig = metrics[name], applicable.get(name)
        rows.append(TableRow(
            run, config.get("algorithm", {}).get("name", "?"), data.get("name", "?"), ways, shots, name,
            _label(name, regression), float(m["mean"]), float(m["ci95"]), int(m["n"]),
            fig.value if fig else None, fig.ci95 if fig else None, fig.source if fig else "",
        ))
    return rows


def markdown(rows: list[TableRow]) -> str:
    """A markdown table of the rows, runs side by side."""
    lines = ["| run | algorithm | data | setting | metric | mean ± 95% CI | tasks | paper |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = format_value(r.paper, r.metric, r.paper_ci95)
        if r.paper is not None and r.paper_source:
            paper += f" ({r.paper_source})"
        lines.append(f"| {r.run} | {r.algorithm} | {r.data} | {r.setting} | {r.label} | "
                     f"{format_value(r.mean, r.metric, r.ci95)} | {r.tasks} | {paper} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- run directories
def save_paper_figures(run_dir: Path, figures: list[PaperFigure]) -> None:
    """Keep the config header's figures with the run, for ``report`` (written only when there are any)."""
    if figures:
        (run_dir / PAPER_FILE).write_text(json.dumps([f.to_dict() for f in figures], indent=2) + "\n")


@dataclass
class FinishedRun:
    """What ``report`` reads from a run directory."""

    name: str
    config: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    figures: list[PaperFigure]

    def rows(self, names: list[str] | None = None) -> list[TableRow]:
        """Its results table; ``names`` as in :func:`table_rows`."""
        return table_rows(self.metrics, self.config, self.figures, self.name, names)


def load_run(run_dir: str | Path) -> FinishedRun:
    """The meta-test results, config and paper figures of a run directory written by ``fit`` or ``test``."""
    run_dir = Path(run_dir)
    results_file, config_file = run_dir / "results_test.json", run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ConfigError(f"run directory '{run_dir}' does not exist; pass RUN_DIR as printed by fit or test")
    if not results_file.is_file() or not config_file.is_file():
        raise DataError(f"'{run_dir}' has no meta-test results (results_test.json and config.yaml); "
                        "run `python -m lightmeta fit` without --no-test, or `test --ckpt`, first")
    try:
        results = json.loads(results_file.read_text())
        config = yaml.safe_load(config_file.read_text())
        figures = [PaperFigure.from_dict(f) for f in json.loads((run_dir / PAPER_FILE).read_text())] \
            if (run_dir / PAPER_FILE).is_file() else []
        metrics = {r["metric"]: {"mean": r["mean"], "ci95": r["ci95"], "n": r["n"]} for r in results["rows"]}
        for base in ("acc", "loss"):  # results files list a gradient learner's headline as its last step
            steps = [int(k.rsplit("_step", 1)[1]) for k in metrics if k.startswith(f"{base}_step")]
            if base not in metrics and steps:
                metrics[base] = metrics[f"{base}_step{max(steps)}"]
        name = f"{config.get('experiment', run_dir.parent.name)}/{run_dir.name}"
    except (ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as exc:
        raise DataError(f"results in '{run_dir}' are unreadable ({type(exc).__name__}: {exc}); rerun the test") from None
    return FinishedRun(name, config, metrics, figures)


def primary_metric(runs: list[FinishedRun]) -> str:
    """``acc`` when every run reports it (classification), else ``loss``."""
    return "acc" if all("acc" in r.metrics for r in runs) else "loss"


def report(run_dirs: list[str | Path], out_dir: str | Path = ".", metric: str | None = None) -> tuple[str, Path, Path]:
    """Compare runs: markdown table (printed and saved) and a PNG bar chart with 95% CIs.

    Returns ``(markdown, report.md path, report.png path)``.
    """
    from lightmeta.plots import comparison_chart, save_figure

    if not run_dirs:
        raise ConfigError("report needs at least one RUN_DIR (as printed by fit or test)")
    runs = [load_run(d) for d in run_dirs]
    metric = metric or primary_metric(runs)
    chosen: list[TableRow] = []
    for d, run in zip(run_dirs, runs):
        if metric not in run.metrics:
            raise ConfigError(f"--metric {metric}: run '{d}' does not report it; it has {', '.join(sorted(run.metrics))}")
        chosen.extend(run.rows([metric]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(chosen)
    md_path, png_path = out / "report.md", out / "report.png"
    md_path.write_text(f"meta-test {chosen[0].label}, mean ± 95% CI over the test tasks\n\n{text}\n")
    save_figure(comparison_chart(chosen), png_path)
    return text, md_path, png_path
