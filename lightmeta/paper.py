"""The paper's figures a config reproduces, read from machine-readable lines in its header.

Convention: in the comment block at the top of a config, one line per reported figure::

    # paper: test/acc = 98.7 ± 0.4 % (Finn, Abbeel & Levine 2017, Table 1)
    # paper: test/loss = 0.45 (some regression paper, Fig. 2)

``<split>/<metric>`` names a metric the run reports (``test/acc``, ``test/loss``,
``test/acc_step0``...); the value may carry ``± CI`` (also written ``+-`` or ``+/-``), a
trailing ``%`` scales value and CI by 1/100 (accuracies are stored as fractions); the
parenthesised source is free text. The figure belongs to the episode setting of the file's
own ``data`` section (``eval_ways``/``ways``, ``eval_shots``/``shots``): a run whose overrides
change that setting is not compared with it.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightmeta.errors import ConfigError

PREFIX = re.compile(r"^#\s*paper\s*:", re.IGNORECASE)
_NUMBER = r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"
LINE = re.compile(
    rf"^#\s*paper\s*:\s*(?P<metric>(?:val|test)/\w+)\s*=\s*(?P<value>{_NUMBER})\s*"
    rf"(?:(?:±|\+/-|\+-)\s*(?P<ci>{_NUMBER})\s*)?(?P<pct>%)?\s*(?:\((?P<source>[^()]*(?:\([^()]*\)[^()]*)*)\))?\s*$",
    re.IGNORECASE,
)
EXAMPLE = "# paper: test/acc = 98.7 ± 0.4 % (Finn et al. 2017, Table 1)"


@dataclass(frozen=True)
class PaperFigure:
    """One published figure: ``metric`` (e.g. ``test/acc``), value and CI in the metric's own
    units (fractions for accuracies), the source, and the setting it was reported for."""

    metric: str
    value: float
    ci95: float | None
    source: str
    ways: int | None = None
    shots: int | None = None

    def applies_to(self, ways: int | None, shots: int | None) -> bool:
        """Whether a run with this evaluation setting is comparable with the figure."""
        return (self.ways is None or self.ways == ways) and (self.shots is None or self.shots == shots)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PaperFigure":
        return cls(**data)


def eval_setting(data: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(ways, shots)`` of the evaluation episodes a ``data`` section describes."""
    def pick(*keys: str) -> int | None:
        for key in keys:
            value = data.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    return pick("eval_ways", "ways"), pick("eval_shots", "shots")


def parse_header(text: str, where: str = "config") -> list[PaperFigure]:
    """Figures stated by ``# paper:`` lines of the leading comment block of a config's text.

    Raises :class:`ConfigError` naming the file and line of a malformed ``# paper:`` line.
    """
    figures: list[PaperFigure] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("#"):
            break
        if not PREFIX.match(line):
            continue
        m = LINE.match(line)
        if m is None:
            raise ConfigError(f"{where}:{number}: malformed paper figure {line!r}; write it as {EXAMPLE!r}")
        scale = 0.01 if m["pct"] else 1.0
        ci = float(m["ci"]) * scale if m["ci"] is not None else None
        figures.append(PaperFigure(m["metric"].lower(), float(m["value"]) * scale, ci, (m["source"] or "").strip()))
    return figures


def read_paper_figures(path: str | Path | None) -> list[PaperFigure]:
    """The figures of a config file, each tagged with the file's own evaluation setting."""
    if path is None:
        return []
    from lightmeta.config import load_yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    figures = parse_header(text, str(path))
    if not figures:
        return []
    data = load_yaml(path).get("data")
    ways, shots = eval_setting(data if isinstance(data, dict) else {})
    return [PaperFigure(f.metric, f.value, f.ci95, f.source, ways, shots) for f in figures]
