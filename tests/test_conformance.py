"""The conformance harness over every registered algorithm and datamodule."""
from __future__ import annotations

from pathlib import Path

import pytest

from lightmeta import ALGORITHMS, DATAMODULES
from lightmeta.testing import check_algorithm_config, check_algorithm_fit, check_algorithm_step, check_datamodule

from helpers import require_peer


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_algorithm_config(name: str) -> None:
    check_algorithm_config(name)


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_algorithm_meta_step(name: str, tmp_path: Path) -> None:
    check_algorithm_step(name, tmp_path)


@pytest.mark.parametrize("name", ALGORITHMS.names())
def test_algorithm_fit_test_and_checkpoint(name: str, tmp_path: Path) -> None:
    check_algorithm_fit(name, tmp_path)


@pytest.mark.parametrize("name", DATAMODULES.names())
def test_datamodule_contract(name: str, tmp_path: Path) -> None:
    peer = getattr(DATAMODULES.get(name), "peer", None)  # e.g. the learn2learn bridge
    if peer:
        require_peer(peer)
    check_datamodule(name, tmp_path)
