"""Speed and peak memory of camfn's perturbation methods (Ablation-CAM, Score-CAM) against grad-cam and torchcam.

Run from the repository root::

    python -m benchmarks.perturbation              # 224 px, batch 1 and 4 (15-20 minutes on 2 idle cores)
    python -m benchmarks.perturbation --quick      # batch 1 only, fewer repeats (2-3 minutes on 2 idle cores)
    python -m benchmarks.perturbation --markdown   # tables as markdown, for the README
    python -m benchmarks.perturbation --profile    # also: where camfn.scorecam's time goes

What is measured, all in one process, on one random-weight torchvision model (resnet18, eval, float32) at
``--layer`` (``layer4``), for each batch size:

1. Ablation-CAM: ``camfn.ablationcam(model, params, x, layer, target)`` (defaults, ``ablation="zero"`` and
   the ``chunk_size`` printed below, read from its signature) against grad-cam ``AblationCAM(model,
   [model.layer4[-1]])`` (defaults: ``batch_size=32``, ``ratio_channels_to_ablate=1.0``). camfn runs the
   network up to the layer once and only the rest of it per ablated channel; grad-cam re-runs the whole
   network per channel.
2. Score-CAM: ``camfn.scorecam`` (its default ``chunk_size``, read from the signature: the masked copies
   per forward, as ``chunk_size // B`` channels x ``B`` images; also the other two of 16, 32 and 64) against
   grad-cam ``ScoreCAM`` (no constructor option; 16 masked images per forward) and torchcam
   ``ScoreCAM(model, layer)`` (default ``batch_size=32`` masked images per forward). torchcam builds its
   masks the other way round (min-max at layer resolution, then upsampling), so its maps differ from
   grad-cam's and camfn's; camfn is compared with it at layer resolution (``size=None``: the first, untimed
   camfn call), with grad-cam at input resolution.
3. Two floors: plain ``torch.no_grad()`` forwards of the same masked inputs of the non-constant channels,
   as many images per forward as camfn's default, masks built per chunk; once on a channels-last copy of
   the model and inputs (the fastest plain eager layout on CPU), once in the default NCHW layout the
   references use. What any Score-CAM must spend in eager mode.

Every library gets its own ``copy.deepcopy`` of the model (same weights): the references register hooks,
and camfn refuses hooked models by default. Each camfn case with default options is called once untimed
first (that call traces the model; its time is reported as "first call"; the chunk_size variants reuse the
trace), then timed ``--repeats`` (Ablation-CAM) or ``--score-repeats`` (Score-CAM; half as many, at least
one, for the other chunk sizes and the NCHW floor) times, in rounds with the floors, split before and after
the references so that drifting load hits both. The median and min are reported. The references take
minutes per call at 224 px: each runs exactly once, with no warm-up call. All cases run in sequence in one
process: models, inputs and extractors are built before the first case.

Peak memory: the CPU allocations of torch are invisible to ``tracemalloc``, so before each call the script
collects garbage, returns free heap memory to the system (``malloc_trim``), reads the resident set size and
resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``); after the call it reads
``VmHWM`` from ``/proc/self/status``. Reported: peak minus the RSS before the call, in MiB (for camfn the
largest over its timed calls). Where ``clear_refs`` is not writable, each case runs again in a subprocess
that reports ``ru_maxrss`` (slow: the references run twice; where the case stays below the peak the process
reached while importing and building, only that bound is known and shown as ``<= N``). Nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # grad-cam's progress bars; read when tqdm is first imported

import argparse
import contextlib
import copy
import cProfile
import functools
import inspect
import io
import json
import pstats
import resource
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import Tensor

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import camfn
from benchmarks.common import (
    BUSY,
    ROOT,
    Case,
    Meter,
    Share,
    can_reset_peak,
    environment,
    fmt,
    last_module,
    loadavg,
    maxdiff,
    mib,
    settle,
    status,
    table,
)
from camfn.methods.perturbation import masks_upsample_first

TARGET_ABLATION = 50.0  # grad-cam AblationCAM time / camfn.ablationcam time, at least
TARGET_SCORE = 1.5  # time of the faster Score-CAM reference / camfn.scorecam time, at least
ABLATION_CHUNK = inspect.signature(camfn.ablationcam).parameters["chunk_size"].default
SCORE_CHUNK = inspect.signature(camfn.scorecam).parameters["chunk_size"].default
CHUNKS = (SCORE_CHUNK, *(c for c in (16, 32, 64) if c != SCORE_CHUNK))[:3]  # camfn.scorecam's; default first


# ------------------------------------------------------------------------------------------ options
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perturbation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="torchvision model name [resnet18]")
    parser.add_argument("--layer", default="layer4", help="layer (module path) to explain [layer4]")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels [224]")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes [1 4; --quick: 1]")
    parser.add_argument("--repeats", type=int, default=None, help="timed camfn.ablationcam calls [5; --quick: 3]")
    parser.add_argument(
        "--score-repeats",
        type=int,
        default=None,
        help="timed camfn.scorecam calls with the default chunk_size (half as many, at least 1, for the other "
        "chunk sizes and the NCHW floor) [2; --quick: 1]",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=("ablation", "score"), default=["ablation", "score"], help="[both]"
    )
    parser.add_argument("--quick", action="store_true", help="batch 1 only, one timed call per camfn.scorecam case")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--profile", action="store_true", help="profile one camfn.scorecam call after timing")
    parser.add_argument(
        "--memory",
        choices=("auto", "clear_refs", "subprocess", "off"),
        default="auto",
        help="peak-memory method: clear_refs in this process, else a subprocess per case (auto) [auto]",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads [torch's default]")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, input and targets [0]")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one case, for ru_maxrss
    args = parser.parse_args(argv)
    quick = {"size": 224, "batches": [1], "repeats": 3, "score_repeats": 1}
    full = {"size": 224, "batches": [1, 4], "repeats": 5, "score_repeats": 2}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.repeats, args.score_repeats, *args.batches) < 1:
        parser.error("--repeats, --score-repeats and --batches must be at least 1")
    args.device = "cpu"
    return args


def header(args: argparse.Namespace, argv: list[str]) -> list[str]:
    return [
        "command: python -m benchmarks.perturbation" + (" " + shlex.join(argv) if argv else ""),
        *environment(),
        f"model {args.model} (random weights, eval), layer {args.layer!r}, {args.size}x{args.size} px, float32, "
        f"batches {', '.join(map(str, args.batches))}; camfn: one untimed first call, then median of "
        f"{args.repeats} (ablationcam) / {args.score_repeats} (scorecam; "
        f"{max(1, args.score_repeats // 2)} for chunk_size {' and '.join(map(str, CHUNKS[1:]))}) timed calls; "
        "references: 1 call each",
    ]


# ------------------------------------------------------------------------------------------ cases
@dataclass
class Run(Case):
    """One timed thing of ``group`` (e.g. "scorecam, batch 4"), with its peak memory and its outputs."""

    key: str = ""  # unique, for --worker
    library: str = "camfn"
    repeats: int = 1  # timed calls (references: 1, and no warm-up call)
    first_fn: Callable[[], object] | None = None  # the untimed first call, if not fn
    peaks: list[float] = field(default_factory=list)  # MiB above the RSS before each timed call
    first_output: Any = None
    output: Any = None
    load: float | None = None  # 1-minute load average after the last call
    bound: bool = False  # the peak is only an upper bound (subprocess fallback)

    @property
    def peak(self) -> float | None:
        return max(self.peaks) if self.peaks else None


@dataclass
class Bench:
    runs: list[Run]
    probe: Callable[[int], dict[str, Any]]  # batch -> facts (dead channels), from an extra model copy
    state: dict[str, Any]


def build(args: argparse.Namespace) -> Bench:
    """Models (one deepcopy per library and extractor), inputs, targets and the cases, in run order."""
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchcam.methods import ScoreCAM as TCScoreCAM

    torch.manual_seed(args.seed)
    base = torchvision.models.get_model(args.model, weights=None).eval()
    gen = torch.Generator().manual_seed(args.seed)
    biggest = max(args.batches)
    x_all = torch.randn(biggest, 3, args.size, args.size, generator=gen)
    with torch.no_grad():
        num_classes = base(x_all[:1]).shape[1]
    c_all = torch.randint(0, num_classes, (biggest,), generator=gen)
    inputs = {b: (x_all[:b].clone(), c_all[:b].clone()) for b in args.batches}  # batch b: the first b images

    m_camfn, m_gc_abl, m_gc_score, m_tc, m_probe = (copy.deepcopy(base) for _ in range(5))
    p = camfn.params(m_camfn)
    gc_abl = AblationCAM(m_gc_abl, [last_module(m_gc_abl, args.layer)])
    gc_score = ScoreCAM(m_gc_score, [last_module(m_gc_score, args.layer)])
    tc_score = TCScoreCAM(m_tc, args.layer)
    defaults = (
        f"grad-cam AblationCAM batch_size={gc_abl.batch_size}, ratio_channels_to_ablate="
        f"{gc_abl.ratio_channels_to_ablate}; grad-cam ScoreCAM batch_size={getattr(gc_score, 'batch_size', 16)} "
        f"(hard-coded fallback); torchcam ScoreCAM batch_size={tc_score.bs}"
    )

    acts: dict[str, Tensor] = {}
    m_probe.get_submodule(args.layer).register_forward_hook(lambda _m, _i, out: acts.__setitem__("a", out))

    def activation(x: Tensor) -> Tensor:
        with torch.no_grad():
            m_probe(x)
        return acts.pop("a")

    def probe(batch: int) -> dict[str, Any]:
        a = activation(inputs[batch][0])
        dead = (a.flatten(2).amax(-1) - a.flatten(2).amin(-1)).eq(0)  # (B, K): constant (ReLU: all-zero) channels
        return {"channels": a.shape[1], "dead_all": int(dead.all(0).sum()), "dead_each": dead.sum(1).tolist()}

    m_floor = copy.deepcopy(base).to(memory_format=torch.channels_last)

    def floor(x: Tensor, c: Tensor, fast: bool, images: int = CHUNKS[0]) -> Tensor:
        """Plain no_grad forwards of the masked inputs of the non-constant channels, about ``images`` per
        forward (``images // B`` channels x ``B``), masks built per chunk; channels-last if ``fast``."""
        model = m_floor if fast else base
        with torch.no_grad():
            a = activation(x)
            live = (a.flatten(2).amax(-1) - a.flatten(2).amin(-1)).ne(0).any(0).nonzero().flatten()
            per, out = max(1, images // x.shape[0]), []
            for start in range(0, live.numel(), per):
                m = masks_upsample_first(a.index_select(1, live[start : start + per]), x.shape[2:])  # (B, c, H, W)
                batch = (x.unsqueeze(1) * m.unsqueeze(2)).flatten(0, 1)  # (B * c, C, H, W), sample-major
                if fast:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                scores = model(batch).unflatten(0, (x.shape[0], -1))
                out.append(scores.gather(2, c.view(-1, 1, 1).expand(-1, m.shape[1], 1)))
            return torch.cat(out, 1)

    def gc_targets(c: Tensor) -> list:
        return [ClassifierOutputTarget(int(i)) for i in c]

    def tc_call(x: Tensor, c: Tensor) -> Tensor:
        with torch.no_grad():
            m_tc(x)
        return tc_score(class_idx=c.tolist())[0]

    runs: list[Run] = []
    for b in args.batches:
        x, c = inputs[b]
        group = f"ablationcam, batch {b}"
        if "ablation" in args.methods:
            runs += [
                Run(
                    "camfn.ablationcam",
                    group,
                    functools.partial(camfn.ablationcam, m_camfn, p, x, args.layer, c),
                    f"chunk_size={ABLATION_CHUNK} (default)",
                    key=f"ablation-{b}-camfn",
                    repeats=args.repeats,
                ),
                Run(
                    "grad-cam AblationCAM",
                    group,
                    functools.partial(gc_abl, input_tensor=x, targets=gc_targets(c)),
                    f"batch_size={gc_abl.batch_size} (default), 1 call",
                    key=f"ablation-{b}-gradcam",
                    library="grad-cam",
                ),
            ]
        group = f"scorecam, batch {b}"
        if "score" in args.methods:
            for chunk in CHUNKS:
                default = chunk == CHUNKS[0]
                runs.append(
                    Run(
                        "camfn.scorecam",
                        group,
                        functools.partial(camfn.scorecam, m_camfn, p, x, args.layer, c, chunk_size=chunk),
                        f"chunk_size={chunk}" + (" (default)" if default else ""),
                        warm=default,  # the chunk variants share the default's trace
                        key=f"score-{b}-camfn-{chunk}",
                        repeats=args.score_repeats if default else max(1, args.score_repeats // 2),
                        first_fn=functools.partial(camfn.scorecam, m_camfn, p, x, args.layer, c, size=None)
                        if default
                        else None,
                    )
                )
            runs += [
                Run(
                    "floor: no_grad forwards, channels-last",
                    group,
                    functools.partial(floor, x, c, True),
                    f"masked inputs, ~{CHUNKS[0]} images per forward",
                    warm=False,
                    key=f"score-{b}-floor",
                    library="floor",
                    repeats=args.score_repeats,
                ),
                Run(
                    "floor: no_grad forwards, NCHW",
                    group,
                    functools.partial(floor, x, c, False),
                    f"masked inputs, ~{CHUNKS[0]} images per forward",
                    warm=False,
                    key=f"score-{b}-floor-nchw",
                    library="floor",
                    repeats=max(1, args.score_repeats // 2),
                ),
                Run(
                    "grad-cam ScoreCAM",
                    group,
                    functools.partial(gc_score, input_tensor=x, targets=gc_targets(c)),
                    f"batch_size={getattr(gc_score, 'batch_size', 16)} (default), 1 call",
                    key=f"score-{b}-gradcam",
                    library="grad-cam",
                ),
                Run(
                    "torchcam ScoreCAM",
                    group,
                    functools.partial(tc_call, x, c),
                    f"batch_size={tc_score.bs} (default), layer resolution, 1 call",
                    key=f"score-{b}-torchcam",
                    library="torchcam",
                ),
            ]
    for r in runs:
        if r.library != "camfn":
            r.warm = False
    state = {"defaults": defaults, "inputs": inputs, "model": m_camfn, "params": p, "base": base}
    return Bench(runs, probe, state)


# ------------------------------------------------------------------------------------------ running
def schedule(runs: list[Run]) -> list[tuple[Run, bool]]:
    """``(run, is_first_call)`` in order: per group, camfn first calls, the first half of the timed calls of
    camfn and the floor (round-robin), the references, then the second half."""
    order: list[tuple[Run, bool]] = []
    for group in dict.fromkeys(r.group for r in runs):
        members = [r for r in runs if r.group == group]
        ours = [r for r in members if r.library in ("camfn", "floor")]
        others = [r for r in members if r not in ours]
        order += [(r, True) for r in ours if r.warm]
        most = max((r.repeats for r in ours), default=0)
        rounds = [[r for r in ours if i < r.repeats] for i in range(most)]
        half = (most + 1) // 2
        for rnd in rounds[:half]:
            order += [(r, False) for r in rnd]
        order += [(r, False) for r in others]
        for rnd in rounds[half:]:
            order += [(r, False) for r in rnd]
    return order


def execute(bench: Bench, meter: Meter, start: float) -> float:
    """Run every case; the share of (threads x wall time) this process used."""
    share = Share()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the references' deprecation chatter
        for run, first in schedule(bench.runs):
            if first:
                run.first, _, run.first_output, _ = meter(run.first_fn or run.fn)
                seconds, label = run.first, "first call"
            else:
                seconds, cpu_seconds, run.output, peak = meter(run.fn)
                run.times.append(seconds)
                run.cpu.append(cpu_seconds)
                if peak is not None:
                    run.peaks.append(peak)
                label = f"call {len(run.times)}/{run.repeats}"
            run.load = os.getloadavg()[0]
            print(
                f"  {run.group:<20} {run.name:<40} {run.note[:24]:<24} {label:<11} {fmt(seconds):>8}  "
                f"load {run.load:.2f}  [{time.perf_counter() - start:.0f} s]",
                file=sys.stderr,
                flush=True,
            )
    return share.used()


def worker(args: argparse.Namespace) -> None:
    """Run one case in this fresh process; print the RSS before it, the peak before it (``VmHWM``, if
    readable) and ``ru_maxrss`` after it, in KiB, as JSON."""
    bench = build(args)
    run = next(r for r in bench.runs if r.key == args.worker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = settle()
        try:
            high = status("VmHWM")
        except OSError:
            high = None
        run.fn()  # for camfn this first call also traces: an upper bound of a warm call
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before": before, "high": high, "peak": peak}))


def subprocess_peaks(bench: Bench, argv: list[str]) -> None:
    """Fallback without ``clear_refs``: one fresh process per case, ``ru_maxrss`` minus the RSS before the
    case. When the case does not raise the process's earlier peak (imports, building), only a bound is known."""
    for run in bench.runs:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.perturbation", *argv, "--worker", run.key],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        facts = json.loads(done.stdout.strip().splitlines()[-1])
        run.peaks = [mib(facts["peak"] - facts["before"])]
        run.bound = facts["high"] is None or facts["peak"] <= facts["high"]
        print(f"  peak memory (subprocess) {run.key}: {memo(run.peak, run.bound)} MiB", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ report
def memo(peak: float | None, bound: bool = False) -> str:
    return "-" if peak is None else ("<= " if bound else "") + f"{peak:.0f}"


def verdict(ratios: list[float], limit: float) -> str:
    """All speed-ups at least ``limit``: met; none: MISSED."""
    if all(r >= limit for r in ratios):
        return "met"
    if all(r < limit for r in ratios):
        return "MISSED"
    return "unclear (noisy)"


def report(bench: Bench, args: argparse.Namespace, busy: float | None, facts: dict[int, dict[str, Any]]) -> str:
    out: list[str] = []
    groups = list(dict.fromkeys(r.group for r in bench.runs))
    for method, title in (("ablationcam", "Ablation-CAM"), ("scorecam", "Score-CAM")):
        mine = [g for g in groups if g.startswith(method)]
        if not mine:
            continue
        rows, checks, maps = [], [], []
        for group in mine:
            members = [r for r in bench.runs if r.group == group]
            ours = members[0]  # camfn, default options
            refs = [r for r in members if r.library in ("grad-cam", "torchcam")]
            for r in members:
                rows.append(
                    [
                        group,
                        r.name,
                        r.note,
                        fmt(r.first),
                        fmt(r.median),
                        fmt(r.best),
                        str(len(r.times)),
                        f"{r.median / ours.median:.2f}x",
                        memo(r.peak, r.bound),
                        f"{r.load:.1f}" if r.load is not None else "-",
                    ]
                )
            if method == "ablationcam":
                ref = refs[0]
                speedups = [ref.median / ours.median, ref.median / ours.best]
                checks.append(
                    [
                        f"{group}: speed-up over grad-cam AblationCAM",
                        *(f"{s:.0f}x" for s in speedups),
                        f">= {TARGET_ABLATION:.0f}x",
                        verdict(speedups, TARGET_ABLATION),
                    ]
                )
                maps.append(
                    [group, "camfn vs grad-cam AblationCAM (input size)", f"{maxdiff(ours.output, ref.output):.1e}"]
                )
                continue
            faster = min(refs, key=lambda r: r.median)
            speedups = [faster.median / ours.median, faster.median / ours.best]
            checks.append(
                [
                    f"{group}: speed-up over {faster.name} (the faster reference)",
                    *(f"{s:.2f}x" for s in speedups),
                    f">= {TARGET_SCORE}x",
                    verdict(speedups, TARGET_SCORE),
                ]
            )
            if ours.peak is not None and faster.peak is not None:
                ratio = ours.peak / max(faster.peak, 1e-9)
                checks.append(
                    [
                        f"{group}: peak memory, camfn / {faster.name}",
                        f"{ratio:.2f}x ({ours.peak:.0f} / {faster.peak:.0f} MiB)",
                        "",
                        "<= 1x",
                        "unknown (bounds only)" if ours.bound or faster.bound else "met" if ratio <= 1 else "MISSED",
                    ]
                )
            floor = next(r for r in members if r.library == "floor")  # channels-last
            checks.append(
                [
                    f"{group}: camfn / floor (no_grad channels-last forwards of the masked inputs)",
                    f"{ours.median / floor.median:.2f}x",
                    f"{ours.best / floor.best:.2f}x (of mins)",
                    "",
                    "",
                ]
            )
            gc_ref = next(r for r in refs if r.library == "grad-cam")
            tc_ref = next(r for r in refs if r.library == "torchcam")
            b = int(group.rsplit(" ", 1)[1])
            maps += [
                [group, "camfn vs grad-cam ScoreCAM (input size)", f"{maxdiff(ours.output, gc_ref.output):.1e}"],
                [
                    group,
                    "camfn size=None vs torchcam ScoreCAM (layer size; torchcam normalises masks before upsampling)",
                    f"{maxdiff(ours.first_output, tc_ref.output):.1e}",
                ],
            ]
            maps += [
                [group, f"camfn {v.note} vs chunk_size={CHUNKS[0]}", f"{maxdiff(v.output, ours.output):.1e}"]
                for v in members
                if v.library == "camfn" and v is not ours
            ]
            maps.append(
                [
                    group,
                    "constant (all-zero) channels in every image (camfn scores their masked input once)",
                    f"{facts[b]['dead_all']} of {facts[b]['channels']} (per image: "
                    f"{', '.join(map(str, facts[b]['dead_each']))})",
                ]
            )
        head = ["case", "method", "options", "first call", "median", "min", "n", "/ camfn", "peak MiB", "load"]
        out += [f"## {title}", "", table(rows, head, args.markdown), ""]
        out += [table(checks, ["check", "of medians", "vs camfn min", "target", "verdict"], args.markdown), ""]
        out += [table(maps, ["case", "same map? (maps in [0, 1])", "max abs diff"], args.markdown), ""]
    out.append(
        '"first call": the untimed first camfn call of the case (it traces the model with torch.fx and '
        "propagates shapes, cached afterwards; for scorecam it runs with size=None, for the torchcam comparison). "
        "The other chunk_size variants reuse the warm trace and have no first call, nor have the floors. "
        "References: "
        "one call each, no warm-up (each takes minutes at 224 px). "
        '"/ camfn": median time over the median of camfn with default options. Speed-ups divide the '
        "reference's single time by camfn's median (\"of medians\") or by camfn's fastest call. "
        '"peak MiB": peak resident memory minus the resident memory just before the call (camfn: the largest '
        'over its timed calls). "load": 1-minute load average after the case\'s last call.'
    )
    out.append(
        "Defaults: "
        + bench.state["defaults"]
        + f"; camfn ablationcam chunk_size={ABLATION_CHUNK}, scorecam chunk_size={SCORE_CHUNK}."
    )
    if busy is not None:
        out.append(
            f"This process used {busy:.0%} of {torch.get_num_threads()} thread(s) x wall time while measuring"
            + (": the CPUs were shared with other processes, timings are noisy." if busy < BUSY else ".")
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ profile
def profile(bench: Bench, args: argparse.Namespace) -> str:
    """Where one warm ``camfn.scorecam`` call (smallest batch) spends its time."""
    b = min(args.batches)
    x, c = bench.state["inputs"][b]
    model, p = bench.state["model"], bench.state["params"]
    call = functools.partial(camfn.scorecam, model, p, x, args.layer, c)
    call()  # warm (the trace is cached if timing ran before)
    out = []
    prof = cProfile.Profile()
    prof.enable()
    call()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(
        r"camfn|torch/_functorch|torch/fx|functional_call|stateless|torch/nn/modules", 30
    )
    out.append(f"--- cProfile, camfn.scorecam, batch {b} (cumulative; camfn, functorch, fx, nn frames) ---")
    out.append(buf.getvalue().split("\n\n", 1)[-1].strip())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        call()
    out.append(f"--- torch.profiler, camfn.scorecam, batch {b} (top ops by self CPU time) ---")
    out.append(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        worker(args)
        return
    start = time.perf_counter()
    bullet = "- " if args.markdown else ""
    for line in header(args, argv):
        print(bullet + line)

    bench = build(args)
    facts = {b: bench.probe(b) for b in args.batches}
    mode = args.memory
    if mode in ("auto", "clear_refs"):
        if can_reset_peak():
            mode = "clear_refs"
        elif mode == "clear_refs":
            sys.exit("/proc/self/clear_refs is not writable here: use --memory subprocess or off")
        else:
            mode = "subprocess"
    print(
        bullet
        + f"peak memory: {mode}"
        + (f"; RSS after building models and inputs {mib(settle()):.0f} MiB" if mode != "off" else "")
    )
    print(flush=True)

    busy = execute(bench, Meter(mode == "clear_refs"), start)
    if mode == "subprocess":
        subprocess_peaks(bench, [a for a in argv if a != "--profile"])
    print(report(bench, args, busy, facts))
    if args.profile:
        print()
        print(profile(bench, args))
    print()
    print(bullet + f"load average at end: {loadavg()}; total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
