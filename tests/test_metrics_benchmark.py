"""Smoke test of benchmarks/metrics.py on two shapes images: the table's rows and ROAD's agreement with Quantus.

No timing is asserted: the run checks the wiring and that camfn's ROAD scores equal those of Quantus 0.6's
imputation loop on the shipped RGB model (noise 0) to 1e-5.
"""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

pytest.importorskip("quantus")
ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # the benchmarks package lives beside camfn, outside the installed package
    sys.path.insert(0, ROOT)

from benchmarks import metrics as bench  # noqa: E402


def test_metrics_benchmark_runs_and_road_agrees_with_quantus():
    text = bench.run(2, 1)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "ROAD, one call of all images",
        "ROAD, calls of 8 images",
        "ROAD, solver='cg', first 8 images only",
        "deletion, 32 steps",
        "insertion, 32 steps",
    ]
    diff = float(re.search(r"max \|difference\| ([0-9.]+e[+-][0-9]+)", text).group(1))
    assert diff < 1e-5
