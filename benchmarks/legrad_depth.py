"""LeGrad as the network deepens: camfn against torchcam on torchvision ViTs of 2 to 12 blocks.

Run from the repository root::

    python -m benchmarks.legrad_depth --markdown            # 2, 6 and 12 blocks of ViT-B/16 width (~2 min)
    python -m benchmarks.legrad_depth --depths 2 --quick    # one depth, fewer rounds (seconds)

LeGrad differentiates every block's score with respect to that block's attention. Done well, the work grows
linearly with the depth (each block's backward stops at its own attention); done as one backward of a stack of
all block scores it grows quadratically (zeros flow back through every later block). For each ``--depths`` ``L``:
a random-weight ``torchvision.models.VisionTransformer`` with ViT-B/16's width (768, 12 heads, MLP 3072) and
``L`` blocks at ``--size`` px, batch 1, explained on all ``L`` blocks by ``camfn.legrad(model, params, x,
blocks, c)`` and torchcam's ``LeGrad(model, blocks)`` (a forward, then ``extractor(c, scores)``), each on its
own deepcopy; one untimed call each, then ``--rounds`` interleaved rounds. Reported: medians and torchcam's
median over camfn's. Nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import copy
import shlex
import statistics
import sys
import time
import warnings

import torch
import torchvision
from torch import nn

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import camfn
from benchmarks.common import environment, fmt, loadavg, publish, report_options, table, torch_threads

RESULTS = "benchmarks/results/legrad-depth.md"
RESULTS_QUICK = "benchmarks/results/legrad-depth-quick.md"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.legrad_depth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 6, 12], help="blocks [2 6 12]")
    parser.add_argument("--size", type=int, default=224, help="input side [224]")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds [5; --quick: 2]")
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    report_options(parser, RESULTS, RESULTS_QUICK)
    args = parser.parse_args(argv)
    if args.markdown == "":
        args.markdown = RESULTS_QUICK if args.quick else RESULTS
    if args.quick:
        args.rounds = 2
    if min(*args.depths, args.rounds) < 1 or args.size < 16 or args.size % 16:
        parser.error("--depths and --rounds must be at least 1, --size a multiple of 16")
    return args


def vit(depth: int, size: int) -> nn.Module:
    """ViT-B/16's width with ``depth`` blocks, random weights (the head drawn: torchvision zeroes it)."""
    model = torchvision.models.VisionTransformer(size, 16, depth, 12, 768, 3072)
    nn.init.normal_(model.heads.head.weight)
    return model.eval()


def measure(depth: int, args: argparse.Namespace) -> list[str]:
    from torchcam.methods import LeGrad

    torch.manual_seed(args.seed)
    model = vit(depth, args.size)
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(depth)]
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    params = camfn.params(ours)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    extractor = LeGrad(theirs, [theirs.get_submodule(b) for b in blocks])

    def camfn_call() -> object:
        return camfn.legrad(ours, params, x, blocks, 3)

    def torchcam_call() -> object:
        return extractor(3, theirs(x))

    calls = {"camfn": camfn_call, "torchcam": torchcam_call}
    times: dict[str, list[float]] = {name: [] for name in calls}
    try:
        for call in calls.values():
            call()
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    finally:
        extractor.remove_hooks()
    ours_s, theirs_s = (statistics.median(times[n]) for n in ("camfn", "torchcam"))
    return [str(depth), fmt(ours_s), fmt(theirs_s), f"{theirs_s / ours_s:.2f}x"]


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    with torch_threads(args.threads):
        start = time.perf_counter()
        lines = [
            "- command: `python -m benchmarks.legrad_depth" + (" " + shlex.join(argv) if argv else "") + "`",
            *("- " + line for line in environment()),
            f"- torchvision ViT, width 768, 12 heads, random weights, eval, {args.size} px, batch 1, float32, CPU; all "
            f"blocks explained; median of {args.rounds} interleaved rounds after one untimed call each",
        ]
        print("\n".join(lines), flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = [measure(depth, args) for depth in args.depths]
        head = ["blocks", "camfn median", "torchcam median", "torchcam / camfn"]
        body = [
            "",
            table(rows, head, True),
            "",
            f"- load average at end: {loadavg()}; total wall time {time.perf_counter() - start:.0f} s",
        ]
    return publish(lines, body, args.markdown, "LeGrad as the network deepens")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
