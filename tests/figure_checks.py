"""Checks for figures the dashboard writes (``from figure_checks import assert_png_shows_something``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def assert_png_shows_something(path: Path) -> None:
    """The file decodes as an image of real size whose pixels vary (not a blank canvas)."""
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as img:
        assert img.format == "PNG", f"{path.name} is a {img.format}, not a PNG"
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert min(pixels.shape) >= 100, f"{path.name} is only {pixels.shape}"
    assert pixels.std() > 10, f"{path.name} looks blank (pixel std {pixels.std():.1f})"
    assert (pixels < 128).mean() > 0.005, f"{path.name} has almost no dark (drawn) pixels"
