"""Class splits as data: split files, seeded ratio splits, and the copy kept with every run.

A split maps ``train``/``val``/``test`` to disjoint lists of class names. Benchmarks ship
split files citing their source; user datasets either name one (``data.split_file``) or draw
one from a ratio with a seed (:func:`ratio_split`). A drawn split is never implicit: it is
written to a JSON file next to the decoded cache and copied into the run directory
(:func:`keep_with_run`), so the run records exactly which classes it trained and tested on
and another run can reuse them with ``data.split_file=<run_dir>/<name>_split.json``.

File format (the shipped Omniglot split files use the same)::

    {"dataset": "...", "source": "...", "train": [names], "val": [names], "test": [names]}
"""
from __future__ import annotations

import filecmp
import json
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from lightmeta.download import atomic_write
from lightmeta.errors import ConfigError, DataError
from lightmeta.seeding import generator_for

SPLIT_NAMES = ("train", "val", "test")
#: mini-ImageNet's 64/16/20 class proportions (Ravi & Larochelle 2017)
DEFAULT_RATIO = (0.64, 0.16, 0.20)
STREAM = "class-split"

Splits = dict[str, list[str]]


def check_ratio(ratio: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative fractions summing to 1, or :class:`ValueError` (for pydantic validators)."""
    if len(ratio) != 3 or any(r < 0 for r in ratio) or not math.isclose(sum(ratio), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_ratio={list(ratio)} must be three non-negative fractions (train, val, test) summing to 1")
    return (float(ratio[0]), float(ratio[1]), float(ratio[2]))


def split_counts(n: int, ratio: Sequence[float]) -> tuple[int, int, int]:
    """Classes per split: ``round(ratio * n)`` for val and test, the rest for train; none empty."""
    val, test = round(ratio[1] * n), round(ratio[2] * n)
    counts = (n - val - test, val, test)
    for split, k in zip(SPLIT_NAMES, counts):
        if k < 1:
            raise ConfigError(
                f"data.split_ratio={list(ratio)} leaves the '{split}' split of {n} classes empty; "
                "raise its fraction or add classes"
            )
    return counts


def ratio_split(names: Sequence[str], ratio: Sequence[float], seed: int) -> Splits:
    """A seeded random split of ``names`` (taken in sorted order, so listing order is irrelevant).

    The permutation is ``torch.randperm`` under ``generator_for(seed, "class-split", 0)``;
    each split's names come back sorted.
    """
    ordered = sorted(names)
    n_train, n_val, _ = split_counts(len(ordered), ratio)
    perm = torch.randperm(len(ordered), generator=generator_for(seed, STREAM, 0)).tolist()
    picked = [ordered[i] for i in perm]
    parts = (picked[:n_train], picked[n_train : n_train + n_val], picked[n_train + n_val :])
    return {split: sorted(part) for split, part in zip(SPLIT_NAMES, parts)}


def read_split_file(path: str | Path, known: Sequence[str]) -> Splits:
    """The ``train``/``val``/``test`` class lists of a split file; every name must be a known
    class and no class may be in two splits (classes named nowhere are left out)."""
    path = Path(path).expanduser()
    try:
        blob = json.loads(path.read_text())
        splits = {s: blob[s] for s in SPLIT_NAMES}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"split file {path} is unreadable ({type(exc).__name__}: {exc}); it needs lists "
                        "'train', 'val' and 'test' of class names") from None
    if not all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in splits.values()):
        raise DataError(f"split file {path}: 'train', 'val' and 'test' must be lists of class names")
    names = set(known)
    seen: dict[str, str] = {}
    for split, listed in splits.items():
        for c in listed:
            if c not in names:
                raise DataError(f"split file {path} names class '{c}' ({split}) that the data does not have; "
                                f"the data has {len(names)} classes, e.g. '{sorted(names)[0]}'")
            if c in seen:
                raise DataError(f"split file {path} puts class '{c}' in both '{seen[c]}' and '{split}'; splits must be disjoint")
            seen[c] = split
    return splits


def write_split_file(path: Path, splits: Splits, dataset: str, source: str) -> Path:
    """Write a split file atomically (unchanged files are left alone); returns ``path``."""
    text = json.dumps({"dataset": dataset, "source": source, **{s: splits[s] for s in SPLIT_NAMES}}, indent=1) + "\n"
    if path.is_file() and path.read_text() == text:
        return path
    try:
        with atomic_write(path) as tmp:
            tmp.write_text(text)
    except OSError as exc:
        raise DataError(f"cannot write the split file {path} ({exc.strerror}); set data.cache_dir to a writable folder") from None
    return path


def keep_with_run(split_file: Path, run_dir: Path, name: str) -> Path:
    """Copy ``split_file`` into ``run_dir`` as ``name`` (``name-1``, ``name-2``... when a
    different file already has that name, e.g. two sources of a mixture); returns the copy."""
    stem, suffix = Path(name).stem, Path(name).suffix
    target, k = run_dir / name, 0
    while target.exists() and not filecmp.cmp(target, split_file, shallow=False):
        k += 1
        target = run_dir / f"{stem}-{k}{suffix}"
    if not target.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(split_file, target)
    return target


def run_dir_of(datamodule: Any) -> Path | None:
    """The run directory of the trainer a datamodule is attached to (global rank 0 only)."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None or not getattr(trainer, "is_global_zero", True):
        return None
    root = getattr(trainer, "default_root_dir", None)
    return Path(root) if root else None


def class_indices(splits: Splits, names: Sequence[str]) -> dict[str, list[int]]:
    """Class ids (positions in ``names``) of every split."""
    index = {c: i for i, c in enumerate(names)}
    return {s: [index[c] for c in splits[s]] for s in SPLIT_NAMES}
