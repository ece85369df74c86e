"""The race: every camfn method that grad-cam or torchcam also has, timed against them in one process.

Run from the repository root (``--help`` lists the options; the Grad-CAM detail is
``benchmarks/gradcam_detail.py``, the per-call overhead at batch 1 ``benchmarks/overhead.py``)::

    python -m benchmarks.speed --quick --markdown   # resnet18, batch 1, 112 px (2-3 minutes on 2 cores)
    python -m benchmarks.speed --markdown           # resnet18 + resnet50, batches 1 and 8, 224 px (40-60 min)

The methods are those of ``camfn.METHODS`` (in its order) that :data:`REFERENCES` maps to a grad-cam or
torchcam class. For each model (random weights, eval, float32) and batch size, and each method, three
contenders get the same input and one class per image: ``camfn.<method>(model, params, x, layer, classes)``
(default options; maps resized to the input), the grad-cam class (``Class(model,
[model.<layer>[-1]])(input_tensor=x, targets=...)``, numpy maps resized to the input with cv2) and the
torchcam class (``Class(model, layer)``: a forward, then ``extractor(class_idx, scores)``; maps at the layer's
resolution, not resized). Each library has its own ``copy.deepcopy`` of the model (same weights); one
reference extractor lives at a time and its hooks are removed before the next method. Methods that differ
from that plain case say how in :data:`SETUPS` (fields of :class:`Method`): RefineCAM at layer2+3+4, SESS
with 3 scales (a slow method), Finer-CAM on each image's top-1 class (grad-cam picks it), FullGrad with
grad-cam's scaling, LeGrad on a tiny random torchvision ViT of its own (``vit_tiny``, after the CNNs).

FullGrad and ShapleyCAM against grad-cam on resnet50 at batch 8 (grad-cam's FullGrad takes minutes a call)::

    python -m benchmarks.speed --methods fullgrad shapleycam --models resnet50 --batches 8 --repeats 2

Fast methods (one forward and backward each): one untimed call per contender, then ``--repeats`` rounds in
which camfn, grad-cam and torchcam run back to back; the median (and min) per contender is reported.
Slow methods (the Score-CAM family, Ablation-CAM, SmoothGrad-CAM++: tens to thousands of forwards) run only
at ``--slow-batches``, at ``--slow-layer``, with ``--slow-repeats`` timed calls and no warm-up (camfn's first
call includes its tracing, a fraction of a second); SS-CAM and IS-CAM use ``--noise-samples`` noise samples
in both libraries (their defaults, 35 and 10, cost proportionally more).

Peak memory: the peak resident set size during the call minus the resident size just before it, in MiB, via
``benchmarks.common``'s ``clear_refs`` meter (largest over the timed calls); "-" where the kernel does
not allow resetting the peak. Nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # grad-cam's progress bars; read when tqdm is first imported

import argparse
import copy
import functools
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import camfn
from benchmarks.common import (
    BUSY,
    Meter,
    Share,
    Timings,
    can_reset_peak,
    environment,
    fmt,
    last_module,
    loadavg,
    many_forwards,
    maxdiff,
    report_options,
    table,
    write_report,
)

RESULTS = os.path.join("benchmarks", "results", "speed.md")
RESULTS_QUICK = os.path.join("benchmarks", "results", "speed-quick.md")


# ------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """A camfn method and its counterparts: grad-cam / torchcam class names (``None``: the library has none).

    ``slow``: many forwards per call (batch and layer from the ``--slow-*`` options). ``torchcam_call``: how
    torchcam is driven, ``"grad"`` (forward with gradients, scores passed) or ``"forward"`` (no_grad forward).
    The rest is how a method differs from "one layer, one class per image, default options" (:data:`SETUPS`):
    ``layers`` (a list of layers instead of ``--layer``: camfn gets the names, grad-cam the modules, torchcam
    the names), ``options`` (passed alike to camfn and to the references' constructors), ``ours`` (camfn
    options only, e.g. the grad-cam convention where camfn's default differs), ``target``
    (``"top1"``: every library explains each image's top-1 class and picks it itself), ``model`` (a model of
    :data:`OWN_MODELS` raced instead of ``--models``).
    """

    name: str
    gradcam: str | None
    torchcam: str | None
    slow: bool = False
    torchcam_call: str = "grad"
    layers: tuple[str, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    ours: dict[str, Any] = field(default_factory=dict)
    target: str = "classes"
    model: str | None = None


REFERENCES: dict[str, tuple[str | None, str | None]] = {
    "gradcam": ("GradCAM", "GradCAM"),
    "gradcampp": ("GradCAMPlusPlus", "GradCAMpp"),
    "xgradcam": ("XGradCAM", "XGradCAM"),
    "layercam": ("LayerCAM", "LayerCAM"),
    "hirescam": ("HiResCAM", None),
    "gradcam_elementwise": ("GradCAMElementWise", None),
    "eigencam": ("EigenCAM", None),
    "eigengradcam": ("EigenGradCAM", None),
    "cam": (None, "CAM"),
    "smooth_gradcampp": (None, "SmoothGradCAMpp"),  # n=4 gradient passes: timed like the fast ones
    "ablationcam": ("AblationCAM", None),
    "scorecam": ("ScoreCAM", "ScoreCAM"),
    "sscam": (None, "SSCAM"),
    "iscam": (None, "ISCAM"),
    "fullgrad": ("FullGrad", None),  # layer-free: grad-cam prints that it ignores the layer
    "shapleycam": ("ShapleyCAM", None),
    "segeigencam": ("SegEigenCAM", None),
    "kpcacam": ("KPCA_CAM", None),
    "fem": ("FEM", None),
    "randomcam": ("RandomCAM", None),  # random weights: times only (sobel, model-free, is not raced)
    "finercam": ("FinerCAM", "FinerCAM"),  # camfn's default is grad-cam's convention; torchcam's differs
    "refinecam": ("RefineCAM", "RefineCAM"),  # both references default to Grad-CAM++ as camfn
    "sess": ("SESS", None),
    "legrad": (None, "LeGrad"),
}
"""camfn method name -> (grad-cam class, torchcam class): the one fact about a method camfn cannot know."""

VIT_BLOCKS = ("encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1")


def tiny_vit(size: int) -> nn.Module:
    """A torchvision ViT with random weights at ``size`` px: 2 blocks of width 64, patches of 16 (LeGrad's model)."""
    model = torchvision.models.VisionTransformer(
        image_size=size, patch_size=16, num_layers=len(VIT_BLOCKS), num_heads=2, hidden_dim=64, mlp_dim=128
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head to zeros
    return model.eval()


OWN_MODELS: dict[str, Callable[[int], nn.Module]] = {"vit_tiny": tiny_vit}
"""Models a method needs instead of the ``--models`` CNNs: name -> builder of the image size."""

SETUPS: dict[str, dict[str, Any]] = {
    "fullgrad": {"ours": {"scaling": "gradcam"}},  # grad-cam's per-channel scaling (camfn's default: the paper's)
    "finercam": {"target": "top1"},  # grad-cam's FinerCAM picks the main class itself (targets=None)
    "refinecam": {"layers": ("layer2", "layer3", "layer4")},
    "sess": {"slow": True, "options": {"num_scales": 3}},  # 12 scales at 224 px: ~150 patches per image
    "legrad": {"layers": VIT_BLOCKS, "model": "vit_tiny"},
}
"""camfn method name -> the :class:`Method` fields that differ from the plain case."""


def torchcam_way(name: str) -> str:
    """torchcam's gradient methods take the scores of a forward with gradients; the others a no_grad forward."""
    try:
        import torchcam.methods
    except ImportError:  # the references are optional until the race runs
        return "grad"
    cls = getattr(torchcam.methods, REFERENCES[name][1] or "", None)
    return "grad" if cls is None or cls.__module__ == "torchcam.methods.gradient" else "forward"


METHODS = tuple(
    Method(
        name,
        *REFERENCES[name],
        **{"slow": many_forwards(name), "torchcam_call": torchcam_way(name), **SETUPS.get(name, {})},
    )
    for name in camfn.METHODS
    if name in REFERENCES
)
BY_NAME = {m.name: m for m in METHODS}
QUICK_METHODS = [m.name for m in METHODS if not m.slow] + ["scorecam"]

FULL_DURATION = (
    f"The full run (resnet18 and resnet50, batches 1 and 8, 224 px, all {len(METHODS)} methods) takes an "
    "estimated 40-60 minutes on 2 idle cores, two thirds of it resnet50's Score-CAM family at batch 1 "
    "(layer4 has 2048 channels: 2048 forwards per call and library; SS-CAM and IS-CAM twice that with "
    "--noise-samples 2); without the slow methods (--methods gradcam gradcampp xgradcam layercam hirescam"
    " gradcam_elementwise eigencam eigengradcam cam) about 10 minutes. --quick: 2-3 minutes on idle cores"
    " (measured 194 s with the load average at 9). On a shared machine add --threads 1 and read the "
    "CPU-time ratios."
)


# ------------------------------------------------------------------------------------------ options
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description="The race: camfn's methods against grad-cam and torchcam, time and peak memory. "
        "(The Grad-CAM detail: python -m benchmarks.gradcam_detail.)",
        epilog=FULL_DURATION,
    )
    names = [m.name for m in METHODS]
    fast = len(names) - sum(m.slow for m in METHODS)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=names,
        default=None,
        help=f"[all {len(names)}; --quick: the {fast} fast + scorecam]",
    )
    parser.add_argument(
        "--models", nargs="+", default=None, help="torchvision models [resnet18 resnet50; --quick: resnet18]"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=None, help="batch sizes of fast methods [1 8; --quick: 1]"
    )
    parser.add_argument("--size", type=int, default=None, help="image side in pixels [224; --quick: 112]")
    parser.add_argument("--layer", default="layer4", help="layer of the fast methods [layer4]")
    parser.add_argument("--slow-layer", default=None, help="layer of the slow methods [layer4; --quick: layer3]")
    parser.add_argument("--slow-batches", type=int, nargs="+", default=[1], help="batch sizes of slow methods [1]")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds of fast methods [5; --quick: 3]")
    parser.add_argument("--slow-repeats", type=int, default=1, help="timed calls of slow methods, no warm-up [1]")
    parser.add_argument(
        "--noise-samples", type=int, default=2, help="n of sscam and iscam in both libraries (defaults 35, 10) [2]"
    )
    parser.add_argument("--quick", action="store_true", help="resnet18, batch 1, 112 px, fast methods + scorecam")
    parser.add_argument(
        "--kind",
        choices=("all", "fast", "slow"),
        default="all",
        help="race only the fast (one forward and backward) or the slow (many forwards) methods [all]",
    )
    report_options(parser, RESULTS, RESULTS_QUICK)
    if "--gradcam-detail" in (sys.argv[1:] if argv is None else argv):
        parser.error("the Grad-CAM detail has its own script: python -m benchmarks.gradcam_detail")
    args = parser.parse_args(argv)
    quick = {"methods": QUICK_METHODS, "models": ["resnet18"], "batches": [1], "size": 112, "repeats": 3}
    quick["slow_layer"] = "layer3"
    full = {"methods": names, "models": ["resnet18", "resnet50"], "batches": [1, 8], "size": 224, "repeats": 5}
    full["slow_layer"] = args.layer
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.kind != "all":
        args.methods = [m for m in args.methods if BY_NAME[m].slow == (args.kind == "slow")]
    if args.markdown == "":
        args.markdown = RESULTS_QUICK if args.quick else RESULTS
    if min(args.repeats, args.slow_repeats, args.noise_samples, *args.batches, *args.slow_batches) < 1:
        parser.error("--repeats, --slow-repeats, --noise-samples, --batches and --slow-batches must be at least 1")
    return args


# ------------------------------------------------------------------------------------------ contenders
@dataclass
class Contender(Timings):
    """One library's call of one method: its timings (s), peaks (MiB above the RSS before the call), output."""

    library: str
    fn: Callable[[], Any]
    first: float | None = None
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per call (all threads)
    peaks: list[float] = field(default_factory=list)
    output: Any = None

    @property
    def peak(self) -> float | None:
        return max(self.peaks) if self.peaks else None


@dataclass
class Result:
    """One row of the report: a method at one (model, batch), its contenders in order camfn, grad-cam, torchcam."""

    model: str
    batch: int
    method: str
    layer: str
    contenders: dict[str, Contender]
    note: str = ""


def camfn_options(method: Method, args: argparse.Namespace) -> dict[str, Any]:
    """The method's own race options, and ``n=--noise-samples`` for the noise-sampling Score methods."""
    noise = method.slow and "n" in camfn.METHODS[method.name].spec.options
    return {**method.options, **method.ours, **({"n": args.noise_samples} if noise else {})}


def torchcam_options(method: Method, args: argparse.Namespace, cls: type) -> dict[str, Any]:
    import inspect

    options: dict[str, Any] = {}
    if "input_shape" in inspect.signature(cls).parameters:
        options["input_shape"] = (3, args.size, args.size)
    if method.name == "cam":
        options["fc_layer"] = "fc"
    if "n" in camfn_options(method, args):
        options["num_samples"] = args.noise_samples
    return options


def layer_of(method: Method, args: argparse.Namespace) -> str | list[str]:
    """The layer (or list of layers) the method is raced at."""
    if method.layers is not None:
        return list(method.layers)
    return args.slow_layer if method.slow else args.layer


def gradcam_extractor(method: Method, model: nn.Module, layer: str | list[str]):
    """The grad-cam object and a function that removes its hooks (also of the base methods it wraps)."""
    import pytorch_grad_cam

    layers = [last_module(model, name) for name in ([layer] if isinstance(layer, str) else layer)]
    extractor = getattr(pytorch_grad_cam, method.gradcam)(model, layers, **method.options)
    inner = [extractor, getattr(extractor, "base_cam", None), *getattr(extractor, "base_cam_per_layer", [])]
    hooks = [e.activations_and_grads for e in inner if hasattr(e, "activations_and_grads")]

    def release() -> None:
        for h in hooks:
            h.release()

    return extractor, release


def torchcam_extractor(method: Method, model: nn.Module, layer: str | list[str], args: argparse.Namespace):
    """The torchcam object and a function that removes its hooks."""
    import torchcam.methods

    cls = getattr(torchcam.methods, method.torchcam)
    extractor = cls(model, layer, **torchcam_options(method, args, cls))
    return extractor, extractor.remove_hooks


def gradcam_call(extractor, x: Tensor, classes: list[int] | None) -> np.ndarray:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = None if classes is None else [ClassifierOutputTarget(c) for c in classes]
    return extractor(input_tensor=x, targets=targets)


def torchcam_call(extractor, model: nn.Module, x: Tensor, classes: list[int] | None, how: str) -> Tensor:
    if how == "grad":
        with torch.enable_grad():
            scores = model(x)
            picked = scores.argmax(1).tolist() if classes is None else classes
            return extractor(class_idx=picked, scores=scores)[0]
    with torch.no_grad():
        scores = model(x)
    return extractor(class_idx=scores.argmax(1).tolist() if classes is None else classes)[0]


# ------------------------------------------------------------------------------------------ running
def measure(contender: Contender, meter: Meter, timed_call: bool = True) -> None:
    seconds, cpu_seconds, out, peak = meter(contender.fn)
    contender.output = out
    if not timed_call:
        contender.first = seconds
        return
    contender.times.append(seconds)
    contender.cpu.append(cpu_seconds)
    if peak is not None:
        contender.peaks.append(peak)


def run_method(
    method: Method,
    models: dict[str, nn.Module],
    params: dict[str, Tensor],
    x: Tensor,
    classes: Tensor,
    args: argparse.Namespace,
    meter: Meter,
    label: str,
) -> Result:
    """Time camfn and the references on one method; the references' hooks are removed afterwards."""
    layer = layer_of(method, args)
    top1 = method.target == "top1"  # every library picks each image's top-1 class itself
    listed = None if top1 else classes.tolist()
    fn = functools.partial(
        camfn.METHODS[method.name],
        models["camfn"],
        params,
        x,
        layer,
        None if top1 else classes,
        **camfn_options(method, args),
    )
    contenders = {"camfn": Contender("camfn", fn)}
    releases = []
    try:
        if method.gradcam is not None:
            gc, release = gradcam_extractor(method, models["grad-cam"], layer)
            releases.append(release)
            contenders["grad-cam"] = Contender("grad-cam", functools.partial(gradcam_call, gc, x, listed))
        if method.torchcam is not None:
            tc, release = torchcam_extractor(method, models["torchcam"], layer, args)
            releases.append(release)
            contenders["torchcam"] = Contender(
                "torchcam", functools.partial(torchcam_call, tc, models["torchcam"], x, listed, method.torchcam_call)
            )
        repeats = args.slow_repeats if method.slow else args.repeats
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the references' deprecation chatter
            if not method.slow:
                for c in contenders.values():
                    measure(c, meter, timed_call=False)
            for r in range(repeats):
                for c in contenders.values():
                    measure(c, meter)
                    print(
                        f"  {label:<22} {method.name:<20} {c.library:<9} call {r + 1}/{repeats} "
                        f"{fmt(c.times[-1]):>8}  load {os.getloadavg()[0]:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for release in releases:
            release()
    note = ", ".join(f"{k}={v}" for k, v in camfn_options(method, args).items()) + (" top-1" if top1 else "")
    shown = layer if isinstance(layer, str) else "+".join(name.rsplit(".", 1)[-1] for name in layer)
    return Result("", x.shape[0], method.name, shown, contenders, note.strip())


def methods_on(model_name: str, args: argparse.Namespace) -> list[str]:
    """The chosen methods raced on ``model_name``: those with it as their own model, else those without one."""
    own = model_name if model_name in OWN_MODELS else None
    return [m for m in args.methods if BY_NAME[m].model == own]


def race_model(model_name: str, args: argparse.Namespace, meter: Meter, methods: list[str]) -> list[Result]:
    """``methods`` on one model, for each batch size (slow methods only at the slow batch sizes)."""
    torch.manual_seed(args.seed)
    build = OWN_MODELS.get(model_name)
    base = build(args.size) if build else torchvision.models.get_model(model_name, weights=None).eval()
    gen = torch.Generator().manual_seed(args.seed)
    batches = sorted(set(args.batches) | set(args.slow_batches))
    biggest = max(batches)
    x_all = torch.randn(biggest, 3, args.size, args.size, generator=gen)
    with torch.no_grad():
        num_classes = base(x_all[:1]).shape[1]
    c_all = torch.randint(0, num_classes, (biggest,), generator=gen)
    models = {name: copy.deepcopy(base) for name in ("camfn", "grad-cam", "torchcam")}
    params = camfn.params(models["camfn"])
    camfn.tracing.trace(models["camfn"])  # the one-time fx trace is not part of any timed call (see "first call")
    results = []
    for b in batches:
        x, classes = x_all[:b].clone(), c_all[:b].clone()
        for name in methods:
            method = BY_NAME[name]
            if b not in (args.slow_batches if method.slow else args.batches):
                continue
            result = run_method(method, models, params, x, classes, args, meter, f"{model_name}, batch {b}")
            result.model = model_name
            results.append(result)
    return results


# ------------------------------------------------------------------------------------------ report
def speedup(result: Result) -> str:
    """Median time of the faster reference over camfn's median, the same ratio of mins and of CPU times."""
    refs = [c for name, c in result.contenders.items() if name != "camfn" and c.times]
    ours = result.contenders["camfn"]
    if not refs or not ours.times:
        return "-"
    faster = min(refs, key=lambda c: c.median)
    return (
        f"{faster.median / ours.median:.2f}x vs {faster.library} (mins {faster.best / ours.best:.2f}x, "
        f"CPU {faster.cpu_median / ours.cpu_median:.2f}x)"
    )


def agreement(result: Result) -> str:
    """camfn vs grad-cam (both resized to the input, in [0, 1]); noise-based and sign-free methods differ."""
    ours, ref = result.contenders["camfn"], result.contenders.get("grad-cam")
    if ref is None or ours.output is None or ref.output is None:
        return "-"
    diff = maxdiff(ours.output.cpu(), ref.output)
    return f"{diff:.1e}" + (" (sign-free)" if camfn.METHODS[result.method].spec.eigen else "")


def cell(result: Result, library: str, what: str) -> str:
    c = result.contenders.get(library)
    if c is None or not c.times:
        return "-"
    if what == "time":
        return fmt(c.median)
    return "-" if c.peak is None else f"{c.peak:.0f}"


def rows_of(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        ours = r.contenders["camfn"]
        rows.append(
            [
                f"`{r.method}`" + (f" ({r.note})" if r.note else ""),
                r.layer,
                str(len(ours.times)),
                fmt(ours.first),
                cell(r, "camfn", "time"),
                cell(r, "grad-cam", "time"),
                cell(r, "torchcam", "time"),
                speedup(r),
                cell(r, "camfn", "peak"),
                f"{cell(r, 'grad-cam', 'peak')} / {cell(r, 'torchcam', 'peak')}",
                agreement(r),
            ]
        )
    return rows


HEAD = [
    "method",
    "layer",
    "n",
    "camfn first call",
    "camfn median",
    "grad-cam median",
    "torchcam median",
    "speed-up of camfn over the faster reference",
    "camfn peak MiB",
    "grad-cam / torchcam peak MiB",
    "max abs diff vs grad-cam",
]

NOTES = (
    '"n": timed calls per contender (fast methods: after one untimed call each, in rounds; slow methods: no '
    'warm-up, but the model is traced before any timing). "camfn first call": the untimed first call of a fast '
    "method (the trace itself happens once per model before timing; cached afterwards). "
    "\"speed-up\": the faster reference's median over camfn's median "
    "(above 1: camfn is faster), the same for the fastest calls and for the median process CPU times (all "
    'threads; with --threads 1 robust to other processes on the machine). "peak MiB": peak resident memory '
    'during the call minus the resident memory just before it (largest over the timed calls). "max abs diff": '
    "camfn's maps against grad-cam's, both resized to the input and min-max normalised to [0, 1]; eigen methods "
    "have no sign in grad-cam, noise-based methods draw different noise. Outputs are not equalised: camfn and "
    "grad-cam resize to the input (grad-cam with cv2 on numpy, per map), torchcam returns layer-resolution maps."
)


def report(results: list[Result], args: argparse.Namespace) -> str:
    out = []
    for key in dict.fromkeys((r.model, r.batch) for r in results):
        group = [r for r in results if (r.model, r.batch) == key]
        out += [f"### {key[0]}, batch {key[1]}, {args.size} px", "", table(rows_of(group), HEAD, True), ""]
    out.append(NOTES)
    return "\n".join(out)


def header(args: argparse.Namespace, argv: list[str], memory: bool) -> list[str]:
    slow = [m for m in args.methods if BY_NAME[m].slow]
    lines = [
        "command: `python -m benchmarks.speed" + (" " + shlex.join(argv) if argv else "") + "`",
        *environment(),
        f"models {', '.join(args.models)} (random weights, eval, float32, CPU), {args.size}x{args.size} px, one "
        f"class per image; fast methods: layer {args.layer!r}, batches {', '.join(map(str, args.batches))}, median "
        f"of {args.repeats} rounds after one untimed call",
    ]
    if slow:
        lines.append(
            f"slow methods ({', '.join(slow)}): layer {args.slow_layer!r}, batch "
            f"{', '.join(map(str, args.slow_batches))} only, {args.slow_repeats} timed call(s), no warm-up"
            + (
                f"; sscam/iscam with n={args.noise_samples} in both libraries"
                if any("n" in camfn_options(BY_NAME[m], args) for m in slow)
                else ""
            )
        )
    lines.append("peak memory: " + ("clear_refs + VmHWM" if memory else "not measured (clear_refs not writable)"))
    return lines


# ------------------------------------------------------------------------------------------ main
def race(argv: list[str] | None = None) -> str:
    """Run the race; print (and with ``--markdown``, write) the report; return it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    memory = can_reset_peak()
    lines = ["- " + line for line in header(args, argv, memory)]
    print("\n".join(lines), flush=True)
    meter = Meter(memory)
    share = Share()
    results = []
    own = dict.fromkeys(BY_NAME[m].model for m in args.methods if BY_NAME[m].model)  # e.g. LeGrad's ViT
    for model_name in (*args.models, *own):
        methods = methods_on(model_name, args)
        if methods:
            results += race_model(model_name, args, meter, methods)
    busy = share.used()
    text = "\n".join(
        [
            *lines,
            "",
            report(results, args),
            "",
            f"- load average at end: {loadavg()}; total wall time {time.perf_counter() - start:.0f} s; this process "
            f"used {busy:.0%} of {torch.get_num_threads()} thread(s) x wall time"
            + (" (the CPUs were shared with other processes: timings are noisy)" if busy < BUSY else ""),
        ]
    )
    print("\n" + text[len("\n".join(lines)) :].lstrip("\n"))
    if args.markdown is not None:
        write_report(args.markdown, "Speed: camfn against grad-cam and torchcam", text)
    return text


if __name__ == "__main__":
    race()
