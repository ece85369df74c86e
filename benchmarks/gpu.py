"""The short GPU race: camfn (eager and compiled) against grad-cam and torchcam on one CUDA device.

Run from the repository root (``benchmarks/gpu_check.sh`` runs it after the CUDA tests)::

    python -m benchmarks.gpu --markdown            # resnet50, batch 32, 224 px: gradcam, scorecam, ablationcam
    python -m benchmarks.gpu --compiled            # eager only (no method compiled)
    python -m benchmarks.gpu --device cpu --model resnet18 --batch 1 --size 64 --methods gradcam  # wiring only

One random-weight torchvision model in eval mode, float32, one class per image. For each method: camfn's
eager call, the grad-cam class and the torchcam class (the same contenders and calls as ``benchmarks/speed.py``,
each library with its own copy of the model), then camfn compiled with ``camfn.compiled`` for ``--compiled``
(its first call is camfn's eager warm-up plus the compile). Every library forwards ``--forward-batch``
perturbed images at a time in the slow methods (camfn ``chunk_size``, grad-cam ``batch_size``, torchcam
``bs``). Score-CAM is not compiled by default: ``camfn.compiled`` unrolls its chunk loop into one graph (at
batch 32 and 2048 channels, 256 copies of resnet50 at ``--forward-batch 256``); on the CPU, resnet18 at batch 2
and 64 px took 252 s to capture (backend "eager") against 7 s for one eager call.

Fast methods (gradcam): one untimed call each, then ``--repeats`` timed calls; slow methods (scorecam,
ablationcam: thousands of forwards) one timed call, no warm-up (the model is traced before any timing).
Every call is wrapped in ``torch.cuda.synchronize``. "peak GiB": the CUDA allocator's peak during the call
above what was allocated before it. The report is rewritten after every row, so a run stopped at a time
budget keeps what finished. Nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # grad-cam's progress bars; read when tqdm is first imported

import argparse
import copy
import functools
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import camfn
from benchmarks import speed as race
from benchmarks.common import fmt, maxdiff, revision, table, timed, version, write_report

RESULTS = os.path.join("benchmarks", "results", "gpu.md")
METHODS = ("gradcam", "scorecam", "ablationcam")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model [resnet50]")
    parser.add_argument("--batch", type=int, default=32, help="images per call [32]")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels [224]")
    parser.add_argument("--layer", default="layer4", help="layer to explain [layer4]")
    parser.add_argument("--methods", nargs="+", choices=sorted(race.BY_NAME), default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of fast methods [10]")
    parser.add_argument("--forward-batch", type=int, default=256, help="images per forward in slow methods [256]")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend [inductor]")
    parser.add_argument(
        "--compiled",
        nargs="*",
        choices=sorted(race.BY_NAME),
        default=["gradcam", "ablationcam"],
        metavar="METHOD",
        help="methods also timed through camfn.compiled [gradcam ablationcam]; none: --compiled",
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the wiring")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and classes [0]")
    parser.add_argument("--preamble", help="a markdown file put at the top of the report (the CUDA tests' summary)")
    parser.add_argument("--markdown", nargs="?", const=RESULTS, default=None, metavar="PATH", help=f"[{RESULTS}]")
    args = parser.parse_args(argv)
    if min(args.batch, args.size, args.repeats, args.forward_batch) < 1:
        parser.error("--batch, --size, --repeats and --forward-batch must be at least 1")
    args.noise_samples = 2  # race.torchcam_options reads it (sscam/iscam only)
    return args


@dataclass
class Row:
    """One contender's timings on one method."""

    method: str
    library: str
    mode: str
    times: list[float] = field(default_factory=list)
    first: float | None = None
    peak: float | None = None  # GiB
    diff: str = "-"
    note: str = ""


def _peak_above(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any, float | None]:
    """``timed(fn)``'s wall seconds and result, and the CUDA allocator's peak above the start, in GiB."""
    if device.type != "cuda":
        seconds, _, out = timed(fn, device)
        return seconds, out, None
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    seconds, _, out = timed(fn, device)
    return seconds, out, (torch.cuda.max_memory_allocated(device) - before) / 2**30


def measure(row: Row, fn: Callable[[], Any], device: torch.device, warm: bool, repeats: int) -> Any:
    """Call ``fn`` (once untimed when ``warm``), then ``repeats`` timed calls; return the last output."""
    out = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the references' deprecation chatter
        if warm:
            row.first, out, _ = _peak_above(device, fn)
        for _ in range(repeats):
            seconds, out, peak = _peak_above(device, fn)
            row.times.append(seconds)
            row.peak = peak if row.peak is None or peak is None else max(row.peak, peak)
    if row.first is None:
        row.first = row.times[0]
    print(f"  {row.method:<12} {row.library:<9} {row.mode:<9} {fmt(statistics.median(row.times)):>8}", flush=True)
    return out


def _maxdiff(a: Any, b: Any) -> str:
    if a is None or b is None:
        return "-"
    if isinstance(a, torch.Tensor):
        a = a.detach().float().cpu()
    if isinstance(b, torch.Tensor):
        b = b.detach().float().cpu()
    return f"{maxdiff(a, b):.1e}"


def rows_table(rows: list[Row]) -> str:
    head = ["method", "library", "mode", "n", "first call", "median", "peak GiB", "max abs diff", "note"]
    body = [
        [
            f"`{r.method}`",
            r.library,
            r.mode,
            str(len(r.times)),
            fmt(r.first),
            fmt(statistics.median(r.times)) if r.times else "-",
            "-" if r.peak is None else f"{r.peak:.2f}",
            r.diff,
            r.note,
        ]
        for r in rows
    ]
    return table(body, head, True)


NOTES = (
    '"first call": the first call of that contender (compiled: includes compiling; camfn eager: the model is '
    'traced before any timing). "max abs diff": grad-cam against camfn eager (both at the input size, min-max '
    "in [0, 1]; torchcam returns layer-resolution maps and is not compared), compiled against camfn eager. "
    "Slow methods run once per contender at this size: their medians are single calls."
)


def header(args: argparse.Namespace, argv: list[str], device: torch.device) -> list[str]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU run: wiring check only)"
    return [
        "command: `python -m benchmarks.gpu" + (" " + shlex.join(argv) if argv else "") + "`",
        f"GPU: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision {torchvision.__version__}, "
        f"camfn {camfn.__version__} at {revision()}, grad-cam {version('grad-cam')}, torchcam {version('torchcam')}, "
        f"python {platform.python_version()}",
        f"model {args.model} (random weights, eval, float32; TF32 convolutions "
        f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}, TF32 matmul "
        f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}), batch {args.batch}, {args.size}x{args.size} "
        f"px, layer {args.layer!r}, one class per image; fast methods: median of {args.repeats} after one untimed "
        f"call; slow methods: {args.forward_batch} perturbed images per forward in every library; compiled "
        f"(backend {args.backend}): {', '.join(args.compiled) or 'none'}",
    ]


def run(argv: list[str] | None = None) -> int:
    """Run the race; print (and with ``--markdown``, write) the report after each row; return an exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA: torch {torch.__version__} sees no CUDA device; nothing to race (use --device cpu)")
        return 0
    start = time.perf_counter()
    preamble = Path(args.preamble).read_text().strip() + "\n\n" if args.preamble else ""
    lines = ["- " + line for line in header(args, argv, device)]
    print("\n".join(lines), flush=True)
    rows: list[Row] = []

    def report(final: bool) -> None:
        tail = f"- total wall time {time.perf_counter() - start:.0f} s" + ("" if final else " (still running)")
        text = "\n".join([preamble + "## The race", "", *lines, "", rows_table(rows), "", NOTES, "", tail])
        if args.markdown:
            write_report(args.markdown, "GPU check: CUDA tests and a short race", text)

    torch.manual_seed(args.seed)
    base = torchvision.models.get_model(args.model, weights=None).eval().to(device)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    with torch.no_grad():
        classes = torch.randint(0, base(x[:1]).shape[1], (args.batch,), generator=gen).to(device)
    models = {name: copy.deepcopy(base) for name in ("camfn", "grad-cam", "torchcam")}
    params = camfn.params(models["camfn"])
    camfn.gradcam(models["camfn"], params, x[:1], args.layer, classes[:1])  # trace and warm the GPU, untimed
    eager_maps: dict[str, Any] = {}

    def contend(row: Row, fn: Callable[[], Any], slow: bool, warm: bool = False) -> Any:
        rows.append(row)
        out = measure(row, fn, device, warm=warm or not slow, repeats=1 if slow else args.repeats)
        report(False)
        return out

    listed = classes.tolist()

    def installed(library: str, method: str) -> bool:
        if version(library) != "not installed":
            return True
        rows.append(Row(method, library, "eager", note="not installed here"))
        return False

    for name in args.methods:
        method = race.BY_NAME[name]
        options = {"chunk_size": args.forward_batch} if method.slow else {}
        fn = functools.partial(camfn.METHODS[name], models["camfn"], params, x, args.layer, classes, **options)
        eager_maps[name] = contend(Row(name, "camfn", "eager"), fn, method.slow)
        if method.gradcam is not None and installed("grad-cam", name):
            extractor, release = race.gradcam_extractor(method, models["grad-cam"], args.layer)
            extractor.batch_size = args.forward_batch  # ScoreCAM and AblationCAM read it
            try:
                row = Row(name, "grad-cam", "eager")
                out = contend(row, functools.partial(race.gradcam_call, extractor, x, listed), method.slow)
                row.diff = _maxdiff(eager_maps[name], out)
                report(False)
            finally:
                release()
        if method.torchcam is not None and installed("torchcam", name):
            extractor, release = race.torchcam_extractor(method, models["torchcam"], args.layer, args)
            extractor.bs = args.forward_batch  # the Score-CAM family's forward batch
            how = method.torchcam_call
            try:
                call = functools.partial(race.torchcam_call, extractor, models["torchcam"], x, listed, how)
                contend(Row(name, "torchcam", "eager"), call, method.slow)
            finally:
                release()
    for name in sorted(args.compiled, key=lambda n: race.BY_NAME[n].slow):  # fast ones first: cheapest compile
        method = race.BY_NAME[name]
        options = {"chunk_size": args.forward_batch} if method.slow else {}
        fast = camfn.compiled(camfn.METHODS[name], models["camfn"], args.layer, backend=args.backend, **options)
        row = Row(name, "camfn", "compiled", note=f"backend {args.backend}")
        out = contend(row, functools.partial(fast, params, x, classes), method.slow, warm=True)  # first: compile
        row.diff = _maxdiff(eager_maps.get(name), out)
        report(False)
    report(True)
    print("\n" + rows_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run())
