"""Compile time and compiled/eager speed of camfn methods (``camfn.compiled``) on torchvision ResNets.

Run from the repository root::

    python -m benchmarks.compile --quick             # resnet18, gradcam, batch 2, 112 px (~3-5 min on 2 cores)
    python -m benchmarks.compile                     # resnet18 and resnet50, gradcam, batch 8, 224 px
    python -m benchmarks.compile --methods gradcam layercam --backend inductor --repeats 5

For each model and method: the eager call (after one untimed warm-up that traces the model), the first
compiled call (compile time: dynamo capture + the backend's code generation, minus one eager call), then
``--repeats`` rounds in which eager and compiled run back to back; the median of each and the median of the
per-round ratios ("paired", robust to other processes loading the machine) are reported. The compiled
maps are checked against the eager ones (max abs difference). Random weights, eval mode. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
import torchvision

import camfn
from benchmarks.common import cpu_model, revision

RESULTS = "benchmarks/results/compile.md"


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(model_name: str, method_name: str, batch: int, size: int, repeats: int, backend: str) -> dict:
    model = getattr(torchvision.models, model_name)().eval()
    p, x = camfn.params(model), torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    method, target = camfn.METHODS[method_name], torch.arange(batch)
    eager = lambda: method(model, p, x, "layer4", target)  # noqa: E731
    eager()
    t_eager, ref = _timed(eager)
    fast = camfn.compiled(method, model, "layer4", backend=backend)
    t_first, got = _timed(lambda: fast(p, x, target))
    eager_times, compiled_times = [], []
    for _ in range(repeats):
        eager_times.append(_timed(eager)[0])
        compiled_times.append(_timed(lambda: fast(p, x, target))[0])
    return {
        "model": model_name,
        "method": method_name,
        "compile_s": t_first - t_eager,
        "eager_s": statistics.median(eager_times),
        "compiled_s": statistics.median(compiled_times),
        "paired": statistics.median(e / c for e, c in zip(eager_times, compiled_times, strict=True)),
        "max_diff": float((got - ref).abs().max()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18, batch 2, 112 px, 3 repeats")
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--methods", nargs="+", choices=list(camfn.METHODS), default=["gradcam"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--markdown",
        nargs="?",
        const=RESULTS,
        default=None,
        metavar="PATH",
        help=f"also write the table to PATH [{RESULTS}]",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.size, args.repeats = ["resnet18"], 2, 112, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [
        f"- command: `python -m benchmarks.compile {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_model()}, camfn at {revision()}",
        f"- backend {args.backend}, batch {args.batch}, {args.size} px, {args.repeats} repeats, layer4, random weights",
        "",
        "| model | method | compile (s) | eager (s) | compiled (s) | eager/compiled (paired) | max diff |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for model_name in args.models:
        for method_name in args.methods:
            r = bench(model_name, method_name, args.batch, args.size, args.repeats, args.backend)
            lines.append(
                f"| {r['model']} | {r['method']} | {r['compile_s']:.0f} | {r['eager_s']:.3f} | "
                f"{r['compiled_s']:.3f} | {r['eager_s'] / r['compiled_s']:.2f}x ({r['paired']:.2f}x) | "
                f"{r['max_diff']:.1e} |"
            )
            print(lines[-1], flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
