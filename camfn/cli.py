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
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from . import viz
from .errors import CamfnError, InputError, OptionError, nearest
from .evaluation import DEFAULT_METRICS

__all__ = [
    "ImageFolder",
    "Model",
    "Sample",
    "build_parser",
    "load_image",
    "load_model",
    "main",
    "parse_methods",
    "preprocess",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


# ---------------------------------------------------------------------------------------------- models
@dataclasses.dataclass
class Model:
    """A loaded model and how to feed it: normalisation, default input size and layer, class names."""

    module: nn.Module
    name: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    size: int | tuple[int, int] = 224  # shorter side, or exact (h, w)
    layer: str | None = None  # None: camfn picks the last spatial layer
    classes: Sequence[str] | None = None
    hooks: str = "error"  # "ignore" for exported programs (their hooks only check and unflatten inputs)
    note: str | None = None  # printed once (e.g. "random weights")


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return list(timm.list_models())


def _read_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(
            f"cannot read weights from {path}: {type(e).__name__}: {str(e).splitlines()[0]}. "
            "Pass a state dict saved with torch.save(model.state_dict(), path)"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a state dict (a dict of tensors); save model.state_dict()")
    return state


def _num_classes(state: dict[str, Tensor]) -> int | None:
    """Outputs of the last linear layer in a classifier's state dict (its last 2-d weight)."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(weights[-1].shape[0]) if weights else None


def _load_state(module: nn.Module, state: dict[str, Tensor], name: str, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
        raise InputError(f"the weights in {path} do not fit {name}: {detail}. Check --model") from None


def _shapes_model() -> Model:
    from . import shapes

    return Model(
        shapes.load(),
        "shapes",
        mean=(shapes.MEAN,) * 3,
        std=(shapes.STD,) * 3,
        size=64,
        layer=shapes.LAYER,
        classes=shapes.CLASSES,
    )


def _torchvision_model(name: str, weights: Path | None, pretrained: bool) -> Model:
    import torchvision

    if pretrained:
        try:
            module = torchvision.models.get_model(name, weights="DEFAULT")
        except Exception as e:
            raise InputError(
                f"could not download the pretrained weights of {name} ({type(e).__name__}: {e}). "
                "Check the internet connection, or download the weights elsewhere and pass --weights FILE"
            ) from None
        meta = torchvision.models.get_model_weights(name).DEFAULT.meta
        return Model(module.eval(), name, classes=meta.get("categories"))
    state = _read_state(weights) if weights else None
    classes = _num_classes(state) if state else None
    with torch.random.fork_rng(devices=[]):  # the same random weights on every run, global RNG untouched
        torch.manual_seed(0)
        module = torchvision.models.get_model(name, **({"num_classes": classes} if classes else {}))
    if state is not None:
        _load_state(module, state, name, weights)  # type: ignore[arg-type]
        return Model(module.eval(), name)
    return Model(module.eval(), name, note=f"{name} has random weights: the map shows the network, not the object")


def _timm_model(name: str, weights: Path | None, pretrained: bool) -> Model:
    import timm

    state = _read_state(weights) if weights else None
    kwargs = {"num_classes": _num_classes(state)} if state and _num_classes(state) else {}
    try:
        with torch.random.fork_rng(devices=[]):  # the same random weights on every run, global RNG untouched
            torch.manual_seed(0)
            module = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if not pretrained:
            raise
        raise InputError(
            f"could not download the pretrained weights of {name} ({type(e).__name__}: {e}). "
            "Check the internet connection, or pass --weights FILE"
        ) from None
    if state is not None:
        _load_state(module, state, name, weights)  # type: ignore[arg-type]
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))[1:]
    note = None if (pretrained or state) else f"{name} has random weights: the map shows the network, not the object"
    return Model(
        module.eval(),
        name,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        size=int(min(size)),
        note=note,
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(
            n.endswith(("/constants.pkl", "/code/__torch__.py")) or "/code/__torch__/" in n for n in archive.namelist()
        )


def _exported_model(path: Path) -> Model:
    try:
        program = torch.export.load(path)
    except Exception as e:
        raise InputError(f"cannot load {path} with torch.export.load: {type(e).__name__}: {e}") from None
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = set(program.graph_signature.user_inputs)
    shapes = [tuple(n.meta["val"].shape) for n in placeholders if n.name in user and "val" in n.meta]
    size: int | tuple[int, int] = 224
    if len(shapes) == 1 and len(shapes[0]) == 4 and all(isinstance(s, int) for s in shapes[0][2:]):
        size = (int(shapes[0][2]), int(shapes[0][3]))
    return Model(program.module(), path.name, size=size, hooks="ignore")


def _file_model(path: Path, weights: Path | None) -> Model:
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    if weights is not None:
        raise OptionError("--weights goes with an architecture name (--model resnet18 --weights FILE), not a file")
    if path.suffix == ".pt2":
        return _exported_model(path)
    if _is_torchscript(path):
        raise InputError(
            f"{path} is a TorchScript model, which torch.fx cannot trace. Export the model instead: "
            "torch.export.save(torch.export.export(model, (example_input,)), 'model.pt2'), and pass the .pt2 file"
        )
    raise InputError(
        f"{path} is neither a torch.export program (.pt2) nor TorchScript. For a state dict pass the "
        f"architecture and the file: --model resnet18 --weights {path}"
    )


def load_model(spec: str, weights: Path | None = None, pretrained: bool = False) -> Model:
    """Load ``spec``: ``"shapes"``, a torchvision or timm model name, or a ``.pt2`` file; in eval mode.

    Unknown names raise :class:`~camfn.errors.InputError` listing the nearest known names.

    Example:
        >>> from camfn.cli import load_model
        >>> loaded = load_model("resnet18")
        >>> loaded.module.training, loaded.size, loaded.note
        (False, 224, 'resnet18 has random weights: the map shows the network, not the object')
    """
    if pretrained and weights is not None:
        raise OptionError("pass either --pretrained or --weights FILE, not both")
    if spec == "shapes":
        if weights is not None or pretrained:
            raise OptionError("the shapes model ships with its weights; drop --weights/--pretrained")
        return _shapes_model()
    path = Path(spec)
    if path.suffix in (".pt2", ".pt", ".pth", ".ts", ".zip") or path.exists():
        return _file_model(path, weights)
    if spec in _torchvision_names():
        return _torchvision_model(spec, weights, pretrained)
    timm_names = _timm_names()
    if spec in timm_names:
        return _timm_model(spec, weights, pretrained)
    hint = nearest(spec, ["shapes", *_torchvision_names(), *timm_names], n=5)
    raise InputError(
        f"unknown model {spec!r}. Nearest names: {', '.join(hint) or '(none)'}. Use 'shapes', a torchvision "
        "classification model (torchvision.models.list_models()), a timm model name, or a .pt2 file"
    )


# ---------------------------------------------------------------------------------------------- images
@dataclasses.dataclass
class Sample:
    """One image to explain: a name (output file stem), the picture shown, and the network input."""

    name: str
    picture: Tensor  # (3, H, W) in [0, 1], the image's own size
    x: Tensor  # (1, 3, h, w), resized and normalised


def load_image(path: Path) -> Tensor:
    """Read an image file as ``(3, H, W)`` in ``[0, 1]``; a clear :class:`InputError` when it cannot."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise InputError(f"image not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass image files (e.g. {path}/*.jpg)")
    try:
        with Image.open(path) as image:
            image.load()
            return viz.as_image(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(
            f"cannot read image {path}: {type(e).__name__}: {e}. Pass a PNG, JPEG or other image PIL reads"
        ) from None


def _target_size(h: int, w: int, size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, tuple):
        return size
    short = min(h, w)
    return max(1, round(h * size / short)), max(1, round(w * size / short))


def preprocess(picture: Tensor, size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(3, H, W)`` in ``[0, 1]`` -> network input ``(1, 3, h, w)``: bilinear resize (antialiased), then
    ``(pixel - mean) / std`` per channel. ``size``: the shorter side, or an exact ``(h, w)``.

    Example:
        >>> import torch
        >>> from camfn.cli import preprocess
        >>> preprocess(torch.full((3, 10, 20), 0.5), 5, (0.5,) * 3, (0.25,) * 3).shape
        torch.Size([1, 3, 5, 10])
    """
    h, w = _target_size(picture.shape[1], picture.shape[2], size)
    x = picture[None]
    if (h, w) != tuple(picture.shape[1:]):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, dtype=x.dtype).reshape(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).reshape(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _demo_sample() -> Sample:
    from . import shapes

    x, label, _ = shapes.demo_image()
    picture = (x[0] * shapes.STD + shapes.MEAN).clamp(0, 1)
    return Sample(f"shapes_demo_{shapes.CLASSES[label]}", picture, x)


def _parse_size(text: str) -> int | tuple[int, int]:
    try:
        if "x" in text.lower():
            h, w = (int(v) for v in text.lower().split("x"))
            if h >= 1 and w >= 1:
                return h, w
        elif int(text) >= 1:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: use a whole number (the shorter side) or HxW, e.g. 224 or 224x320")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use one number or three, comma separated (0.485,0.456,0.406)"
        ) from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: use one number or three, comma separated")
    return values * 3 if len(values) == 1 else values


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
    return m


# ---------------------------------------------------------------------------------------------- output
class Progress:
    """A one-line progress bar on a terminal (nothing when quiet or not a terminal)."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total, self.stream, self.done = total, stream, 0
        self.enabled = enabled and total > 1 and getattr(stream, "isatty", lambda: False)()

    def step(self, label: str) -> None:
        if self.enabled:
            filled = round(20 * self.done / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} {label:<24}")
            self.stream.flush()
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 60 + "\r")
            self.stream.flush()


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
        return value
    if classes and text in classes:
        return list(classes).index(text)
    hint = nearest(text, classes or [], n=3)
    raise OptionError(
        f"--target {text!r} is not a class index"
        + (f" nor a class name; did you mean {' or '.join(map(repr, hint))}?" if classes else "")
        + (f" Classes: {', '.join(classes)}" if classes and len(classes) <= 20 else "")
    )


def _samples(args: argparse.Namespace, loaded: Model, size: int | tuple[int, int]) -> list[Sample]:
    if not args.images:
        demo = _demo_sample()
        if loaded.name != "shapes":
            demo.x = preprocess(demo.picture, size, loaded.mean, loaded.std)
        return [demo]
    out, stems = [], set()
    for path in args.images:
        picture = load_image(Path(path))
        stem = Path(path).stem
        while stem in stems:  # two images with the same file name in different folders
            stem += "_"
        stems.add(stem)
        out.append(Sample(stem, picture, preprocess(picture, size, loaded.mean, loaded.std)))
    return out


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
    for path in args.images:  # fail on files before loading a model
        load_image(Path(path))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pass a folder (it is created when missing)")
    device = _device(args.device)
    loaded = load_model(args.model, Path(args.weights) if args.weights else None, args.pretrained)
    if loaded.note:
        _say(args, f"note: {loaded.note}", err=True)
    target = _target(args.target, loaded.classes)
    size = args.size or loaded.size
    mean, std = args.mean or loaded.mean, args.std or loaded.std
    if args.mean or args.std or args.size:
        loaded = dataclasses.replace(loaded, mean=mean, std=std)
    samples = _samples(args, loaded, size)
    module = loaded.module.to(device)
    import camfn

    params = camfn.params(module)
    layer = args.layer or loaded.layer
    methods = _methods()
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(samples) * len(names), sys.stderr, not args.quiet)
    maps: dict[str, list[Tensor]] = {n: [] for n in names}
    failed: dict[str, CamfnError] = {}
    titles = []
    for sample in samples:
        x = sample.x.to(device)
        with torch.no_grad():
            logits = module(x)
        chosen = target if target is not None else int(logits[0].argmax())
        if isinstance(logits, Tensor) and logits.ndim == 2 and chosen >= logits.shape[1]:
            raise OptionError(f"--target {chosen}: the model has {logits.shape[1]} classes (0..{logits.shape[1] - 1})")
        label = loaded.classes[chosen] if loaded.classes and chosen < len(loaded.classes) else str(chosen)
        prob = float(torch.softmax(logits[0].float(), 0)[chosen]) if isinstance(logits, Tensor) else math.nan
        titles.append(f"{sample.name}: {label} (p={prob:.2f})")
        for name in names:
            progress.step(f"{sample.name} {name}")
            if name in failed:
                continue
            try:
                m = _run_method(methods[name], name, module, params, x, layer, chosen, loaded)
            except CamfnError as e:
                if len(names) == 1:
                    progress.close()
                    raise
                failed[name] = e
                continue
            maps[name].append(_as_map(m[0]))
    progress.close()
    if len(failed) == len(names):  # nothing to draw: the first error says why (e.g. an unknown layer)
        raise next(iter(failed.values()))
    for name, e in failed.items():
        _say(args, f"note: {name} skipped: {e}", err=True)
        maps.pop(name)
    layer_text = layer or camfn.default_layer(module, samples[0].x.to(device), hooks=loaded.hooks)
    written = []
    if args.npy:
        import numpy as np

        for name, per in maps.items():
            for sample, m in zip(samples, per, strict=True):
                np.save(out / f"{sample.name}_{name}.npy", m.numpy())
                written.append(out / f"{sample.name}_{name}.npy")
    if len(names) == 1:
        (name,) = maps
        for sample, m, title in zip(samples, maps[name], titles, strict=True):
            path = out / f"{sample.name}_{name}.png"
            viz.overlay(sample.picture, m, args.cmap, args.alpha, args.scale).save(path)
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
        picture.save(path)
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
class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root`` (sorted paths), each resized to exactly ``size`` and normalised; optional labels.

    Labels come from subfolder names when every image sits in a subfolder and every subfolder name is a
    class name of the model (``classes``) or a class index; otherwise items carry no label.
    """

    def __init__(
        self,
        root: Path,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str] | None = None,
    ) -> None:
        if not root.is_dir():
            raise InputError(f"{root} is not a folder; pass 'shapes' or a folder of images")
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        self.size, self.mean, self.std = size, mean, std
        folders = [p.parent.relative_to(root).as_posix() for p in self.paths]
        self.labels: list[int] | None = None
        if all(f != "." and "/" not in f for f in folders):
            if classes and all(f in classes for f in folders):
                self.labels = [list(classes).index(f) for f in folders]
            elif all(f.isdigit() for f in folders):
                self.labels = [int(f) for f in folders]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, int]:
        x = preprocess(load_image(self.paths[i]), self.size, self.mean, self.std)[0]
        return x if self.labels is None else (x, self.labels[i])


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
    device = _eval_device(args.device)
    loaded = load_model(args.model, Path(args.weights) if args.weights else None, args.pretrained)
    size = args.size or loaded.size
    if args.data == "shapes":
        if args.samples < 1:
            raise OptionError(f"--samples {args.samples}: use a positive number of images")
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
    options = {n: {"steps": args.steps} for n in names if n in ("deletion", "insertion") and args.steps}
    dtype = {"float16": torch.float16, "float32": torch.float32}[args.maps_dtype]
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
        log=None if args.quiet else _log_line,
    )
    if rank == 0:
        for name, reason in report["skipped"].items():
            _say(args, f"note: {name} skipped: {reason}", err=True)
        width = max(map(len, report["metrics"]), default=6)
        _say(args, f"{'metric':<{width}}  {'mean':>8}  {'std':>8}  count")
        for name, m in report["metrics"].items():
            _say(args, f"{name:<{width}}  {m['mean']:8.4f}  {m['std']:8.4f}  {m['count']}")
        _say(args, f"wrote {Path(args.out) / 'report.json'} ({report['samples']} samples, {report['shards']} shards)")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``camfn`` (sub-commands ``explain``, ``eval``, ``layers``, ``methods``)."""
    parser = argparse.ArgumentParser(prog="camfn", description="Class activation maps (Grad-CAM family) for PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of unexpected failures")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{explain,eval,layers,methods,app}")

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
    ex.add_argument("--cmap", default="jet", choices=viz.COLORMAPS, help="colormap (default jet)")
    ex.add_argument("--alpha", type=float, default=0.5, help="map opacity in [0, 1] (default 0.5)")
    ex.add_argument("--scale", type=int, default=1, help="upscale pictures by this whole factor (default 1)")
    ex.add_argument("--mean", type=_floats, help="normalisation mean, 1 or 3 numbers (default per model)")
    ex.add_argument("--std", type=_floats, help="normalisation std, 1 or 3 numbers (default per model)")
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
    ev.add_argument("--steps", type=int, help="deletion/insertion steps (default 32)")
    ev.add_argument("--out", default="out/eval", help="output folder (default out/eval); a rerun resumes it")
    ev.add_argument("--shard-size", type=int, default=64, help="samples per shard file (default 64)")
    ev.add_argument("--batch-size", type=int, default=16, help="samples per forward (default 16)")
    ev.add_argument("--samples", type=int, default=256, help="images of the shapes test split (default 256)")
    ev.add_argument("--maps-dtype", default="float16", choices=("float16", "float32"), help="stored maps' dtype")
    ev.add_argument("--mean", type=_floats, help="normalisation mean for image folders (default per model)")
    ev.add_argument("--std", type=_floats, help="normalisation std for image folders (default per model)")
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
    return parser


def _check(args: argparse.Namespace) -> None:
    if getattr(args, "alpha", 0.5) is not None and not 0 <= getattr(args, "alpha", 0.5) <= 1:
        raise OptionError(f"--alpha {args.alpha}: use a number between 0 (image only) and 1 (map only)")
    if getattr(args, "scale", 1) < 1:
        raise OptionError(f"--scale {args.scale}: use a whole number >= 1")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``camfn`` with ``argv`` (default ``sys.argv[1:]``); return the exit code (0, 1 or 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    args.quiet = getattr(args, "quiet", False)
    try:
        _check(args)
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
