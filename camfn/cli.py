"""The ``camfn`` command line: ``camfn explain``, ``camfn eval``, ``camfn layers``, ``camfn methods``.

``camfn explain IMAGE... --model resnet18 --layer layer4 --method gradcam --target 281 --out DIR`` writes one
overlay PNG per image and method (``DIR/<image>_<method>.png``, the image's own size times ``--scale``), and
with ``--npy`` the raw map as ``.npy`` (the map at the network input's size, floats in ``[0, 1]``).
``--method all`` (or a comma list) writes one grid picture instead, images x methods
(``DIR/<image>_methods.png``, or ``DIR/methods.png`` for several images). With no image, the shipped shapes
model (:mod:`camfn.shapes`) explains the shipped demo image, offline.

Models (``--model``): ``shapes`` (default, the shipped model); a torchvision classification architecture by
name, with random weights, ``--weights FILE`` (a state dict) or ``--pretrained`` (downloaded by torchvision);
a timm model name when timm is installed; or a ``.pt2`` file written by ``torch.export.save``. Images are
resized so their shorter side is ``--size`` (or to exactly ``HxW``) and normalised with ``--mean``/``--std``
(ImageNet statistics for torchvision and timm models, the benchmark's own for ``shapes``).

``camfn eval DATA --method gradcam --out DIR`` computes maps and metrics over a data set (``shapes``: the
shipped synthetic test split, or an image folder) with :func:`camfn.evaluate`, in resumable shards;
``torchrun --nproc_per_node 2 -m camfn eval ...`` spreads the shards over processes.

Exit codes: 0 success; 2 bad input (missing or unreadable file, unknown model, layer, method or option; the
message says what to do); 1 an unexpected failure (``--debug`` shows the traceback).

Example:
    >>> from camfn.cli import main
    >>> main(["methods"])  # doctest: +ELLIPSIS
    gradcam ... Grad-CAM (Selvaraju et al., 2017).
    ...
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import exporting, targets, viz
from .errors import CamfnError, InputError, OptionError, nearest
from .evaluation import DEFAULT_METRICS
from .files import check_folder
from .images import MAX_PIXELS, ImageFolder, load_image, save_array, save_picture
from .viz import preprocess
from .zoo import Model, load_model

__all__ = [
    "ImageFolder",  # re-exported from camfn.images during the move
    "Model",  # re-exported from camfn.zoo
    "Sample",
    "build_parser",
    "load_image",  # re-exported from camfn.images
    "load_model",  # re-exported from camfn.zoo
    "main",
    "parse_methods",
    "preprocess",  # re-exported from camfn.viz
]

MAX_SCALE = 64
"""Largest ``--scale``; the pictures written must also stay within :data:`camfn.images.MAX_PIXELS`."""


@dataclasses.dataclass
class Sample:
    """One image to explain: a name (output file stem), the picture shown, and the network input."""

    name: str
    picture: Tensor  # (3, H, W) in [0, 1], the image's own size
    x: Tensor  # (1, 3, h, w), resized and normalised


def _demo_sample() -> Sample:
    from . import shapes

    x, label, _ = shapes.demo_image()
    picture = (x[0] * shapes.STD + shapes.MEAN).clamp(0, 1)
    return Sample(f"shapes_demo_{shapes.CLASSES[label]}", picture, x)


def _parse_size(text: str) -> int | tuple[int, int]:
    """``--size``: a shorter side ``224`` or an exact ``HxW``, each side 1..8192."""
    try:
        if "x" in text.lower():
            h, w = (int(v) for v in text.lower().split("x"))
            if 1 <= h <= 8192 and 1 <= w <= 8192:
                return h, w
        elif 1 <= int(text) <= 8192:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"{text!r}: use a whole number from 1 to 8192 (the shorter side) or HxW, e.g. 224 or 224x320"
    )


def _floats(positive: bool) -> Callable[[str], tuple[float, ...]]:
    """``--mean`` / ``--std``: one finite number or three, comma separated (``--std``: each > 0)."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) not in (1, 3) or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
            need = "positive finite numbers" if positive else "finite numbers"
            raise argparse.ArgumentTypeError(
                f"{text!r}: use one number or three, comma separated ({need}, e.g. 0.229,0.224,0.225)"
            )
        return values * 3 if len(values) == 1 else values

    return parse


def _whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole-number flag in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text!r}: use a whole number {span}")
        return value

    return parse


def _unit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use a number between 0 (image only) and 1 (map only)")
    return value


def _colormap(text: str) -> str:
    try:
        viz.colorize(torch.zeros(1, 1), text)
    except OptionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# ---------------------------------------------------------------------------------------------- methods
def _methods() -> dict[str, Callable[..., Any]]:
    from .methods import METHODS

    return dict(METHODS)


def parse_methods(text: str) -> list[str]:
    """``"all"``, one method name or a comma list -> method names; unknown names raise :class:`OptionError`.

    Example:
        >>> from camfn.cli import parse_methods
        >>> parse_methods("gradcam,layercam")
        ['gradcam', 'layercam']
    """
    known = _methods()
    if text.strip() == "all":
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in known:
            hint = nearest(name, known, n=3)
            raise OptionError(
                f"unknown method {name!r}"
                + (f"; did you mean {' or '.join(map(repr, hint))}?" if hint else "")
                + " 'camfn methods' lists them all"
            )
    if not names:
        raise OptionError("--method is empty; name a method (camfn methods lists them) or 'all'")
    return list(dict.fromkeys(names))


def _summary(fn: Callable[..., Any]) -> str:
    lines = (fn.__doc__ or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def _as_map(m: Tensor) -> Tensor:
    """One sample's map as ``(H, W)``; a channel axis (e.g. guided gradients) becomes its absolute sum."""
    m = m.detach().float().cpu()
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim == 3:
        m = m.abs().sum(0)
        m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else torch.zeros_like(m)
    if m.ndim != 2:
        raise InputError(f"the method returned maps of shape {tuple(m.shape)}; camfn explain draws (H, W) maps")
    if not bool(torch.isfinite(m).all()):
        raise InputError(
            "the map holds NaN or Inf values (a non-finite input, weight or score); check --weights, --mean and --std"
        )
    return m


# ---------------------------------------------------------------------------------------------- output
def progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr over ``total`` steps (``.update()``, ``.close()``), or None.

    None when ``enabled`` is False, for a single step, or when tqdm is not installed (an optional dependency:
    ``pip install camfn[progress]``); tqdm itself shows nothing when stderr is not a terminal.
    """
    if not enabled or total <= 1:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, leave=False, disable=None, unit="map")


def _say(args: argparse.Namespace, text: str, err: bool = False) -> None:
    if not args.quiet:
        print(text, file=sys.stderr if err else sys.stdout)


def _target(text: str | None, classes: Sequence[str] | None) -> int | None:
    if text is None:
        return None
    if text.lstrip("-").isdigit():
        value = int(text)
        if value < 0:
            raise OptionError(f"--target {value}: class indices start at 0")
        if value >= 2**31:
            raise OptionError(f"--target {value} is out of range: pass a class index of the model (0..classes - 1)")
        return value
    if classes and text in classes:
        return list(classes).index(text)
    hint = nearest(text, classes or [], n=3)
    raise OptionError(
        f"--target {text!r} is not a class index"
        + (f" nor a class name; did you mean {' or '.join(map(repr, hint))}?" if classes else "")
        + (f" Classes: {', '.join(classes)}" if classes and len(classes) <= 20 else "")
    )


def _pictures(args: argparse.Namespace) -> list[tuple[str, Tensor]]:
    """The images to explain as (file stem, picture); stems made unique."""
    out, stems = [], set()
    for path in args.images:
        picture = load_image(Path(path))
        stem = Path(path).stem
        while stem in stems:  # two images with the same file name in different folders
            stem += "_"
        stems.add(stem)
        out.append((stem, picture))
    return out


def _samples(pictures: list[tuple[str, Tensor]], loaded: Model, size: int | tuple[int, int]) -> list[Sample]:
    if not pictures:
        demo = _demo_sample()
        if loaded.name != "shapes":
            demo.x = preprocess(demo.picture, size, loaded.mean, loaded.std)
        return [demo]
    for name, picture in pictures:
        h, w = viz._target_size(picture.shape[1], picture.shape[2], size)
        if h * w > MAX_PIXELS:
            raise OptionError(f"--size {size}: {name} would become a {h} x {w} input, too large; pass a smaller --size")
    return [Sample(name, picture, preprocess(picture, size, loaded.mean, loaded.std)) for name, picture in pictures]


def _check_picture_sizes(args: argparse.Namespace, pictures: Sequence[Tensor], methods: int) -> None:
    """The pictures ``--scale`` asks for must stay within :data:`~camfn.images.MAX_PIXELS`."""
    if methods == 1:
        pixels = max(p.shape[1] * p.shape[2] for p in pictures) * args.scale**2
    else:
        columns = min(methods + 1, viz.WRAP) if len(pictures) == 1 else methods + 1
        lines = len(pictures) * math.ceil((methods + 1) / columns)
        pixels = (128 * args.scale) ** 2 * columns * lines
    if pixels > MAX_PIXELS:
        raise OptionError(
            f"--scale {args.scale}: the picture would have {pixels} pixels (more than {MAX_PIXELS}); pass a "
            "smaller --scale"
        )


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _run_method(
    fn: Callable[..., Any],
    name: str,
    module: nn.Module,
    params: dict,
    x: Tensor,
    layer: str | None,
    target: int,
    loaded: Model,
) -> Tensor:
    try:
        return fn(module, params, x, layer, target, hooks=loaded.hooks)
    except Exception as e:
        if loaded.hooks == "ignore" and "Guard failed" in str(e):  # an exported program with static shapes
            raise InputError(
                f"{name} evaluates the model on a batch of input copies, but {loaded.name} was exported for a "
                f"fixed input shape ({str(e).splitlines()[0].split(': ', 1)[-1]}). Export with a dynamic batch: "
                "torch.export.export(model, (x,), dynamic_shapes={'x': {0: torch.export.Dim('batch')}})"
            ) from None
        raise


def _explain(args: argparse.Namespace) -> int:
    names = parse_methods(args.method)
    out = Path(args.out)
    check_folder(out, "--out")
    pictures = _pictures(args)  # fail on files before loading a model
    device = _device(args.device)
    loaded = load_model(args.model, Path(args.weights) if args.weights else None, args.pretrained)
    if loaded.note:
        _say(args, f"note: {loaded.note}", err=True)
    target = _target(args.target, loaded.classes)
    size = args.size or loaded.size
    mean, std = args.mean or loaded.mean, args.std or loaded.std
    if args.mean or args.std or args.size:
        loaded = dataclasses.replace(loaded, mean=mean, std=std)
    samples = _samples(pictures, loaded, size)
    _check_picture_sizes(args, [s.picture for s in samples], len(names))
    module = loaded.module.to(device)
    import camfn

    params = camfn.params(module)
    layer = args.layer or loaded.layer
    methods = _methods()
    bar = progress(len(samples) * len(names), not args.quiet)
    maps: dict[str, list[Tensor]] = {n: [] for n in names}
    failed: dict[str, CamfnError] = {}
    titles = []
    try:
        for sample in samples:
            x = sample.x.to(device)
            with torch.no_grad():
                logits = module(x)
            if isinstance(logits, Tensor) and not bool(torch.isfinite(logits).all()):
                raise InputError(
                    f"the model's output for {sample.name} holds NaN or Inf (non-finite weights or input); check "
                    "--weights, --mean and --std"
                )
            num_classes = logits.shape[1] if isinstance(logits, Tensor) and logits.ndim == 2 else None
            chosen = int(targets.classes(target, 1, num_classes)[0](logits)[0, 0])
            label = loaded.classes[chosen] if loaded.classes and chosen < len(loaded.classes) else str(chosen)
            prob = float(torch.softmax(logits[0].float(), 0)[chosen]) if isinstance(logits, Tensor) else math.nan
            titles.append(f"{sample.name}: {label} (p={prob:.2f})")
            for name in names:
                if bar is not None:
                    bar.set_description(f"{sample.name} {name}")
                    bar.update()
                if name in failed:
                    continue
                try:
                    m = _as_map(_run_method(methods[name], name, module, params, x, layer, chosen, loaded)[0])
                except CamfnError as e:
                    if len(names) == 1:
                        raise
                    failed[name] = e
                    continue
                maps[name].append(m)
    finally:
        if bar is not None:
            bar.close()
    if len(failed) == len(names):  # nothing to draw: the first error says why (e.g. an unknown layer)
        raise next(iter(failed.values()))
    for name, e in failed.items():
        _say(args, f"note: {name} skipped: {e}", err=True)
        maps.pop(name)
    layer_text = layer or camfn.default_layer(module, samples[0].x.to(device), hooks=loaded.hooks)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.npy:
        for name, per in maps.items():
            for sample, m in zip(samples, per, strict=True):
                save_array(m.numpy(), out / f"{sample.name}_{name}.npy")
                written.append(out / f"{sample.name}_{name}.npy")
    if len(names) == 1:
        (name,) = maps
        for sample, m, title in zip(samples, maps[name], titles, strict=True):
            path = out / f"{sample.name}_{name}.png"
            save_picture(viz.overlay(sample.picture, m, args.cmap, args.alpha, args.scale), path)
            _say(args, f"wrote {path}  ({name} at {layer_text}, target {title.split(': ', 1)[1]})")
    else:
        path = out / (f"{samples[0].name}_methods.png" if len(samples) == 1 else "methods.png")
        picture = viz.grid(
            [s.picture for s in samples],
            maps,
            cmap=args.cmap,
            alpha=args.alpha,
            cell=128 * args.scale,
            row_titles=titles,
        )
        save_picture(picture, path)
        _say(args, f"wrote {path}  ({len(maps)} methods x {len(samples)} image(s) at {layer_text})")
    for path in written:
        _say(args, f"wrote {path}")
    return 0


def _layers(args: argparse.Namespace) -> int:
    import camfn

    loaded = load_model(args.model, Path(args.weights) if args.weights else None, False)
    size = args.size or loaded.size
    h, w = (size, size) if isinstance(size, int) else size
    infos = camfn.layers(loaded.module, (1, 3, h, w), hooks=loaded.hooks)
    default = camfn.default_layer(loaded.module, (1, 3, h, w), hooks=loaded.hooks)
    if loaded.layer:  # a module path such as "features.5" stands for the last node inside it
        inside = [i.name for i in infos if i.name == loaded.layer or i.name.startswith(loaded.layer + ".")]
        default = inside[-1] if inside else loaded.layer
    width = max(len(i.name) for i in infos)
    kind = max(len(i.module) for i in infos)
    print(f"{'layer':<{width}}  {'module':<{kind}}  output shape for input (1, 3, {h}, {w})")
    for info in infos:
        mark = "  <- default" if info.name == default else ""
        print(f"{info.name:<{width}}  {info.module:<{kind}}  {info.shape if info.shape else '-'}{mark}")
    return 0


def _list_methods(args: argparse.Namespace) -> int:
    methods = _methods()
    width = max(map(len, methods))
    for name, fn in methods.items():
        print(f"{name:<{width}}  {_summary(fn)}")
    return 0


# ---------------------------------------------------------------------------------------------- eval
def _eval_device(name: str) -> torch.device:
    if name != "auto":
        return _device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _eval_target(text: str | None, classes: Sequence[str] | None) -> int | str:
    if text in (None, "label", "top1"):
        return text or "label"
    return _target(text, classes)  # type: ignore[return-value]


def _log_line(line: str) -> None:
    sys.stderr.write(line + "\n")  # one write per line: ranks share the terminal
    sys.stderr.flush()


def _eval(args: argparse.Namespace) -> int:
    from . import evaluation as ev
    from . import shapes

    methods = parse_methods(args.method)
    if len(methods) != 1:
        raise OptionError(f"--method {args.method!r}: camfn eval takes one method per run (one report each)")
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    check_folder(Path(args.out), "--out")
    device = _eval_device(args.device)
    loaded = load_model(args.model, Path(args.weights) if args.weights else None, args.pretrained)
    size = args.size or loaded.size
    if args.data == "shapes":
        side = size if isinstance(size, int) else size[0]
        batch = shapes.make(args.samples, size=side, seed=shapes.TEST_SEED)
        data: Any = torch.utils.data.TensorDataset(batch.images, batch.labels, batch.boxes)
    else:
        mean, std = args.mean or loaded.mean, args.std or loaded.std
        data = ImageFolder(
            Path(args.data), size if isinstance(size, tuple) else (size, size), mean, std, loaded.classes
        )
    module = loaded.module.to(device)
    rank = int(os.environ.get("RANK", "0"))
    options = {n: {"steps": args.steps} for n in names if n in ("deletion", "insertion") and args.steps is not None}
    dtype = {"float16": torch.float16, "float32": torch.float32}[args.maps_dtype]

    def log(line: str) -> None:  # warnings (damaged shards recomputed) are shown even with --quiet
        if not args.quiet or line.startswith("warning:"):
            _log_line(line)

    with warnings.catch_warnings():  # evaluate() both warns and logs each warning: print it once, via log
        warnings.filterwarnings("ignore", category=UserWarning, module=r"camfn\.evaluation")
        report = ev.evaluate(
            methods[0],
            module,
            data,
            args.layer or loaded.layer,
            out_dir=args.out,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            target=_eval_target(args.target, loaded.classes),
            metrics=names,
            metric_options=options,
            maps_dtype=dtype,
            device=device,
            hooks=loaded.hooks,
            log=log,
        )
    if rank == 0:
        for name, reason in report["skipped"].items():
            _say(args, f"note: {name} skipped: {reason}", err=True)
        width = max(map(len, report["metrics"]), default=6)
        _say(args, f"{'metric':<{width}}  {'mean':>8}  {'std':>8}  count")
        for name, m in report["metrics"].items():
            mean, std = (f"{v:8.4f}" if v is not None else f"{'-':>8}" for v in (m["mean"], m["std"]))
            _say(args, f"{name:<{width}}  {mean}  {std}  {m['count']}")
        if report["failed"]:
            shown = ", ".join(str(f["index"]) for f in report["failed"][:20])
            more = " ..." if len(report["failed"]) > 20 else ""
            _say(args, f"note: {len(report['failed'])} sample(s) failed (not scored): {shown}{more}", err=True)
        _say(args, f"wrote {Path(args.out) / 'report.json'} ({report['samples']} samples, {report['shards']} shards)")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``camfn`` (sub-commands ``explain``, ``eval``, ``layers``, ``methods``)."""
    parser = argparse.ArgumentParser(prog="camfn", description="Class activation maps (Grad-CAM family) for PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of unexpected failures")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{explain,eval,layers,methods,app,export}")

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="shapes", help="shapes (default), a torchvision or timm name, or a .pt2 file")
        p.add_argument("--weights", help="state dict file for a named architecture")
        p.add_argument("--size", type=_parse_size, help="input size: shorter side (224) or HxW (default per model)")

    ex = sub.add_parser(
        "explain", help="write overlay pictures of maps", description=(__doc__ or "\n\n").split("\n\n")[1]
    )
    ex.add_argument("images", nargs="*", help="image files (none: the shipped demo image)")
    model_options(ex)
    ex.add_argument("--pretrained", action="store_true", help="download the model's weights (torchvision/timm)")
    ex.add_argument("--layer", help="layer to explain (camfn layers lists them; default: the last spatial one)")
    ex.add_argument("--method", default="gradcam", help="a method, a comma list, or 'all' (a grid); default gradcam")
    ex.add_argument("--target", help="class index or name (default: each image's top-1 class)")
    ex.add_argument("--out", default="out", help="output folder (created; default: out)")
    ex.add_argument("--npy", action="store_true", help="also save each map as .npy")
    ex.add_argument(
        "--cmap", default="jet", type=_colormap, help="jet (default), turbo, viridis, or a matplotlib colormap name"
    )
    ex.add_argument("--alpha", type=_unit, default=0.5, help="map opacity in [0, 1] (default 0.5)")
    ex.add_argument(
        "--scale", type=_whole(1, MAX_SCALE), default=1, help="upscale pictures by this whole factor (default 1)"
    )
    ex.add_argument("--mean", type=_floats(False), help="normalisation mean, 1 or 3 numbers (default per model)")
    ex.add_argument("--std", type=_floats(True), help="normalisation std, 1 or 3 numbers > 0 (default per model)")
    ex.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ex.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    ex.set_defaults(run=_explain)

    ev = sub.add_parser("eval", help="maps and metrics over a data set, in shards (torchrun for several processes)")
    ev.add_argument("data", help="'shapes' (the shipped synthetic test split, with boxes) or a folder of images")
    model_options(ev)
    ev.add_argument("--pretrained", action="store_true", help="download the model's weights (torchvision/timm)")
    ev.add_argument("--layer", help="layer to explain (default: the model's, else the last spatial one)")
    ev.add_argument("--method", default="gradcam", help="one method (default gradcam)")
    ev.add_argument("--target", help="label (default: the data set's label, else top-1), top1, or a class index/name")
    ev.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma list (default: %(default)s)")
    ev.add_argument("--steps", type=_whole(1, 4096), help="deletion/insertion steps (default 32)")
    ev.add_argument("--out", default="out/eval", help="output folder (default out/eval); a rerun resumes it")
    ev.add_argument("--shard-size", type=_whole(1), default=64, help="samples per shard file (default 64)")
    ev.add_argument("--batch-size", type=_whole(1), default=16, help="samples per forward (default 16)")
    ev.add_argument(
        "--samples", type=_whole(1, 1 << 20), default=256, help="images of the shapes test split (default 256)"
    )
    ev.add_argument("--maps-dtype", default="float16", choices=("float16", "float32"), help="stored maps' dtype")
    ev.add_argument("--mean", type=_floats(False), help="normalisation mean for image folders (default per model)")
    ev.add_argument("--std", type=_floats(True), help="normalisation std for image folders (default per model)")
    ev.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when CUDA is there, else cpu), cpu, cuda:N")
    ev.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    ev.set_defaults(run=_eval)

    ly = sub.add_parser("layers", help="list a model's layers with output shapes")
    model_options(ly)
    ly.set_defaults(run=_layers)

    me = sub.add_parser("methods", help="list the methods")
    me.set_defaults(run=_list_methods)

    from .app import add_parser as add_app_parser  # camfn app: the web explorer (extra camfn[app])

    add_app_parser(sub)

    xp = sub.add_parser("export", help="write a .pt2 program (x, target) -> (output, maps) (camfn.export)")
    model_options(xp)
    exporting.add_arguments(xp)
    xp.set_defaults(run=exporting.command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``camfn`` with ``argv`` (default ``sys.argv[1:]``); return the exit code (0, 1 or 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    args.quiet = getattr(args, "quiet", False)
    try:
        return int(args.run(args))
    except CamfnError as e:
        print(f"camfn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("camfn: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(
            f"camfn: unexpected failure: {type(e).__name__}: {e}\n(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
