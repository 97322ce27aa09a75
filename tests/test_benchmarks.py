"""Smoke test of benchmarks/speed.py: every case's three contenders on tiny synthetic data (CPU,
one step each), the JSON it writes, and the gradient agreement with learn2learn it reports."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import require_peer
from lightmeta.episodes import EpisodeSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
from _common import LiveTensorBytes, fixture  # noqa: E402

TINY_SPEC = EpisodeSpec(3, 1, 2)


def tiny(case: speed.Case) -> speed.Case:
    """The case at toy size: 4 filters, 2 tasks of 3-way 1-shot 2-query, at most 2 inner steps."""
    params = dict(case.params)
    if "inner_steps" in params:
        params["inner_steps"] = min(params["inner_steps"], 2)
    return dataclasses.replace(case, model={**case.model, "filters": 4}, spec=TINY_SPEC, meta_batch=2, params=params)


def tiny_samplers() -> dict:
    """16x16 grey 'Omniglot' and a 20x20 RGB stand-in for the 84x84 fixture, 12 classes each
    (6 for meta-training, 3 each for the validation and test splits)."""
    return {"omniglot": speed.class_tasks(fixture(12, 5, 16, channels=1), 12, 5, 6, TINY_SPEC),
            "synthetic84": speed.class_tasks(fixture(12, 5, 20, seed=1), 12, 5, 6, TINY_SPEC)}


def test_live_tensor_bytes_counts_new_storage_until_freed() -> None:
    """Peak and live bytes against the sizes of the tensors made; views, in-place results and
    tensors made before add nothing."""
    before = torch.ones(10)
    with LiveTensorBytes() as counter:
        a = torch.ones(1000)
        b = a * 2  # a and b alive: the peak
        del a
        b.view(10, 100).mul_(3)
        before.add_(1)
        c = torch.zeros(250, dtype=torch.float64)
    nbytes = lambda t: t.nelement() * t.element_size()  # noqa: E731
    assert counter.peak == 2 * nbytes(b) > nbytes(b) + nbytes(c)
    assert counter.live == nbytes(b) + nbytes(c)
    del b
    assert counter.live == nbytes(c)


def test_speed_benchmark_quick_run_writes_agreeing_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_peer("learn2learn")
    out = tmp_path / "speed.json"
    cases = tuple(tiny(c) for c in speed.CASES)
    result = speed.main(["--device", "cpu", "--quick", "--out", str(out)], cases=cases, samplers=tiny_samplers())

    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("command", "device", "device_name", "torch", "threads", "load_average_before", "peak_memory_measure"):
        assert key in written, key
    assert written["command"].startswith("python ") and "--quick" in written["command"]
    assert [c["case"] for c in written["cases"]] == list(speed.CASE_NAMES)
    table = capsys.readouterr().out
    for case in written["cases"]:
        assert case["title"] in table
        missing = speed.unavailable(next(c for c in cases if c.name == case["case"]))
        if missing is not None:  # an option this build lacks (inner-step checkpointing) is reported, not skipped
            assert case["status"] == missing and case["status"].startswith("n/a")
            continue
        assert case["status"] == "ok"
        rows = case["contenders"]
        assert set(rows) == set(speed.CONTENDERS)
        for name, row in rows.items():
            assert row["per_s"] == pytest.approx(2 / row["median_s"]) and len(row["seconds"]) == 1
            assert row["peak_bytes"] > 0, name
        assert rows["learn2learn"]["peak_bytes_one_backward"] > 0
        for name in ("ours_batched", "ours_sequential"):
            agreement = rows[name]["grad_vs_learn2learn"]
            assert agreement["whole"] <= speed.GRAD_TOLERANCE, (case["case"], name, agreement)
            assert agreement["worst_tensor"] <= speed.GRAD_TOLERANCE, (case["case"], name, agreement)
            assert 0 <= rows[name]["grad_vs_float64"]["whole"] < 1, (case["case"], name)
            assert rows[name]["speedup_vs_learn2learn"] == pytest.approx(rows["learn2learn"]["median_s"] / rows[name]["median_s"])
