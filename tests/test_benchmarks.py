"""Smoke tests of the benchmark scripts: options, the method mapping, the tables and the growth fit.

No timing is asserted; the two end-to-end runs are tiny (64 px, one repeat) and check wiring and agreement.
"""

from __future__ import annotations

import math
import pathlib
import sys

import pytest

import camfn

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # the benchmarks package lives beside camfn, outside the installed package
    sys.path.insert(0, ROOT)

from benchmarks import race, scaling, speed  # noqa: E402


def test_race_quick_defaults_are_small():
    args = race.parse(["--quick"])
    assert (args.models, args.batches, args.size, args.slow_layer) == (["resnet18"], [1], 112, "layer3")
    assert [m for m in args.methods if race.BY_NAME[m].slow] == ["scorecam"]
    assert args.markdown is None


def test_race_full_defaults_cover_every_method():
    args = race.parse([])
    assert args.models == ["resnet18", "resnet50"] and args.batches == [1, 8] and args.size == 224
    assert set(args.methods) == set(camfn.METHODS) - {"guided_backprop", "guided_gradcam", "sobel"}  # sobel: no model
    assert args.slow_layer == "layer4" and args.slow_batches == [1]


@pytest.mark.parametrize(
    ("argv", "path"), [(["--markdown"], race.RESULTS), (["--quick", "--markdown"], race.RESULTS_QUICK)]
)
def test_race_markdown_default_paths(argv, path):
    assert race.parse(argv).markdown == path


def test_race_rejects_zero_repeats():
    with pytest.raises(SystemExit):
        race.parse(["--repeats", "0"])


def test_every_raced_method_exists_in_camfn_and_its_references():
    import pytorch_grad_cam
    import torchcam.methods

    for m in race.METHODS:
        assert m.name in camfn.METHODS
        assert m.gradcam is not None or m.torchcam is not None
        assert m.gradcam is None or hasattr(pytorch_grad_cam, m.gradcam), m.gradcam
        assert m.torchcam is None or hasattr(torchcam.methods, m.torchcam), m.torchcam


def fake(method: str, times: dict[str, list[float]], peaks: dict[str, float]) -> race.Result:
    contenders = {
        lib: race.Contender(lib, lambda: None, first=0.5, times=t, cpu=[2 * s for s in t], peaks=[peaks[lib]])
        for lib, t in times.items()
    }
    return race.Result("resnet18", 1, method, "layer4", contenders)


def test_race_report_speedup_is_faster_reference_over_camfn():
    results = [
        fake(
            "gradcam",
            {"camfn": [0.1, 0.3, 0.2], "grad-cam": [0.8], "torchcam": [0.4, 0.5, 0.3]},
            dict.fromkeys(("camfn", "grad-cam", "torchcam"), 7.0),
        ),
        fake("cam", {"camfn": [0.2], "torchcam": [0.1]}, {"camfn": 3.0, "torchcam": 4.0}),
    ]
    text = race.report(results, race.parse(["--quick"]))
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(lines) == 2
    assert "2.00x vs torchcam (mins 3.00x, CPU 2.00x)" in lines[0]  # 0.4 / 0.2, 0.3 / 0.1, 0.8 / 0.4
    assert "0.50x vs torchcam" in lines[1] and "| - |" in lines[1]  # no grad-cam time
    assert "### resnet18, batch 1, 112 px" in text


def test_race_end_to_end_tiny():
    text = race.race(["--models", "resnet18", "--methods", "gradcam", "--size", "64", "--repeats", "1"])
    row = next(line for line in text.splitlines() if line.startswith("| `gradcam`"))
    diff = float(row.rstrip(" |").rsplit("|", 1)[1])
    assert diff < 1e-4  # camfn and grad-cam agree on resnet18 in float32 (measured 3.6e-7)
    assert "vs torchcam" in row or "vs grad-cam" in row


def test_gradcam_detail_parser_still_reachable():
    args = speed.parse(["--quick"])
    assert (args.model, args.batch, args.size) == ("resnet18", 2, 112)


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 2.0])
def test_growth_recovers_power_law_exponent(exponent):
    values = [1, 2, 4, 8, 16]
    assert scaling.growth(values, [0.3 * v**exponent for v in values]) == pytest.approx(exponent, abs=1e-9)


def test_growth_of_one_point_is_nan():
    assert math.isnan(scaling.growth([3], [1.0]))


def test_scaling_grid_changes_one_axis_at_a_time():
    args = scaling.parse(["--quick"])
    base = scaling.Point("scorecam", 1, 1, "layer4", args.size)
    for axis, points in scaling.grid("scorecam", args).items():
        if axis == "width":  # another model: its layer and width differ from the base point
            assert {(p.layer, p.batch, p.targets, p.size) for p in points} == {("features", 1, 1, args.size)}
            continue
        assert base in points, axis
        for p in points:
            assert p.width == 0
            assert sum(getattr(p, f) != getattr(base, f) for f in ("batch", "targets", "layer", "size")) <= 1


def test_scaling_end_to_end_tiny():
    body = scaling.main(
        [
            *("--methods", "gradcam", "--batches", "1", "2", "--targets", "1", "2", "--layers", "layer3", "layer4"),
            *("--size", "64", "--sizes", "64", "80", "--widths", "8", "16", "--repeats", "1"),
        ]
    )
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| axis")]
    assert [r.split(" | ")[0] for r in rows] == ["| batch", "| targets", "| channels", "| width", "| size"]
    assert "256 (layer3), 512 (layer4)" in rows[2]


def test_scaling_doctests():
    import doctest

    assert doctest.testmod(scaling).failed == 0
