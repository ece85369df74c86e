"""Exported programs (``camfn.export``) against eager camfn, in the same run, on a torchvision ResNet.

Run from the repository root::

    python -m benchmarks.export --markdown            # resnet18, gradcam, batch 4, 112 px, with AOTInductor
    python -m benchmarks.export --methods gradcam layercam --size 64 --no-aoti

For each method: the export time (eager checks + ``make_fx`` + ``torch.export``), the AOTInductor compile
time (``torch._inductor.aoti_compile_and_package``: minutes for a ResNet on a CPU), then ``--repeats``
rounds in which eager camfn, the exported program (``ep.module()``, as ``torch.export.load`` gives it;
any batch size), the program exported for the fixed batch size (``batch=B``: one batched pass) and the
AOTInductor package run back to back on the same batch; medians and the median of the per-round ratios
(paired) are reported, with each program's max abs difference from the eager maps. Random weights, eval
mode. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision

import camfn
from benchmarks.common import cpu_model, loadavg, revision, write_report

RESULTS = "benchmarks/results/export.md"


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(args: argparse.Namespace, method_name: str, folder: str) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, args.model)().eval()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    target = torch.randint(0, 1000, (args.batch,), generator=g)
    p, method = camfn.params(model), camfn.METHODS[method_name]
    contenders: dict[str, Callable[[], Any]] = {"eager": lambda: method(model, p, x, args.layer, target)}
    result: dict[str, Any] = {"method": method_name}
    package = os.path.join(folder, f"{method_name}.pt2") if args.aoti else None
    result["export_s"], program = _timed(lambda: camfn.export(method, model, args.layer, x[:1]))
    module = program.module()
    contenders["exported"] = lambda: module(x, target)[1]
    fixed = camfn.export(method, model, args.layer, x[:1], batch=args.batch).module()
    contenders["fixed"] = lambda: fixed(x, target)[1]
    if package is not None:
        result["aoti_s"], _ = _timed(lambda: camfn.export(method, model, args.layer, x[:1], package=package))
        result["aoti_s"] -= result["export_s"]
        compiled = torch._inductor.aoti_load_package(package)
        contenders["aoti"] = lambda: compiled(x, target)[1]
    reference = contenders["eager"]()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    diffs = {}
    for name, fn in contenders.items():  # one untimed call each
        diffs[name] = float((fn() - reference).abs().max())
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            times[name].append(_timed(fn)[0])
    result["median"] = {name: statistics.median(t) for name, t in times.items()}
    result["paired"] = {
        name: statistics.median(e / c for e, c in zip(times["eager"], t, strict=True)) for name, t in times.items()
    }
    result["diff"] = diffs
    return result


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--methods", nargs="+", default=["gradcam"], choices=list(camfn.METHODS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-aoti", dest="aoti", action="store_false", help="skip the AOTInductor package")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--markdown", nargs="?", const=RESULTS, default=None, metavar="PATH", help=f"[{RESULTS}]")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"- command: `python -m benchmarks.export {command}`",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_model()}, "
        f"load average at start: {loadavg()}, camfn at {revision()}",
        f"- {args.model} (random weights, eval), layer {args.layer}, batch {args.batch}, {args.size} px, float32, "
        f"median of {args.repeats} round-robin repeats after one untimed call each",
        "- eager: `camfn.<method>(model, params, x, layer, target)`; exported: `camfn.export(...).module()`, "
        "the program `torch.export.load` returns (any batch size, sample by sample); fixed batch: "
        f"`camfn.export(..., batch={args.batch})`; aoti: the any-batch program as an AOTInductor package",
        "",
        "| method | export (s) | AOTI compile (s) | eager (s) | exported (s) | fixed batch (s) | aoti (s) "
        "| eager/exported (paired) | eager/fixed (paired) | eager/aoti (paired) | max diff exported / fixed / aoti |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.methods:
            r = bench(args, name, folder)
            med, paired, diff = r["median"], r["paired"], r["diff"]

            def cell(text: str, program: str, r: dict = r) -> str:
                return text if program in r["median"] else "-"

            cells = [
                name,
                f"{r['export_s']:.1f}",
                cell(f"{r.get('aoti_s', 0):.0f}", "aoti"),
                f"{med['eager']:.3f}",
                f"{med['exported']:.3f}",
                f"{med['fixed']:.3f}",
                cell(f"{med.get('aoti', 0):.3f}", "aoti"),
                f"{med['eager'] / med['exported']:.2f}x ({paired['exported']:.2f}x)",
                f"{med['eager'] / med['fixed']:.2f}x ({paired['fixed']:.2f}x)",
                cell(f"{med['eager'] / med.get('aoti', 1):.2f}x ({paired.get('aoti', 0):.2f}x)", "aoti"),
                f"{diff['exported']:.1e} / {diff['fixed']:.1e} / " + cell(f"{diff.get('aoti', 0):.1e}", "aoti"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    if args.markdown:
        write_report(args.markdown, "Exported programs against eager camfn", text)
    return text


if __name__ == "__main__":
    main()
