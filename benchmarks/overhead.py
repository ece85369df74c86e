"""Per-call overhead of ``camfn.gradcam`` at batch 1: against a no_grad forward, torchcam and an older camfn.

Run from the repository root::

    python -m benchmarks.overhead --before 0dce887 --markdown   # writes benchmarks/results/overhead.md (~3 min)
    python -m benchmarks.overhead --quick                       # 3 calls at 48 px: a smoke run (seconds)

What is timed, all in one process, with ``--threads`` (2) torch threads, on random-weight torchvision models
(eval, float32, CPU) at batch 1 with one class per image: resnet18 at 64, 112 and 224 px (layer ``layer4``)
and mobilenet_v3_small at 64 px (layer ``features``):

- ``torch.no_grad()`` forward of the model: the floor;
- ``camfn.gradcam(model, params, x, layer, classes)`` with default options (maps resized to the input);
- ``--before REV``: the same call on camfn as it was at git revision REV, extracted with ``git archive`` into
  a temporary folder and imported under another package name, so old and new are timed in the same run;
- torchcam ``GradCAM(model, layer)``: a forward with gradients, then ``extractor(class_idx, scores)``
  (layer-resolution maps, not resized).

Each contender has its own ``copy.deepcopy`` of the model (same weights). After ``--warmup`` untimed calls
each (camfn traces on the first), ``--calls`` rounds run every contender once, in an order rotated each round
(interleaved: drifting load hits all alike). Reported per contender: the minimum and median wall time, the
time over the forward (min - min, and the median over rounds of the difference to the same round's forward),
the ratio to the forward and torchcam's time over this one. Then one ``cProfile`` of ``--profile-calls``
warm camfn calls at the first size: camfn's functions by cumulative time per call (where the remaining
per-call time goes) and the top functions of all code by own time. Nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import copy
import cProfile
import importlib.util
import io
import pstats
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torchvision

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import camfn
from benchmarks.common import (
    ROOT,
    Share,
    Timings,
    environment,
    loadavg,
    maxdiff,
    publish,
    report_options,
    torch_threads,
)

RESULTS = os.path.join("benchmarks", "results", "overhead.md")
RESULTS_QUICK = os.path.join("benchmarks", "results", "overhead-quick.md")
CASES = (("resnet18", 64, "layer4"), ("resnet18", 112, "layer4"), ("resnet18", 224, "layer4"))
CASES += (("mobilenet_v3_small", 64, "features"),)
QUICK_CASES = (("resnet18", 48, "layer4"), ("mobilenet_v3_small", 48, "features"))  # 2 x 2 at the layer
GOAL_MS = 2.0  # camfn's time over the forward, per call, at most
FORWARD, CAMFN, TORCHCAM = "torch.no_grad() forward", "camfn.gradcam", "torchcam GradCAM"


# ------------------------------------------------------------------------------------------ options
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=None, help="timed rounds, each contender once [25; --quick: 3]")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per contender first [3; --quick: 1]")
    parser.add_argument("--before", default=None, metavar="REV", help="also time camfn at git revision REV")
    parser.add_argument(
        "--profile-calls", type=int, default=None, help="warm camfn calls under cProfile (0: none) [200; --quick: 3]"
    )
    parser.add_argument("--quick", action="store_true", help="resnet18 and mobilenet_v3_small at 48 px, 3 calls")
    report_options(parser, RESULTS, RESULTS_QUICK)
    args = parser.parse_args(argv)
    quick = {"calls": 3, "warmup": 1, "profile_calls": 3}
    full = {"calls": 25, "warmup": 3, "profile_calls": 200}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = 2
    if args.markdown == "":
        args.markdown = RESULTS_QUICK if args.quick else RESULTS
    if min(args.calls, args.warmup, args.threads) < 1 or args.profile_calls < 0:
        parser.error("--calls, --warmup and --threads must be at least 1, --profile-calls at least 0")
    args.cases = QUICK_CASES if args.quick else CASES
    return args


# ------------------------------------------------------------------------------------------ camfn before
def load_revision(rev: str) -> ModuleType:
    """camfn as it was at git revision ``rev``, imported as the package ``camfn_<rev>`` (its imports are relative)."""
    folder = tempfile.mkdtemp(prefix=f"camfn-{rev}-")
    archive = subprocess.run(["git", "archive", rev, "camfn"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    name = "camfn_" + re.sub(r"\W", "_", rev)
    package = os.path.join(folder, "camfn")
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(package, "__init__.py"), submodule_search_locations=[package]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import camfn from revision {rev} ({package})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ contenders
@dataclass
class Contender(Timings):
    """One library's call on one case, and its wall and CPU seconds per timed call."""

    name: str
    fn: Callable[[], Any]
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


@dataclass
class Case:
    model: str
    size: int
    layer: str
    contenders: list[Contender]
    agreement: str = ""

    @property
    def title(self) -> str:
        return f"{self.model}, batch 1, {self.size} px, layer {self.layer}"

    def get(self, name: str) -> Contender:
        return next(c for c in self.contenders if c.name == name)


def build(model_name: str, size: int, layer: str, seed: int, before: ModuleType | None):
    """The case's contenders (own deepcopy of one model each) and a function removing torchcam's hooks."""
    from torchcam.methods import GradCAM

    torch.manual_seed(seed)
    base = torchvision.models.get_model(model_name, weights=None).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, size, size, generator=gen)
    with torch.no_grad():
        num_classes = base(x).shape[1]
    classes = torch.randint(0, num_classes, (1,), generator=gen)
    listed = classes.tolist()

    def forward() -> Any:
        with torch.no_grad():
            return base(x)

    def library(package: ModuleType) -> Callable[[], Any]:
        model = copy.deepcopy(base)
        params = package.params(model)
        return lambda: package.gradcam(model, params, x, layer, classes)

    m_tc = copy.deepcopy(base)
    extractor = GradCAM(m_tc, layer)

    def torchcam() -> Any:
        with torch.enable_grad():
            return extractor(class_idx=listed, scores=m_tc(x))[0]

    contenders = [Contender(FORWARD, forward), Contender(CAMFN, library(camfn))]
    if before is not None:
        contenders.append(
            Contender(f"camfn.gradcam before ({before.__name__.removeprefix('camfn_')})", library(before))
        )
    contenders.append(Contender(TORCHCAM, torchcam))
    return Case(model_name, size, layer, contenders), extractor.remove_hooks


def measure(case: Case, args: argparse.Namespace) -> None:
    """Warm-up calls, then ``--calls`` interleaved rounds (the order rotates by one each round)."""
    for c in case.contenders:
        for _ in range(args.warmup):
            c.fn()
    n = len(case.contenders)
    for r in range(args.calls):
        for c in case.contenders[r % n :] + case.contenders[: r % n]:
            start, cpu = time.perf_counter(), time.process_time()
            c.fn()
            c.times.append(time.perf_counter() - start)
            c.cpu.append(time.process_time() - cpu)
    if len(case.contenders) > 3:  # the same maps from old and new camfn?
        ours, old = case.contenders[1].fn(), case.contenders[2].fn()
        case.agreement = f"camfn now vs before: max |diff| of the maps {maxdiff(ours, old):.1e}"


# ------------------------------------------------------------------------------------------ report
def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def over_forward(c: Contender, forward: Contender) -> float:
    """Median over rounds of this call's time minus the same round's forward."""
    return statistics.median(a - b for a, b in zip(c.times, forward.times, strict=True))


def case_table(case: Case) -> list[str]:
    forward, torchcam = case.get(FORWARD), case.get(TORCHCAM)
    rows = []
    for c in case.contenders:
        rows.append(
            "| "
            + " | ".join(
                [
                    c.name,
                    ms(c.best),
                    ms(c.median),
                    "-" if c is forward else ms(c.best - forward.best),
                    "-" if c is forward else ms(over_forward(c, forward)),
                    f"{c.best / forward.best:.2f}x",
                    "-" if c in (forward, torchcam) else f"{torchcam.best / c.best:.2f}x",
                ]
            )
            + " |"
        )
    head = (
        "| contender | min ms | median ms | over forward, ms (min - min) | over forward, ms (median of rounds) "
        "| / forward (mins) | torchcam / this (mins) |"
    )
    return [f"### {case.title}", "", head, "|---|---|---|---|---|---|---|", *rows, ""]


def verdict(ok: list[bool]) -> str:
    return "met" if all(ok) else "MISSED" if not any(ok) else "unclear (noisy)"


def goals(cases: list[Case]) -> list[str]:
    """Per case: camfn's overhead against :data:`GOAL_MS` and its speed against torchcam (of mins and medians)."""
    rows = []
    for case in cases:
        forward, ours, torchcam = case.get(FORWARD), case.get(CAMFN), case.get(TORCHCAM)
        over = [ours.best - forward.best, over_forward(ours, forward)]
        speed = [torchcam.best / ours.best, torchcam.median / ours.median]
        before = [c for c in case.contenders if c.name.startswith("camfn.gradcam before")]
        change = "-"
        if before:
            old = before[0].best - forward.best
            change = f"{ms(old)} -> {ms(over[0])} ms ({over[0] / old:.2f}x)" if old > 0 else f"{ms(old)} ms before"
        rows.append(
            f"| {case.title} | {ms(over[0])} / {ms(over[1])} | {verdict([o <= GOAL_MS / 1e3 for o in over])} "
            f"| {speed[0]:.2f}x / {speed[1]:.2f}x | {verdict([s >= 1 for s in speed])} | {change} |"
        )
    return [
        f"| case | camfn over forward, ms (min / median of rounds) | <= {GOAL_MS:g} ms | torchcam / camfn "
        "(mins / medians) | camfn not slower | camfn over forward before -> now (mins) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


# ------------------------------------------------------------------------------------------ profile
def profile(args: argparse.Namespace, rows: int = 20) -> list[str]:
    """cProfile of ``--profile-calls`` warm camfn.gradcam calls on the first case: camfn's functions by
    cumulative time per call, then all functions by own time per call."""
    model_name, size, layer = args.cases[0]
    case, release = build(model_name, size, layer, args.seed, None)
    call, n = case.get(CAMFN).fn, args.profile_calls
    try:
        for _ in range(args.warmup):
            call()
        start = time.perf_counter()
        for _ in range(n):
            call()
        plain = (time.perf_counter() - start) / n
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            call()
        prof.disable()
    finally:
        release()
    stats = pstats.Stats(prof, stream=io.StringIO()).stats  # type: ignore[attr-defined]
    package = os.path.dirname(os.path.abspath(camfn.__file__)) + os.sep
    total = max(ct for (_, _, _, ct, _) in stats.values())

    def name(key: tuple[str, int, str]) -> str:
        file, line, func = key
        if file.startswith(package):
            return f"`camfn/{os.path.relpath(file, package)}:{line}({func})`"
        if file == "~":
            return f"`{func}`"
        short = file.split("site-packages" + os.sep)[-1].split("lib" + os.sep)[-1]
        return f"`{short}:{line}({func})`"

    def line(key: tuple[str, int, str]) -> str:
        _, nc, tt, ct, _ = stats[key]
        return f"| {name(key)} | {nc / n:g} | {ms(ct / n)} | {ms(tt / n)} |"

    ours = sorted((k for k in stats if k[0].startswith(package)), key=lambda k: -stats[k][3])[:rows]
    everything = sorted(stats, key=lambda k: -stats[k][2])[: rows // 2]
    head = ["| function | calls per call | cumulative ms per call | own ms per call |", "|---|---|---|---|"]
    return [
        f"## Where camfn's per-call time goes ({model_name}, {size} px, {n} warm calls under cProfile)",
        "",
        f"Per call: {ms(plain)} ms without the profiler, {ms(total / n)} ms under it (cProfile adds a fixed cost per "
        "Python call, so Python-heavy code looks heavier than it is; read the order, not the absolute numbers).",
        "",
        "camfn's functions by cumulative time:",
        "",
        *head,
        *map(line, ours),
        "",
        "All functions by own time (torch kernels appear as built-in methods):",
        "",
        *head,
        *map(line, everything),
        "",
    ]


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; print (and with ``--markdown``, write) the report; return it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    with torch_threads(args.threads):
        return run(args, argv)


def run(args: argparse.Namespace, argv: list[str]) -> str:
    start = time.perf_counter()
    before = load_revision(args.before) if args.before else None
    lines = [
        "- command: `python -m benchmarks.overhead" + (" " + shlex.join(argv) if argv else "") + "`",
        *("- " + line for line in environment()),
        f"- batch 1, one class per image, random weights, eval, float32, CPU; {args.warmup} untimed calls per "
        f"contender, then {args.calls} interleaved rounds"
        + (f"; camfn before: git revision {args.before}, imported as {before.__name__}" if before else ""),
    ]
    print("\n".join(lines), flush=True)
    share = Share()
    cases = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the references' deprecation chatter
        for model_name, size, layer in args.cases:
            case, release = build(model_name, size, layer, args.seed, before)
            try:
                measure(case, args)
            finally:
                release()
            cases.append(case)
            print(f"  {case.title}: done, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        busy = share.used()
        body = ["", "## Goals", "", *goals(cases), ""]
        for case in cases:
            body += case_table(case)
        body += [f"- {case.title}: {case.agreement}" for case in cases if case.agreement]
        body.append(
            f"- load average after timing: {loadavg()}; this process used {busy:.0%} of {args.threads} thread(s) x "
            "wall time while timing (other processes only add time: the mins are the least biased)"
        )
        body.append("")
        if args.profile_calls:
            body += profile(args)
    body.append(f"- load average at end: {loadavg()}; total wall time {time.perf_counter() - start:.0f} s")
    return publish(lines, body, args.markdown, "Per-call overhead of camfn.gradcam at batch 1")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
