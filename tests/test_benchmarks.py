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

from benchmarks import gradcam_detail, legrad_depth, scaling, speed  # noqa: E402


def test_race_quick_defaults_are_small():
    args = speed.parse(["--quick"])
    assert (args.models, args.batches, args.size, args.slow_layer) == (["resnet18"], [1], 112, "layer3")
    assert [m for m in args.methods if speed.BY_NAME[m].slow] == ["scorecam"]
    assert args.markdown is None


def test_race_full_defaults_cover_every_method():
    args = speed.parse([])
    assert args.models == ["resnet18", "resnet50"] and args.batches == [1, 8] and args.size == 224
    raced = {"fullgrad", "shapleycam", "segeigencam", "kpcacam", "fem", "randomcam", "gradcam", "scorecam"}
    assert raced <= set(args.methods) == set(speed.REFERENCES) <= set(camfn.METHODS)
    assert args.slow_layer == "layer4" and args.slow_batches == [1]


@pytest.mark.parametrize(
    ("argv", "path"), [(["--markdown"], speed.RESULTS), (["--quick", "--markdown"], speed.RESULTS_QUICK)]
)
def test_race_markdown_default_paths(argv, path):
    assert speed.parse(argv).markdown == path


def test_race_rejects_zero_repeats():
    with pytest.raises(SystemExit):
        speed.parse(["--repeats", "0"])


def test_every_raced_method_exists_in_camfn_and_its_references():
    import pytorch_grad_cam
    import torchcam.methods

    for m in speed.METHODS:
        assert m.name in camfn.METHODS
        assert m.gradcam is not None or m.torchcam is not None
        assert m.gradcam is None or hasattr(pytorch_grad_cam, m.gradcam), m.gradcam
        assert m.torchcam is None or hasattr(torchcam.methods, m.torchcam), m.torchcam


def fake(method: str, times: dict[str, list[float]], peaks: dict[str, float]) -> speed.Result:
    contenders = {
        lib: speed.Contender(lib, lambda: None, first=0.5, times=t, cpu=[2 * s for s in t], peaks=[peaks[lib]])
        for lib, t in times.items()
    }
    return speed.Result("resnet18", 1, method, "layer4", contenders)


def test_race_report_speedup_is_faster_reference_over_camfn():
    results = [
        fake(
            "gradcam",
            {"camfn": [0.1, 0.3, 0.2], "grad-cam": [0.8], "torchcam": [0.4, 0.5, 0.3]},
            dict.fromkeys(("camfn", "grad-cam", "torchcam"), 7.0),
        ),
        fake("cam", {"camfn": [0.2], "torchcam": [0.1]}, {"camfn": 3.0, "torchcam": 4.0}),
    ]
    text = speed.report(results, speed.parse(["--quick"]))
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(lines) == 2
    assert "2.00x vs torchcam (mins 3.00x, CPU 2.00x)" in lines[0]  # 0.4 / 0.2, 0.3 / 0.1, 0.8 / 0.4
    assert "0.50x vs torchcam" in lines[1] and "| - |" in lines[1]  # no grad-cam time
    assert "### resnet18, batch 1, 112 px" in text


def test_race_end_to_end_tiny():
    text = speed.race(["--models", "resnet18", "--methods", "gradcam", "--size", "64", "--repeats", "1"])
    row = next(line for line in text.splitlines() if line.startswith("| `gradcam`"))
    diff = float(row.rstrip(" |").rsplit("|", 1)[1])
    assert diff < 1e-4  # camfn and grad-cam agree on resnet18 in float32 (measured 3.6e-7)
    assert "vs torchcam" in row or "vs grad-cam" in row


def test_race_wires_the_composite_methods_and_legrad():
    """FinerCAM (top-1), RefineCAM (three layers), SESS and FullGrad agree with grad-cam; LeGrad races torchcam
    on a tiny ViT of its own; FullGrad and ShapleyCAM run at the fast batches (resnet50 batch 8 is allowed)."""
    args = speed.parse(["--methods", "fullgrad", "shapleycam", "--models", "resnet50", "--batches", "8"])
    assert not any(speed.BY_NAME[m].slow for m in args.methods) and args.batches == [8]
    argv = ["--models", "resnet18", "--methods", "finercam", "refinecam", "sess", "fullgrad", "legrad"]
    text = speed.race([*argv, "--size", "64", "--repeats", "1", "--batches", "1", "--threads", "1"])
    rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
    for name in ("finercam", "refinecam", "sess", "fullgrad"):
        assert float(rows[name].rstrip(" |").rsplit("|", 1)[1]) < 1e-4, rows[name]  # measured <= 1.1e-6
    assert "layer2+layer3+layer4" in rows["refinecam"] and "num_scales=3" in rows["sess"]
    assert "vs torchcam" in rows["legrad"] and "### vit_tiny, batch 1, 64 px" in text


def test_gradcam_detail_parser_still_reachable():
    args = gradcam_detail.parse(["--quick"])
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


def test_legrad_depth_end_to_end_tiny():
    body = legrad_depth.main(["--depths", "1", "2", "--size", "32", "--quick"])
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| blocks")]
    assert [r.split(" | ")[0] for r in rows] == ["| 1", "| 2"]
    assert all(r.rstrip(" |").endswith("x") for r in rows)


def test_scaling_doctests():
    import doctest

    assert doctest.testmod(scaling).failed == 0


BENCHMARKS = sorted(p.stem for p in (pathlib.Path(ROOT) / "benchmarks").glob("*.py") if p.stem != "__init__")


def test_benchmark_modules_import_no_benchmark_module_but_common():
    import ast

    for name in BENCHMARKS:
        tree = ast.parse((pathlib.Path(ROOT) / "benchmarks" / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {
            n.module + ("" if n.module != "benchmarks" else "." + a.name)
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module
            for a in n.names
        }
        ours = {m for m in imported if m.split(".")[0] == "benchmarks"}
        allowed = {"benchmarks.common"} | ({"benchmarks.speed"} if name == "gpu" else set())  # the GPU race reuses it
        assert ours <= allowed, (name, ours)


def test_every_benchmark_module_imports_first_in_a_fresh_process():
    import subprocess

    code = (
        "import importlib, sys\n"
        f"for name in {BENCHMARKS!r}:\n"
        "    for m in [m for m in sys.modules if m == 'benchmarks' or m.startswith('benchmarks.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module('benchmarks.' + name)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert {"common", "overhead", "score_sizes", "speed", "gradcam_detail"} <= set(BENCHMARKS)


def test_race_methods_follow_camfn_registry_order():
    order = list(camfn.METHODS)
    names = [m.name for m in speed.METHODS]
    assert names == sorted(names, key=order.index)
    assert {m.name for m in speed.METHODS if m.slow} == {"ablationcam", "scorecam", "sscam", "iscam", "sess"}
    assert {m.name for m in speed.METHODS if m.torchcam_call == "forward"} >= {"cam", "scorecam"}


def test_speed_refers_the_gradcam_detail_to_its_script():
    with pytest.raises(SystemExit):
        speed.parse(["--gradcam-detail"])


def test_overhead_quick_report_has_every_row():
    from benchmarks import overhead

    text = overhead.main(["--quick"])
    lines = text.splitlines()
    cases = [f"{m}, batch 1, {s} px, layer {layer}" for m, s, layer in overhead.QUICK_CASES]
    goal_rows = [line for line in lines if line.startswith("| ") and any(line.startswith(f"| {c} |") for c in cases)]
    assert len(goal_rows) == len(cases)
    assert all(("met" in r or "MISSED" in r or "unclear" in r) for r in goal_rows)
    for case in cases:
        start = lines.index(f"### {case}")
        section = lines[start + 4 : start + 7]  # after the heading, a blank line, the head and the rule
        assert [r.split(" | ")[0] for r in section] == [
            f"| {overhead.FORWARD}",
            f"| {overhead.CAMFN}",
            f"| {overhead.TORCHCAM}",
        ]
        assert all(len(r.split(" | ")) == 7 for r in section)
    profiled = text[text.index("## Where camfn's per-call time goes") :]
    assert "`camfn/driver.py:" in profiled and "built-in method" in profiled
    assert "camfn.gradcam before" not in text  # no --before: no old camfn row


def test_common_doctests():
    import doctest

    from benchmarks import common

    assert doctest.testmod(common).failed == 0


def test_race_kind_splits_the_registry_without_a_hand_kept_list():
    fast, slow = speed.parse(["--kind", "fast"]).methods, speed.parse(["--kind", "slow"]).methods
    assert set(fast) | set(slow) == set(speed.parse([]).methods) and not set(fast) & set(slow)
    assert "gradcam" in fast and "scorecam" in slow and all(speed.BY_NAME[m].slow for m in slow)
