"""Score-CAM across input sizes: camfn (``chunk_size="auto"``, 8 and 64) against grad-cam and torchcam.

Run from the repository root::

    python -m benchmarks.score_sizes --markdown          # 64, 112 and 224 px (5-10 minutes on 2 cores)
    python -m benchmarks.score_sizes --sizes 64 --quick  # one size, no repeated default call (a minute)

On one random-weight resnet18 (eval, float32, CPU) at batch 1 and layer ``layer4`` (512 channels: 512 masked
forwards per call), for each ``--sizes`` side: the model is traced for the input first (``camfn.tracing.traced``,
the one-time warm-up), then one call each, in this order so that drifting load spreads over all:
``camfn.scorecam`` with its default ``chunk_size="auto"`` (its first call also builds the cut and the fused
inference program, cached afterwards), grad-cam ``ScoreCAM(model, [model.layer4[-1]])``, camfn with
``chunk_size=8``, torchcam ``ScoreCAM(model, "layer4")``, camfn with ``chunk_size=64``, and the default again
(warm; not with ``--quick``). Reported: each time and the faster reference's time over it (the speed-up; goal
>= 1.5x for the default). Each library has its own deepcopy of the model. Then the floors: ``K`` forwards of
the network alone (no masks, no scores) in camfn's fused program at the default chunk size and eagerly at
grad-cam's and torchcam's batch sizes; the faster reference's time over the fused floor is the most any
exact Score-CAM that scores every channel can reach on this machine. Nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import copy
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchvision

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import camfn
from benchmarks.common import (
    Share,
    environment,
    fmt,
    last_module,
    loadavg,
    maxdiff,
    publish,
    report_options,
    table,
    timed,
    torch_threads,
)
from camfn.chunks import chunked, copies_per_forward
from camfn.inference import bind
from camfn.pullback import activations, channels_last
from camfn.rewrite import inject

RESULTS = os.path.join("benchmarks", "results", "score-sizes.md")
RESULTS_QUICK = os.path.join("benchmarks", "results", "score-sizes-quick.md")
TARGET = 1.5  # the faster reference's time / camfn.scorecam's (default chunk_size), at least
DEFAULT_CHUNK = camfn.METHODS["scorecam"].spec.options["chunk_size"].default
CPU = torch.device("cpu")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.score_sizes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 112, 224], help="input sides [64 112 224]")
    parser.add_argument("--model", default="resnet18", help="torchvision model [resnet18]")
    parser.add_argument("--layer", default="layer4", help="layer [layer4]")
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 64], help="other chunk sizes of camfn [8 64]")
    parser.add_argument("--quick", action="store_true", help="no second (warm) call of the default")
    report_options(parser, RESULTS, RESULTS_QUICK)
    args = parser.parse_args(argv)
    if args.markdown == "":
        args.markdown = RESULTS_QUICK if args.quick else RESULTS
    if min(*args.sizes, *args.chunks) < 1:
        parser.error("--sizes and --chunks must be at least 1")
    return args


def contenders(size: int, args: argparse.Namespace) -> tuple[list[tuple[str, str, Callable[[], Any]]], Callable]:
    """``(name, library, call)`` in run order, and a function removing the references' hooks."""
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchcam.methods import ScoreCAM as TCScoreCAM

    torch.manual_seed(args.seed)
    base = torchvision.models.get_model(args.model, weights=None).eval()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(1, 3, size, size, generator=gen)
    with torch.no_grad():
        classes = torch.randint(0, base(x).shape[1], (1,), generator=gen)
    m_camfn, m_gc, m_tc = (copy.deepcopy(base) for _ in range(3))
    p = camfn.params(m_camfn)
    camfn.tracing.traced(m_camfn, p, x)  # the warm-up trace
    gc = ScoreCAM(m_gc, [last_module(m_gc, args.layer)])
    tc = TCScoreCAM(m_tc, args.layer)

    def ours(chunk: int | str) -> Callable[[], Any]:
        return lambda: camfn.scorecam(m_camfn, p, x, args.layer, classes, chunk_size=chunk)

    def torchcam() -> Any:
        with torch.no_grad():
            m_tc(x)
        return tc(class_idx=classes.tolist())[0]

    default = f"camfn chunk_size={DEFAULT_CHUNK!r} (default)"
    runs = [
        (default, "camfn", ours(DEFAULT_CHUNK)),
        ("grad-cam ScoreCAM", "grad-cam", lambda: gc(input_tensor=x, targets=[ClassifierOutputTarget(int(classes))])),
    ]
    others = [(f"camfn chunk_size={c}", "camfn", ours(c)) for c in args.chunks]
    runs += [*others[:1], ("torchcam ScoreCAM", "torchcam", torchcam), *others[1:]]
    if not args.quick:
        runs.append((default + ", warm", "camfn", ours(DEFAULT_CHUNK)))

    def release() -> None:
        gc.activations_and_grads.release()
        tc.remove_hooks()

    return runs, release


def measure(size: int, args: argparse.Namespace) -> list[list[str]]:
    """Rows of one size: each contender's time and the faster reference's time over it."""
    runs, release = contenders(size, args)
    times: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    try:
        for name, _, call in runs:
            times[name], _, outputs[name] = timed(call, CPU)
            print(f"  {size} px  {name:<42} {fmt(times[name]):>8}  load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    finally:
        release()
    refs = [name for name, library, _ in runs if library != "camfn"]
    faster = min(refs, key=times.__getitem__)
    default = runs[0][0]
    rows = []
    for name, library, _ in runs:
        speedup = times[faster] / times[name]
        goal = "-"
        if name.startswith(default):
            goal = "met" if speedup >= TARGET else "MISSED"
        same = "-"
        if library == "camfn":
            same = f"{maxdiff(outputs[name], outputs[default]):.0e}" if name != default else "0"
        rows.append(
            [f"{size} px", name, fmt(times[name]), "-" if library != "camfn" else f"{speedup:.2f}x", goal, same]
        )
    rows.append([f"{size} px", f"faster reference: {faster}", fmt(times[faster]), "", "", ""])
    return rows + floors(size, args, times[faster])


def floors(size: int, args: argparse.Namespace, reference: float) -> list[list[str]]:
    """What any exact Score-CAM pays: ``K`` forwards of the network alone (no masks, no scores), in camfn's
    fused program at the default chunk size and eagerly at grad-cam's and torchcam's batch sizes (16, 32);
    and how many of the ``K`` masks are distinct (the ones camfn scores)."""
    torch.manual_seed(args.seed)
    base = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    p = camfn.params(base)
    traced = camfn.tracing.traced(base, p, x)
    node = traced.resolve(args.layer)
    _, (a,) = activations(inject(traced, [node], with_output=False), p, x)
    k = a.shape[1]
    low, high = a.flatten(2).amin(-1, keepdim=True), a.flatten(2).amax(-1, keepdim=True)
    distinct = torch.unique(((a.flatten(2) - low) / (high - low + 1e-8))[0], dim=0).shape[0]
    per = copies_per_forward(DEFAULT_CHUNK, x.shape[1:])
    network = bind(traced, channels_last(p), x)
    fused = x.expand(per, *x.shape[1:]).contiguous(memory_format=torch.channels_last)

    def forwards(run: Callable[[torch.Tensor], Any], inputs: torch.Tensor, n: int) -> Callable[[], Any]:
        def go() -> None:
            with torch.no_grad():
                chunked(lambda idx: run(inputs[: idx.numel()]), n, inputs.shape[0])

        return go

    runs = [(f"floor: {k} forwards alone, camfn's fused program ({per} per forward, even chunks)", network, fused)]
    runs += [
        (f"floor: {k} forwards alone, eager, batch {b}", base, x.expand(b, *x.shape[1:]).clone()) for b in (16, 32)
    ]
    rows = []
    for name, run, inputs in runs:
        forwards(run, inputs, inputs.shape[0])()  # warm: one forward of a whole chunk
        seconds = min(timed(forwards(run, inputs, k), CPU)[0] for _ in range(2))  # a floor: the faster of two
        rows.append([f"{size} px", name, fmt(seconds), f"{reference / seconds:.2f}x", "-", "-"])
    rows.append([f"{size} px", f"distinct masks (scored by camfn): {distinct} of {k}", "", "", "", ""])
    return rows


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    with torch_threads(args.threads):
        start, share = time.perf_counter(), Share()
        lines = [
            "- command: `python -m benchmarks.score_sizes" + (" " + shlex.join(argv) if argv else "") + "`",
            *("- " + line for line in environment()),
            f"- {args.model} (random weights, eval), batch 1, layer {args.layer!r}, float32, CPU; one call each "
            "after the warm-up trace",
        ]
        print("\n".join(lines), flush=True)
        rows = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for size in args.sizes:
                rows += measure(size, args)
        head = ["size", "contender", "time", f"speed-up of the faster reference over it (goal >= {TARGET}x)"]
        head += ["goal", "max abs diff vs default"]
        body = [
            "",
            table(rows, head, True),
            "",
            "The default's first call also builds its cut and fused inference program (cached per model and "
            'layer); ", warm" is a second call. The chunk_size variants reuse them. Maps are in [0, 1]. '
            f"{DEFAULT_CHUNK!r} gives "
            + ", ".join(f"{copies_per_forward(DEFAULT_CHUNK, (3, s, s))} at {s} px" for s in args.sizes)
            + " masked images per forward (camfn.chunks.copies_per_forward). The floors are the network alone "
            "K times (no masks, no scores): the faster reference's time over camfn's fused floor bounds what any "
            "exact Score-CAM that scores every channel reaches here; camfn scores only the distinct masks.",
            "",
            f"- load average at end: {loadavg()}; total wall time {time.perf_counter() - start:.0f} s; this process "
            f"used {share.used():.0%} of {torch.get_num_threads()} thread(s) x wall time",
        ]
    return publish(lines, body, args.markdown, "Score-CAM across input sizes")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
