"""The Grad-CAM detail: camfn.gradcam against grad-cam, torchcam, the plain forward pass and many targets.

Run from the repository root (CPU or CUDA)::

    python -m benchmarks.gradcam_detail              # resnet50, batch 8, 224 px, 5 repeats (3-6 min)
    python benchmarks/gradcam_detail.py --quick      # resnet18, batch 2, 112 px, 2 repeats (< 1 min)
    python -m benchmarks.gradcam_detail --markdown   # tables as markdown, for the README
    python -m benchmarks.gradcam_detail --profile    # also: where camfn's time goes
    python -m benchmarks.gradcam_detail --threads 1  # one thread: CPU times robust to other processes

The race of every method is ``benchmarks/speed.py``; the per-call overhead at batch 1 is
``benchmarks/overhead.py``.

What the Grad-CAM detail times, all in one process, on one random-weight torchvision model in eval mode:

1. one target per image: ``camfn.gradcam(model, params, x, layer, target)`` with a ``(B,)`` class tensor,
   grad-cam ``GradCAM(model, [layer[-1]])(x, targets)`` and torchcam ``GradCAM(model, layer)`` (forward with
   gradients inside the extractor's life, then ``extractor(class_idx, scores)``);
2. ``T`` targets per image (default 10): camfn with one ``(B, T)`` target tensor, against ``T`` calls of
   each reference with one class per image each (and torchcam's cheapest way: one forward, ``T`` backward
   passes with ``retain_graph=True``);
3. the physical floor: one ``torch.no_grad()`` forward of the same model on the same batch.

Every library gets its own ``copy.deepcopy`` of the model (same weights): the references register hooks,
and camfn refuses hooked models by default. Each case is called once untimed first (for camfn that call
traces the model and is reported as "first call (trace)"), then the cases run round-robin ``--repeats``
times (the slow ``T``-call reference loops only in the first ``--slow-repeats`` rounds) and the median (and
min) of each is reported. The forward, camfn 1-target and camfn ``T``-target calls run back to back in each
round, so besides the ratio of medians the script reports the median of the per-round ratios ("paired")
and the ratio of mins, both much less sensitive to other processes loading the machine; ``--threads 1``
makes the CPU-time column exact even on a shared machine. Nothing is asserted.

What comes back differs by default and is *not* equalised: camfn and grad-cam resize the maps to the input
size (camfn with ``F.interpolate`` on the tensor, grad-cam with cv2 on numpy arrays, per map), torchcam
returns maps at the layer's resolution.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # grad-cam's progress bars; read when tqdm is first imported

import argparse
import contextlib
import copy
import cProfile
import io
import pstats
import statistics
import sys
import time
import warnings

import torch
import torchvision
from torch import Tensor

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import camfn
from benchmarks.common import BUSY, Case, Share, environment, fmt, last_module, loadavg, table, timed

TARGET_FORWARD = 1.25  # camfn 1-target time / plain forward time
TARGET_MULTI = 1.3  # camfn T-target time / camfn 1-target time


# ------------------------------------------------------------------------------------------ options
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gradcam_detail",
        description="camfn.gradcam against grad-cam, torchcam, the plain forward pass and T targets per image.",
    )
    parser.add_argument("--model", default=None, help="torchvision model name [resnet50; --quick: resnet18]")
    parser.add_argument("--layer", default="layer4", help="layer (module path) to explain [layer4]")
    parser.add_argument("--batch", type=int, default=None, help="batch size [8; --quick: 2]")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels [224; --quick: 112]")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case [5; --quick: 2]")
    parser.add_argument(
        "--slow-repeats", type=int, default=2, help="timed repeats of the T-call reference loops, at most --repeats [2]"
    )
    parser.add_argument("--targets", type=int, default=10, help="classes per image in the multi-target case [10]")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet18, batch 2, 112 px, 2 repeats")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--profile", action="store_true", help="profile camfn's calls after timing")
    parser.add_argument("--device", default="cpu", help="torch device [cpu]")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: leave torch's default). With 1 thread the CPU-time column is "
        "robust to other processes on the machine",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, input and targets [0]")
    args = parser.parse_args(argv)
    quick = {"model": "resnet18", "batch": 2, "size": 112, "repeats": 2}
    full = {"model": "resnet50", "batch": 8, "size": 224, "repeats": 5}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.repeats, args.slow_repeats, args.batch, args.targets) < 1:
        parser.error("--repeats, --slow-repeats, --batch and --targets must be at least 1")
    args.slow_repeats = min(args.slow_repeats, args.repeats)
    return args


# ------------------------------------------------------------------------------------------ header
def header(args: argparse.Namespace) -> list[str]:
    dev = torch.device(args.device)
    lines = environment()
    if dev.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(dev)}")
    lines.append(
        f"model {args.model} (random weights, eval), layer {args.layer!r}, batch {args.batch}, "
        f"{args.size}x{args.size} px, float32, device {args.device}, {args.targets} targets in the multi-target case, "
        f"median of {args.repeats} round-robin repeats ({args.slow_repeats} for the {args.targets}-call reference "
        "loops) after one untimed call per case"
    )
    return lines


# ------------------------------------------------------------------------------------------ contenders
def build(args: argparse.Namespace):
    from pytorch_grad_cam import GradCAM as GCGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchcam.methods import GradCAM as TCGradCAM

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    base = torchvision.models.get_model(args.model, weights=None).eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    with torch.no_grad():
        num_classes = base(x).shape[1]
    gen = torch.Generator().manual_seed(args.seed)
    one = torch.randint(0, num_classes, (args.batch,), generator=gen).to(device)
    many = torch.stack([torch.randperm(num_classes, generator=gen)[: args.targets] for _ in range(args.batch)]).to(
        device
    )
    one_list = one.tolist()
    many_cols = [many[:, j].tolist() for j in range(args.targets)]

    m_camfn, m_gc, m_tc = (copy.deepcopy(base) for _ in range(3))
    p = camfn.params(m_camfn)
    gc_cam = GCGradCAM(m_gc, [last_module(m_gc, args.layer)])
    tc_cam = TCGradCAM(m_tc, args.layer)

    def floor() -> object:
        with torch.no_grad():
            return base(x)

    def camfn_one() -> Tensor:
        return camfn.gradcam(m_camfn, p, x, args.layer, one)

    def camfn_many() -> Tensor:
        return camfn.gradcam(m_camfn, p, x, args.layer, many)

    def gc_call(classes: list[int]):
        return gc_cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])

    def tc_call(classes: list[int]) -> Tensor:
        with torch.enable_grad():
            scores = m_tc(x)
            return tc_cam(class_idx=classes, scores=scores)[0]

    def tc_retain() -> list[Tensor]:
        with torch.enable_grad():
            scores = m_tc(x)
            last = len(many_cols) - 1
            return [tc_cam(class_idx=c, scores=scores, retain_graph=j < last)[0] for j, c in enumerate(many_cols)]

    T = args.targets
    # Run order: the three cases of the target ratios back to back, then the references, slow loops last.
    cases = [
        Case("torch.no_grad() forward", "floor", floor, "the physical floor"),
        Case("camfn.gradcam", "1", camfn_one, "(B,) target; maps resized to input"),
        Case("camfn.gradcam", "T", camfn_many, f"one (B, {T}) target"),
        Case("grad-cam GradCAM", "1", lambda: gc_call(one_list), "numpy, resized to input (cv2)"),
        Case("torchcam GradCAM", "1", lambda: tc_call(one_list), "layer resolution, not resized"),
        Case("torchcam GradCAM, retain_graph", "T", tc_retain, f"1 forward + {T} backward"),
        Case("grad-cam GradCAM", "T", lambda: [gc_call(c) for c in many_cols], f"{T} calls", warm=False, slow=True),
        Case("torchcam GradCAM", "T", lambda: [tc_call(c) for c in many_cols], f"{T} calls", warm=False, slow=True),
    ]

    def close() -> list[str]:
        """Remove the references' hooks; report what each library left behind on its model."""
        notes = []
        gc_cam.activations_and_grads.release()
        tc_cam.remove_hooks()
        for name, model in (("camfn", m_camfn), ("grad-cam", m_gc), ("torchcam", m_tc), ("plain forward", base)):
            training = sum(m.training for m in model.modules())
            grads = sum(q.grad is not None for q in model.parameters())
            hooks = len(camfn.hooks.foreign_hooks(model))
            notes.append(
                f"{name} model after the run: {training} module(s) in train mode, {grads} parameter(s) with .grad, "
                f"{hooks} hook(s) left"
            )
        # grad-cam's constructor switches the model to eval mode (train-mode BatchNorm/Dropout users beware).
        probe = copy.deepcopy(base).train()
        with GCGradCAM(probe, [last_module(probe, args.layer)]):
            pass
        notes.append(
            f"grad-cam GradCAM(model.train(), ...) leaves model.training={probe.training} "
            "(its constructor calls model.eval())"
        )
        return notes

    def agreement() -> list[str]:
        """Same work? Max abs difference of the 1-target maps (both already in [0, 1])."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = camfn_one().cpu()
            ref = torch.as_tensor(gc_call(one_list))
            ours_small = camfn.gradcam(m_camfn, p, x, args.layer, one, size=None).cpu()
            tc = tc_call(one_list).cpu()
        return [
            f"camfn vs grad-cam maps (input size): max |diff| = {(ours - ref).abs().max():.2e}",
            f"camfn(size=None) vs torchcam maps (layer size): max |diff| = {(ours_small - tc).abs().max():.2e}",
        ]

    return cases, close, agreement, (m_camfn, p, x, one, many)


# ------------------------------------------------------------------------------------------ report
def paired(a: Case, b: Case) -> float:
    """Median over rounds of ``a / b`` (the two calls of one round run close together)."""
    return statistics.median(x / y for x, y in zip(a.times, b.times, strict=False))


def verdict(ratios: list[float], limit: float) -> str:
    if all(r <= limit for r in ratios):
        return "met"
    if all(r > limit for r in ratios):
        return "MISSED"
    return "unclear (noisy)"


def report(cases: list[Case], args: argparse.Namespace, busy: float | None = None) -> str:
    T = args.targets
    floor = next(c for c in cases if c.group == "floor")
    ours = {c.group: c for c in cases if c.name == "camfn.gradcam"}
    group_name = {"floor": "forward", "1": "1 target / image", "T": f"{T} targets / image"}
    shown = sorted(cases, key=lambda c: (["floor", "1", "T"].index(c.group), c.name != "camfn.gradcam", c.slow))
    rows = []
    for c in shown:
        mine = ours.get(c.group)
        rows.append(
            [
                group_name[c.group],
                c.name,
                fmt(c.first),
                fmt(c.median),
                fmt(c.best),
                fmt(c.cpu_median),
                str(len(c.times)),
                f"{c.median / floor.median:.2f}x",
                f"{c.median / mine.median:.2f}x" if mine is not None else "-",
                c.note,
            ]
        )
    head = ["case", "method", "first call", "median", "min", "CPU time", "n", "/ forward", "/ camfn", "notes"]
    out = [table(rows, head, args.markdown), ""]

    def ratios(a: Case, b: Case) -> list[float]:
        return [a.median / b.median, paired(a, b), a.best / b.best, a.cpu_median / b.cpu_median]

    one, many = ours["1"], ours["T"]
    checks = []
    for label, a, b, limit in (
        ("camfn 1 target / no_grad forward", one, floor, TARGET_FORWARD),
        (f"camfn {T} targets / camfn 1 target", many, one, TARGET_MULTI),
    ):
        r = ratios(a, b)
        verdict_ = verdict(r[:3], limit)
        if busy is not None and busy < BUSY:
            verdict_ += " (busy machine)"
        checks.append([label, *(f"{v:.2f}" for v in r), f"<= {limit}", verdict_])
    for c in shown:
        if c.group in ("1", "T") and c.name != "camfn.gradcam":
            r = ratios(c, ours[c.group])
            faster = "camfn faster" if r[0] > 1 and r[2] > 1 else "reference faster" if r[0] < 1 and r[2] < 1 else ""
            checks.append([f"{c.name} ({group_name[c.group]}) / camfn", *(f"{v:.2f}" for v in r), "", faster])
    out.append(table(checks, ["ratio", "of medians", "paired", "of mins", "of CPU times", "target", ""], args.markdown))
    out.append("")
    out.append(
        f'"first call" is the untimed first call of each case; for camfn 1 target it includes tracing the model '
        f"(torch.fx), the graph rewrite and fake-tensor shape propagation, all cached afterwards. "
        f"The {T}-call reference loops reuse the warm 1-target code path and have no first call of their own. "
        '"paired" is the median over rounds of the ratio of the two calls made in the same round. '
        '"CPU time" is the median process CPU time per call (all threads; it counts OpenMP spin-waiting, so it '
        "is robust to other processes only with --threads 1). Verdicts use the three wall-time ratios: "
        '"met" when all are within the target, "MISSED" when none is. Other processes only ever add time, so '
        "on a shared machine the ratio of mins is the least biased estimate."
    )
    out.append(
        "Outputs are not equalised: camfn and grad-cam resize to the input size, torchcam returns "
        "layer-resolution maps."
    )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ profile
def profile(state: tuple, args: argparse.Namespace) -> str:
    m_camfn, p, x, one, many = state
    out = []
    for label, target in (("1 target", one), (f"{args.targets} targets", many)):
        camfn.gradcam(m_camfn, p, x, args.layer, target)  # warm
        prof = cProfile.Profile()
        prof.enable()
        camfn.gradcam(m_camfn, p, x, args.layer, target)
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
        stats.print_stats(r"camfn|torch/_functorch|torch/fx|functional_call|stateless", 25)
        out.append(f"--- cProfile, camfn.gradcam, {label} (cumulative; camfn, functorch, fx frames) ---")
        out.append(buf.getvalue().split("\n\n", 1)[-1].strip())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
            camfn.gradcam(m_camfn, p, x, args.layer, target)
        out.append(f"--- torch.profiler, camfn.gradcam, {label} (top ops by self CPU time) ---")
        out.append(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ main
def detail(argv: list[str] | None = None) -> None:
    """The Grad-CAM detail: camfn.gradcam against the references, the forward floor and T targets."""
    args = parse(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    for line in header(args):
        print(("- " if args.markdown else "") + line)
    print(flush=True)

    cases, close, agreement, state = build(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the references' deprecation chatter
        for c in cases:
            if c.warm:
                c.first, _, _ = timed(c.fn, device)
                print(f"  first call  {c.group:>5}  {c.name:<32} {fmt(c.first)}", file=sys.stderr, flush=True)
        share = Share()
        for r in range(args.repeats):
            for c in cases:
                if c.slow and r >= args.slow_repeats:
                    continue
                seconds, cpu_seconds, _ = timed(c.fn, device)
                c.times.append(seconds)
                c.cpu.append(cpu_seconds)
            print(
                f"  repeat {r + 1}/{args.repeats} done, {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )

        busy = share.used()

    share = busy if device.type == "cpu" else None
    print(report(cases, args, share))
    if share is not None:
        print(
            f"This process used {share:.0%} of {torch.get_num_threads()} thread(s) x wall time while timing."
            + (
                " The CPUs were shared with other processes: single timings are unreliable; prefer the paired "
                "and min ratios, more --repeats, or --threads 1 with the CPU-time ratios."
                if share < BUSY
                else ""
            )
        )
    print()
    for line in agreement():
        print(("- " if args.markdown else "") + line)
    if args.profile:
        print()
        print(profile(state, args))
    for line in close():
        print(("- " if args.markdown else "") + line)
    print(
        ("- " if args.markdown else "")
        + f"load average at end: {loadavg()}; total wall time {time.perf_counter() - start:.0f} s"
    )


def main(argv: list[str] | None = None) -> None:
    """The Grad-CAM detail (``--gradcam-detail``, its old flag under ``benchmarks.speed``, is accepted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    detail([a for a in argv if a != "--gradcam-detail"])


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
