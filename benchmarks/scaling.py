"""How camfn's time grows with batch size, targets per image, channels and input size (gradcam, scorecam,
ablationcam).

Run from the repository root::

    python -m benchmarks.scaling --quick --markdown   # 64 px base, batches 1-4, sizes 64 and 112 (1-3 minutes)
    python -m benchmarks.scaling --markdown           # 112 px base, batches 1-8, sizes 64-224 (5-10 minutes)

camfn only, on one random-weight resnet18 (eval, float32). From a base point (batch 1, one class per image,
``layer4``, ``--size`` px) one axis at a time changes:

- batch: ``B`` images of one class each;
- targets: ``T`` classes per image, one ``(B, T)`` target tensor (maps ``(B, T, H, W)``);
- channels: the layer, ``layer1`` .. ``layer4`` with ``K`` = 64, 128, 256, 512 channels. The layers also
  differ in resolution and in how much network runs after them (what gradcam backpropagates through and
  ablationcam re-runs per channel), so this axis is "which layer", reported against ``K``;
- width: a small WideNet (see below) whose layer ``"features"`` has ``K`` = 32 .. 256 channels, at the same
  depth and resolution: channels alone;
- size: the input side in pixels (the work of every forward grows with the pixel count, size^2).

Each configuration is called once untimed (new shapes trace and propagate shapes once), then timed
``--repeats`` (gradcam) or ``--slow-repeats`` (scorecam, ablationcam) times; the median wall and process CPU
times are reported (with ``--threads 1`` the CPU time is robust to other processes on the machine). The growth
exponent per axis is the least-squares slope of log(time) against log(value): 1 means time grows in
proportion, 0 means flat, 2 (size axis) means in proportion to the pixel count. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torchvision
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import camfn
from benchmarks.common import cpu_model, fmt, loadavg, many_forwards, report_options, revision, table, write_report

RESULTS = os.path.join("benchmarks", "results", "scaling.md")
RESULTS_QUICK = os.path.join("benchmarks", "results", "scaling-quick.md")
METHODS = ("gradcam", "scorecam", "ablationcam")  # the default; --methods takes any of camfn.METHODS
LAYERS = ("layer1", "layer2", "layer3", "layer4")
AXES = ("batch", "targets", "channels", "width", "size")


@dataclass(frozen=True)
class Point:
    """One configuration: method, batch size, targets per image, layer and input side."""

    method: str
    batch: int
    targets: int
    layer: str
    size: int
    width: int = 0  # > 0: a WideNet of this width instead of the torchvision model


# ------------------------------------------------------------------------------------------ options
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling",
        description="How camfn's time grows with batch, targets, channels and input size.",
        epilog="Full run: an estimated 5-10 minutes on 2 idle cores (Score-CAM at batch 8 and at 224 px dominate: "
        "each point is called once untimed and twice timed); --quick: 1-3 minutes (measured 173 s with the load "
        "average at 8 on 2 cores, --threads 1).",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(camfn.METHODS),
        default=list(METHODS),
        help="[gradcam scorecam ablationcam]",
    )
    parser.add_argument("--model", default="resnet18", help="torchvision model with layer1..layer4 [resnet18]")
    parser.add_argument("--size", type=int, default=None, help="input side of the base point [112; --quick: 64]")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="[1 2 4 8; --quick: 1 2 4]")
    parser.add_argument("--targets", type=int, nargs="+", default=[1, 4, 16], help="classes per image [1 4 16]")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), help="layers of the channel axis [layer1..4]")
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[32, 64, 128, 256], help="WideNet widths [32 64 128 256]"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="input sides [64 112 224; --quick: 64 112]")
    parser.add_argument("--repeats", type=int, default=3, help="timed gradcam calls per point [3]")
    parser.add_argument(
        "--slow-repeats", type=int, default=None, help="timed calls of the perturbation methods [2; --quick: 1]"
    )
    parser.add_argument("--quick", action="store_true", help="smaller base point and grid (1-3 minutes)")
    report_options(parser, RESULTS, RESULTS_QUICK)
    args = parser.parse_args(argv)
    quick = {"size": 64, "batches": [1, 2, 4], "sizes": [64, 112], "slow_repeats": 1}
    full = {"size": 112, "batches": [1, 2, 4, 8], "sizes": [64, 112, 224], "slow_repeats": 2}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.markdown == "":
        args.markdown = RESULTS_QUICK if args.quick else RESULTS
    if min(args.repeats, args.slow_repeats, *args.batches, *args.targets, *args.sizes) < 1:
        parser.error("--repeats, --slow-repeats, --batches, --targets and --sizes must be at least 1")
    return args


# ------------------------------------------------------------------------------------------ models
class WideNet(nn.Module):
    """stem (3 -> 32, stride 2) -> ``features`` (32 -> ``width``) -> tail conv (``width`` -> 64) -> pool -> fc.

    Every width has the same depth and resolution: the ``width`` axis changes only ``K`` at ``"features"``
    (and with it the cost of the convolutions on either side).

    >>> WideNet(16)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 1000])
    """

    def __init__(self, width: int, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(32, width, 3, stride=2, padding=1), nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(width, 64, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.tail(self.features(self.stem(x)))), 1))


# ------------------------------------------------------------------------------------------ grid
def grid(method: str, args: argparse.Namespace) -> dict[str, list[Point]]:
    """The points of each axis: the base point with one field changed."""
    base = Point(method, 1, 1, "layer4", args.size)
    return {
        "batch": [replace(base, batch=b) for b in args.batches],
        "targets": [replace(base, targets=t) for t in args.targets],
        "channels": [replace(base, layer=name) for name in args.layers],
        "width": [replace(base, layer="features", width=k) for k in args.widths],
        "size": [replace(base, size=s) for s in args.sizes],
    }


def growth(values: Sequence[float], seconds: Sequence[float]) -> float:
    """Least-squares slope of log(seconds) against log(values): the exponent ``a`` of ``time ~ value^a``.

    >>> round(growth([1, 2, 4, 8], [3.0, 6.0, 12.0, 24.0]), 6)
    1.0
    >>> round(growth([64, 128], [1.0, 4.0]), 6)
    2.0
    >>> math.isnan(growth([4], [1.0]))
    True
    """
    if len(values) < 2:
        return math.nan
    xs = [math.log(v) for v in values]
    ys = [math.log(s) for s in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    if spread == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / spread


# ------------------------------------------------------------------------------------------ timing
class Bench:
    """The model, its params, a pool of inputs and classes; times points, caching repeated ones."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(args.seed)
        self.args = args
        self.model = torchvision.models.get_model(args.model, weights=None).eval()
        self.params = camfn.params(self.model)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.channels = {name: self._channels(name) for name in args.layers}
        self.wide = {k: WideNet(k).eval() for k in args.widths}
        self.wide_params = {k: camfn.params(m) for k, m in self.wide.items()}
        self.cache: dict[Point, tuple[float, float]] = {}  # point -> median (wall, CPU) seconds

    def _channels(self, layer: str) -> int:
        module = self.model.get_submodule(layer)
        convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        return convs[-1].out_channels

    def call(self, point: Point) -> Callable[[], object]:
        x = torch.randn(point.batch, 3, point.size, point.size, generator=self.gen)
        target = torch.randint(0, 1000, (point.batch, point.targets), generator=self.gen)
        if point.targets == 1:
            target = target[:, 0]
        model, params = (
            (self.wide[point.width], self.wide_params[point.width]) if point.width else (self.model, self.params)
        )
        return functools.partial(camfn.METHODS[point.method], model, params, x, point.layer, target)

    def time(self, point: Point) -> tuple[float, float]:
        """Median wall and process CPU seconds of ``point`` after one untimed call."""
        if point not in self.cache:
            fn = self.call(point)
            fn()
            repeats = self.args.slow_repeats if many_forwards(point.method) else self.args.repeats
            walls, cpus = [], []
            for _ in range(repeats):
                start, cpu = time.perf_counter(), time.process_time()
                fn()
                walls.append(time.perf_counter() - start)
                cpus.append(time.process_time() - cpu)
            self.cache[point] = statistics.median(walls), statistics.median(cpus)
            print(
                f"  {point.method:<12} B={point.batch:<2} T={point.targets:<2} {point.layer} {point.size:>3} px "
                f"{fmt(self.cache[point][0]):>8} (CPU {fmt(self.cache[point][1])})  load {os.getloadavg()[0]:.2f}",
                file=sys.stderr,
                flush=True,
            )
        return self.cache[point]

    def value(self, axis: str, point: Point) -> int:
        """The point's value on ``axis`` (channels: ``K`` of its layer)."""
        if axis == "channels":
            return self.channels[point.layer]
        return {"batch": point.batch, "targets": point.targets, "width": point.width, "size": point.size}[axis]


# ------------------------------------------------------------------------------------------ report
MEANING = {
    "batch": "1: proportional to the batch",
    "targets": "0: free; 1: one pass per target",
    "channels": "K of layer1..layer4 (the layers also differ in resolution and depth)",
    "width": "WideNet: K channels at fixed depth and resolution; its own cost grows ~K^2 (K x K convs)",
    "size": "2: proportional to the pixel count",
}


def axis_row(
    axis: str, values: Sequence[int], seconds: Sequence[float], cpu: Sequence[float], labels: Sequence[str] = ()
) -> list[str]:
    """One table row: axis, values, wall and CPU times, their growth exponents and what they mean.

    >>> axis_row("batch", [1, 2], [0.1, 0.2], [0.1, 0.4])
    ['batch', '1, 2', '100 ms, 200 ms', '100 ms, 400 ms', '1.00', '2.00', '1: proportional to the batch']
    """
    shown = ", ".join(f"{v} ({label})" for v, label in zip(values, labels, strict=True)) if labels else None
    return [
        axis,
        shown or ", ".join(map(str, values)),
        ", ".join(fmt(s) for s in seconds),
        ", ".join(fmt(s) for s in cpu),
        f"{growth(values, seconds):.2f}",
        f"{growth(values, cpu):.2f}",
        MEANING[axis],
    ]


HEAD = ["axis", "values", "median wall time", "median CPU time", "exponent (wall)", "exponent (CPU)", "reading"]


def report(rows: dict[str, list[list[str]]], args: argparse.Namespace) -> str:
    out = []
    for method, method_rows in rows.items():
        out += [
            f"### `camfn.{method}`, {args.model}, base point: batch 1, 1 target, layer4, {args.size} px",
            "",
            table(method_rows, HEAD, True),
            "",
        ]
    out.append(
        "exponent: least-squares slope of log(time) against log(value) over the row's points. CPU time is the "
        "process's (all threads): with --threads 1 it is robust to other processes on the machine, wall time is "
        "not. Each point: "
        f"one untimed call, then the median of {args.repeats} (gradcam) / {args.slow_repeats} (scorecam, "
        "ablationcam) timed calls."
    )
    return "\n".join(out)


def header(args: argparse.Namespace, argv: list[str]) -> list[str]:
    return [
        "command: `python -m benchmarks.scaling" + (" " + shlex.join(argv) if argv else "") + "`",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, camfn {camfn.__version__}, "
        f"python {platform.python_version()}, camfn at {revision()}",
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), torch threads: {torch.get_num_threads()}, "
        f"load average at start: {loadavg()}",
    ]


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lines = ["- " + line for line in header(args, argv)]
    print("\n".join(lines), flush=True)
    bench = Bench(args)
    rows: dict[str, list[list[str]]] = {}
    for method in args.methods:
        rows[method] = []
        for axis, points in grid(method, args).items():
            walls, cpus = zip(*(bench.time(p) for p in points), strict=True)
            values = [bench.value(axis, p) for p in points]
            labels = [p.layer for p in points] if axis == "channels" else []
            rows[method].append(axis_row(axis, values, walls, cpus, labels))
    body = report(rows, args)
    end = f"- load average at end: {loadavg()}; total wall time {time.perf_counter() - start:.0f} s"
    print("\n" + body + "\n\n" + end)
    if args.markdown is not None:
        write_report(args.markdown, "Scaling: how camfn's time grows", "\n".join([*lines, "", body, "", end]))
    return body


if __name__ == "__main__":
    main()
