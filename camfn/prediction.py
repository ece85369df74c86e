"""One call from an image to an explained prediction, in the spirit of torchcam's ``explain()``.

:func:`explain_prediction` runs the model once for the prediction (its top classes and their softmax
probabilities), computes each method's maps for those classes in one call (a ``(1, T)`` class target),
and with ``out=`` saves a bundle for reproducibility: ``<method>.npy`` (maps ``(T, H, W)``), one overlay
PNG per method and class, and ``manifest.json`` (versions of camfn, torch and torchvision, methods,
layer, input shape, classes, probabilities, options and file names). :func:`load_bundle` reads a bundle
back (JSON and ``.npy`` without pickle: nothing in it can execute code).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import InputError, OptionError, TargetError
from .files import check_folder, read_json, write_bytes, write_json
from .layer_names import default_layer
from .methods import METHODS
from .targets import Output, pick
from .tracing import Model, Params, apply
from .tracing import params as model_params
from .viz import IMAGENET_MEAN, IMAGENET_STD, Colormap, ImageLike, as_image, overlay, preprocess

__all__ = ["Prediction", "explain_prediction", "load_bundle"]

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Prediction:
    """What :func:`explain_prediction` returns.

    ``classes`` and ``scores``: the top classes and their softmax probabilities, best first; ``maps``:
    method name -> maps ``(T, H, W)`` in ``[0, 1]`` (row ``t`` explains ``classes[t]``); ``layer``: the layer
    explained; ``x``: the network input ``(1, 3, H, W)``; ``folder``: where the bundle was saved (or None).
    """

    classes: list[int]
    scores: list[float]
    maps: dict[str, Tensor]
    layer: str
    x: Tensor
    folder: Path | None = None


def _version(package: str) -> str | None:
    """A package's version as it reports it (``torch.__version__``: with its build tag), None if absent."""
    if package != "camfn":
        try:
            return str(importlib.import_module(package).__version__)
        except ImportError:
            return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _network_input(
    image: ImageLike, model_dtype: torch.dtype, mean: Sequence[float], std: Sequence[float], size: Any
) -> Tensor:
    if isinstance(image, Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[0] != 1:
            raise InputError(
                f"image tensor of shape {tuple(image.shape)}: pass one network input (1, C, H, W) or (C, H, W); "
                "explain a batch with the methods themselves (camfn.gradcam(model, params, x, layer, target))"
            )
        if not image.is_floating_point():
            raise InputError(f"image tensor of dtype {image.dtype}: a network input is a float tensor (normalised)")
        return image
    return preprocess(image, size, mean, std).to(model_dtype)


def _json_value(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else repr(value)


def explain_prediction(
    model: Model,
    image: ImageLike,
    *,
    methods: Sequence[str] = ("gradcam",),
    layer: str | None = None,
    top: int = 3,
    out: str | Path | None = None,
    params: Params | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size: int | tuple[int, int] | None = None,
    output: Output = None,
    cmap: Colormap = "jet",
    alpha: float = 0.5,
    options: Mapping[str, Any] | None = None,
) -> Prediction:
    r"""Predict, explain the ``top`` classes with each of ``methods``, and optionally save the result.

    ``image``: a network input tensor ``(1, 3, H, W)`` or ``(3, H, W)`` (used as it is), or a PIL image or
    numpy array, turned into one by :func:`camfn.viz.preprocess` (``size``, ``mean``, ``std``: ImageNet
    by default) in the model's dtype. The prediction is :math:`p = \operatorname{softmax}(y)` of the
    logits :math:`y` (``output=`` selects them from a dict or tuple output); the classes are the ``top``
    largest. Each method runs once with the ``(1, T)`` class target, so its maps equal
    ``camfn.<method>(model, params, x, layer, classes)``. ``layer=None`` is :func:`camfn.default_layer`,
    recorded by name. ``options`` are passed to every method (e.g. ``{"chunk_size": 16}``). ``params``
    defaults to the model's own (:func:`camfn.params`).

    With ``out=`` (a folder, created when missing) every file is written atomically:
    ``<method>.npy``, ``<method>_<rank>_class<c>.png`` (:func:`camfn.viz.overlay` of the map over the
    image) and ``manifest.json``.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> result = camfn.explain_prediction(model, torch.randn(1, 3, 64, 64), top=2)
        >>> len(result.classes), result.maps["gradcam"].shape, result.layer
        (2, torch.Size([2, 64, 64]), 'layer4.1.relu_1')
    """
    if isinstance(methods, str):
        methods = (methods,)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise OptionError(
            f"methods={tuple(methods)!r}: {'unknown ' + repr(unknown) if unknown else 'empty'}; "
            f"pick from camfn.METHODS, e.g. ('gradcam', 'layercam')"
        )
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise OptionError(f"top={top!r}: the number of classes to explain must be a whole number >= 1")
    if out is not None:
        check_folder(Path(out), "out")
    p = model_params(model) if params is None else params
    floats = [v for v in p.values() if isinstance(v, Tensor) and v.is_floating_point()]
    x = _network_input(image, floats[0].dtype if floats else torch.float32, mean, std, size)
    opts = dict(options or {})
    if output is not None:
        opts["output"] = output
    tracing = {k: opts[k] for k in ("hooks", "tracer", "tracer_options") if k in opts}
    with torch.no_grad():
        logits = pick(apply(model, p, x, **tracing), output)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise TargetError(
            f"explain_prediction needs (1, num_classes) logits, the model gives {got}; select them with output="
        )
    k = min(top, logits.shape[1])
    probs, classes = logits.softmax(1).topk(k, 1)
    if layer is None:
        layer = default_layer(model, x, params=p, **tracing)
    maps = {name: METHODS[name](model, p, x, layer, classes, **opts)[0].detach() for name in methods}
    result = Prediction(classes[0].tolist(), probs[0].tolist(), maps, layer, x)
    if out is None:
        return result
    return _save(result, Path(out), image, cmap, alpha, opts)


def _save(result: Prediction, folder: Path, image: ImageLike, cmap: Colormap, alpha: float, opts: dict) -> Prediction:
    folder.mkdir(parents=True, exist_ok=True)
    picture = as_image(result.x[0] if isinstance(image, Tensor) else image)
    files: dict[str, dict[str, Any]] = {}
    for name, m in result.maps.items():
        buffer = io.BytesIO()
        np.save(buffer, m.cpu().numpy(), allow_pickle=False)
        write_bytes(folder / f"{name}.npy", buffer.getvalue())
        pngs = []
        for rank, (c, one) in enumerate(zip(result.classes, m, strict=True)):
            png = io.BytesIO()
            overlay(picture, one.float(), cmap, alpha).save(png, format="PNG")
            pngs.append(f"{name}_{rank}_class{c}.png")
            write_bytes(folder / pngs[-1], png.getvalue())
        files[name] = {"maps": f"{name}.npy", "overlays": pngs}
    manifest = {
        "versions": {p: _version(p) for p in ("camfn", "torch", "torchvision")},
        "methods": list(result.maps),
        "layer": result.layer,
        "input_shape": list(result.x.shape),
        "input_dtype": str(result.x.dtype).removeprefix("torch."),
        "classes": result.classes,
        "scores": result.scores,
        "options": {k: _json_value(v) for k, v in opts.items()},
        "files": files,
    }
    write_json(folder / MANIFEST, manifest)
    return Prediction(result.classes, result.scores, result.maps, result.layer, result.x, folder)


def load_bundle(folder: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A bundle saved by :func:`explain_prediction`: its manifest and the maps of each method (``(T, H, W)``).

    Reads JSON and ``.npy`` only (``allow_pickle=False``); a file the manifest names must lie in ``folder``.

    Example:
        >>> import tempfile, torch, torchvision, camfn
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = camfn.explain_prediction(model, torch.randn(1, 3, 64, 64), top=2, out=d)
        ...     manifest, maps = camfn.prediction.load_bundle(d)
        >>> len(manifest["classes"]), maps["gradcam"].shape
        (2, (2, 64, 64))
    """
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, "bundle manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise InputError(f"{folder / MANIFEST} is not a camfn bundle manifest (no 'files'); pass a bundle folder")
    maps = {}
    for name, entry in manifest["files"].items():
        file = entry.get("maps") if isinstance(entry, dict) else None
        if not isinstance(file, str) or Path(file).name != file:
            raise InputError(f"the manifest names maps file {file!r} for {name!r}; a bundle's files are in its folder")
        try:
            maps[name] = np.load(folder / file, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read {folder / file} ({err}); the bundle is incomplete: save it again") from None
    return manifest, maps
