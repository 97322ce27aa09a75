"""Meta-test results: mean ± 95% CI per metric over the fixed evaluation tasks."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightmeta.config import RunConfig

_STEP = re.compile(r"^(?P<metric>\w+?)_step(?P<step>\d+)$")


@dataclass
class ResultRow:
    metric: str
    label: str
    mean: float
    ci95: float
    n: int


@dataclass
class Results:
    """The figures a run reports, with what produced them."""

    split: str
    algorithm: str
    data: str
    n_tasks: int
    rows: list[ResultRow] = field(default_factory=list)

    @classmethod
    def from_metrics(cls, metrics: dict[str, dict[str, float]], cfg: RunConfig, n_tasks: int,
                     split: str = "test") -> "Results":
        regression = "acc" not in metrics
        out = cls(split, cfg.algorithm.name, cfg.data.name, n_tasks)
        steps = sorted({int(m["step"]) for k in metrics if (m := _STEP.match(k))})
        shown_steps = {steps[0], steps[min(1, len(steps) - 1)], steps[-1]} if steps else set()
        for key, value in metrics.items():
            m = _STEP.match(key)
            if m and int(m["step"]) not in shown_steps:
                continue
            if steps and f"{key}_step{steps[-1]}" in metrics:
                continue  # the headline figure is the last step's row
            out.rows.append(ResultRow(key, _label(key, regression), value["mean"], value["ci95"], int(value["n"])))
        out.rows.sort(key=_row_order)
        return out

    def get(self, metric: str) -> ResultRow:
        for row in self.rows:
            if row.metric == metric:
                return row
        raise KeyError(f"no metric '{metric}' in results; have {[r.metric for r in self.rows]}")

    def table(self) -> str:
        """A plain-text table for the terminal (also valid markdown)."""
        title = f"meta-{self.split} results: {self.algorithm} on {self.data}, {self.n_tasks} tasks, mean ± 95% CI"
        width = max([len(r.label) for r in self.rows] + [6])
        lines = [title, "", f"| {'metric':<{width}} | {'mean':>10} | {'± 95% CI':>10} | {'tasks':>5} |",
                 f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 12}|{'-' * 7}|"]
        for r in self.rows:
            lines.append(f"| {r.label:<{width}} | {_fmt(r.mean, r.metric)} | {_fmt(r.ci95, r.metric)} | {r.n:>5} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, run_dir: Path) -> None:
        _atomic_write(run_dir / f"results_{self.split}.json", json.dumps(self.to_dict(), indent=2))
        _atomic_write(run_dir / f"results_{self.split}.md", self.table() + "\n")


def _label(key: str, regression: bool) -> str:
    m = _STEP.match(key)
    base, step = (m["metric"], int(m["step"])) if m else (key, None)
    name = {"loss": "MSE" if regression else "loss", "acc": "accuracy"}.get(base, base)
    if step is None:
        return name
    if step == 0:
        return f"{name} before adaptation"
    return f"{name} after {step} step{'s' if step > 1 else ''}"


def _row_order(row: ResultRow) -> tuple[int, int, str]:
    m = _STEP.match(row.metric)
    return (1, int(m["step"]), row.metric) if m else (0, 0, row.metric)


def _fmt(value: float, metric: str) -> str:
    if metric.startswith("acc"):
        return f"{100 * value:>9.2f}%"
    return f"{value:>10.4f}"


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so no half-written file is left behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
