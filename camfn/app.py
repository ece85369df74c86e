"""``camfn app``: a web page to explore maps (Gradio, the optional extra ``pip install 'camfn[app]'``).

Pick or upload an image (the shipped demo image by default, offline), a model (``shapes``, a torchvision or
timm name with random or ``--weights`` weights, a ``.pt2`` file), a layer from a list showing each layer's
output shape, one or several methods and a target among the top-5 classes; "Explain" shows the overlays side
by side with the predicted class and each method's time, and offers the maps (``.npy``, at the network
input's size) and the pictures (``.png``) for download. A bad input shows camfn's message on the page.

The logic lives in plain functions (:func:`load`, :func:`sample`, :func:`layer_choices`,
:func:`top_classes`, :func:`explain`, :func:`write_downloads`, :func:`status_html`), usable without a
browser; :func:`build` only lays out the page and wires the events.

Example:
    >>> from camfn import app
    >>> loaded = app.load("shapes")
    >>> demo = app.sample(loaded)
    >>> [(label, round(p, 2)) for _, label, p in app.top_classes(loaded, demo)][:1]
    [('triangle', 0.99)]
    >>> result = app.explain(loaded, demo, "features.5", ["gradcam"], target=None)
    >>> result.panels[0].method, tuple(result.panels[0].map.shape), result.panels[0].overlay.size
    ('gradcam', (64, 64), (256, 256))
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import html
import inspect
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import viz
from .cli import Sample, _as_map, _demo_sample, _run_method
from .errors import CamfnError, InputError, OptionError, TargetError
from .images import load_image
from .layer_names import default_layer, layers
from .methods import METHODS
from .tracing import params
from .viz import preprocess
from .zoo import Model, load_model

__all__ = [
    "Explanation",
    "Panel",
    "add_parser",
    "build",
    "explain",
    "layer_choices",
    "load",
    "sample",
    "status_html",
    "top_classes",
    "write_downloads",
]

MODELS = ("shapes", "resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vgg16")
"""Models offered in the page's list (any torchvision or timm name, or a ``.pt2`` path, can be typed in)."""

DISPLAY = 256
"""Overlays are upscaled by a whole factor so their longer side reaches about this many pixels."""

Progress = Callable[[int, int, str], None]  # (done, total, what is running)


@dataclasses.dataclass
class Panel:
    """One method's result: the map ``(H, W)`` at the network input's size, its overlay and seconds taken."""

    method: str
    map: Tensor
    overlay: Image.Image
    seconds: float


@dataclasses.dataclass
class Explanation:
    """What "Explain" shows: the predicted and explained classes, the layer, one panel per method that
    worked, and camfn's message for each method that failed."""

    sample: str
    predicted: str
    target: str
    layer: str
    panels: list[Panel]
    errors: dict[str, str]


# ---------------------------------------------------------------------------------------------- logic
@functools.lru_cache(maxsize=4)
def load(model: str, weights: str | None = None) -> Model:
    """The model ``model`` (``"shapes"``, a torchvision/timm name or a ``.pt2`` path) with optional state-dict
    ``weights``, through the command line's loader; cached, so switching back and forth is instant.

    Example:
        >>> from camfn import app
        >>> app.load("shapes").name, app.load("shapes") is app.load("shapes")
        ('shapes', True)
    """
    return load_model(model.strip(), Path(weights) if weights else None)


def sample(loaded: Model, image: str | Path | None = None) -> Sample:
    """The picture and network input for ``image`` (a file path; ``None``: the shipped demo image), resized and
    normalised as ``loaded`` expects. An unreadable file raises :class:`~camfn.errors.InputError`.

    Example:
        >>> from camfn import app
        >>> demo = app.sample(app.load("shapes"))
        >>> demo.name, tuple(demo.picture.shape), tuple(demo.x.shape)
        ('shapes_demo_triangle', (3, 64, 64), (1, 3, 64, 64))
    """
    if image is None:
        demo = _demo_sample()
        if loaded.name != "shapes":
            demo.x = preprocess(demo.picture, loaded.size, loaded.mean, loaded.std)
        return demo
    picture = load_image(Path(image))
    return Sample(Path(image).stem, picture, preprocess(picture, loaded.size, loaded.mean, loaded.std))


_LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()  # module -> shape -> ...


def _layer_infos(loaded: Model, shape: tuple[int, ...]) -> tuple[list[tuple[str, str]], str]:
    known = _LAYERS.setdefault(loaded.module, {})
    if shape in known:
        return known[shape]
    infos = layers(loaded.module, shape, hooks=loaded.hooks)
    default = default_layer(loaded.module, shape, hooks=loaded.hooks)
    if loaded.layer:  # a module path such as "features.5" stands for the last node inside it
        inside = [i.name for i in infos if i.name == loaded.layer or i.name.startswith(loaded.layer + ".")]
        default = inside[-1] if inside else loaded.layer
    labels = [(f"{i.name}  ·  {i.module}  ·  {i.shape}", i.name) for i in infos if i.shape is not None]
    known[shape] = labels, default
    return labels, default


def layer_choices(loaded: Model, item: Sample) -> tuple[list[tuple[str, str]], str]:
    """Every layer of ``loaded`` as ``(label, name)`` with its output shape for ``item``'s input (from
    :func:`camfn.layers`), in execution order, and the default layer's name (the model's, else the last
    spatial one). Nodes without a tensor output (shape checks) are left out; layers with no spatial output
    are listed: choosing one shows camfn's message saying why it cannot be used.

    Example:
        >>> from camfn import app
        >>> loaded = app.load("shapes")
        >>> choices, default = app.layer_choices(loaded, app.sample(loaded))
        >>> choices[-1], default
        (('fc  ·  Linear  ·  (1, 5)', 'fc'), 'features.5.2')
    """
    return _layer_infos(loaded, tuple(item.x.shape))


def _class_name(loaded: Model, index: int) -> str:
    return loaded.classes[index] if loaded.classes and index < len(loaded.classes) else str(index)


def _logits(loaded: Model, x: Tensor) -> Tensor:
    with torch.no_grad():
        out = loaded.module(x)
    if not isinstance(out, Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InputError(f"the model returns {shape}; camfn app explains classifiers with (1, classes) logits")
    return out[0].float()


def top_classes(loaded: Model, item: Sample, k: int = 5) -> list[tuple[int, str, float]]:
    """The ``k`` most probable classes for ``item`` as ``(index, name, softmax probability)``, best first.

    Example:
        >>> from camfn import app
        >>> loaded = app.load("shapes")
        >>> [name for _, name, _ in app.top_classes(loaded, app.sample(loaded), k=2)]
        ['triangle', 'circle']
    """
    probs = torch.softmax(_logits(loaded, item.x), 0)
    values, indices = probs.topk(min(k, probs.numel()))
    return [(int(i), _class_name(loaded, int(i)), float(v)) for v, i in zip(values, indices, strict=True)]


def _accepts_progress(fn: Callable[..., Any]) -> bool:
    try:
        return "progress" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _display_scale(picture: Tensor) -> int:
    return max(1, round(DISPLAY / max(picture.shape[1:])))


def explain(
    loaded: Model,
    item: Sample,
    layer: str | None,
    methods: Sequence[str],
    target: int | None = None,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    progress: Progress | None = None,
) -> Explanation:
    """Run each of ``methods`` on ``item`` at ``layer`` for class ``target`` (``None``: the top-1 class).

    Each panel's ``map`` is the method's map at the network input's size and its ``overlay`` is
    ``viz.overlay(item.picture, map, cmap, alpha, scale)``, ``scale`` a whole factor making the longer side
    about :data:`DISPLAY` pixels. A method raising a :class:`~camfn.errors.CamfnError` (e.g. a layer with no
    spatial output) leaves its message in ``errors`` and the other methods still run. ``progress(done, total,
    name)`` is called before each method (slow methods then also draw tqdm bars, which the page tracks).
    Bad methods, target or options raise before any method runs.

    Example:
        >>> from camfn import app
        >>> loaded = app.load("shapes")
        >>> bad = app.explain(loaded, app.sample(loaded), "fc", ["gradcam"])
        >>> bad.panels, bad.errors["gradcam"][:36]
        ([], "layer 'fc' outputs (1, 5), not a (B,")
    """
    names = list(dict.fromkeys(methods))
    if not names:
        raise OptionError("no method chosen: tick at least one method (gradcam is a fast start)")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise OptionError(f"unknown method(s) {', '.join(unknown)}; choose among {', '.join(METHODS)}")
    viz.colorize(torch.zeros(1, 1), cmap)  # an unknown colormap fails here, with camfn's message
    if not 0 <= alpha <= 1:
        raise OptionError(f"alpha={alpha!r}: use a number between 0 (image only) and 1 (map only)")
    logits = _logits(loaded, item.x)
    predicted = int(logits.argmax())
    chosen = predicted if target is None else int(target)
    if not 0 <= chosen < logits.numel():
        raise TargetError(f"target {chosen}: the model has {logits.numel()} classes; pick 0..{logits.numel() - 1}")
    probs = torch.softmax(logits, 0)
    layer = layer or None
    weights = params(loaded.module)
    panels, errors = [], {}
    for done, name in enumerate(names):
        if progress is not None:
            progress(done, len(names), name)
        fn = METHODS[name]
        if progress is not None and _accepts_progress(
            fn
        ):  # a tqdm bar per chunk of masked forwards (the page tracks it)
            fn = functools.partial(fn, progress=True)
        start = time.perf_counter()
        try:
            m = _as_map(_run_method(fn, name, loaded.module, weights, item.x, layer, chosen, loaded)[0])
        except CamfnError as e:
            errors[name] = str(e)
            continue
        seconds = time.perf_counter() - start
        picture = viz.overlay(item.picture, m, cmap, alpha, _display_scale(item.picture))
        panels.append(Panel(name, m, picture, seconds))
    if progress is not None:
        progress(len(names), len(names), "done")
    shown_layer = layer or default_layer(loaded.module, item.x, hooks=loaded.hooks)
    return Explanation(
        item.name,
        f"{_class_name(loaded, predicted)} (p={float(probs[predicted]):.2f})",
        f"{_class_name(loaded, chosen)} (class {chosen}, p={float(probs[chosen]):.2f})",
        shown_layer,
        panels,
        errors,
    )


def write_downloads(result: Explanation, folder: str | Path) -> list[Path]:
    """Write each panel's map as ``<image>_<method>.npy`` (float32, the map itself) and its overlay as
    ``<image>_<method>.png`` under ``folder`` (created); return the paths, maps first.

    Example:
        >>> import tempfile
        >>> from camfn import app
        >>> loaded = app.load("shapes")
        >>> result = app.explain(loaded, app.sample(loaded), None, ["gradcam"])
        >>> [p.name for p in app.write_downloads(result, tempfile.mkdtemp())]
        ['shapes_demo_triangle_gradcam.npy', 'shapes_demo_triangle_gradcam.png']
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    maps, pictures = [], []
    for panel in result.panels:
        stem = folder / f"{result.sample}_{panel.method}"
        np.save(stem.with_suffix(".npy"), panel.map.numpy().astype(np.float32))
        panel.overlay.save(stem.with_suffix(".png"))
        maps.append(stem.with_suffix(".npy"))
        pictures.append(stem.with_suffix(".png"))
    return maps + pictures


def status_html(result: Explanation | None = None, error: str | None = None) -> str:
    """The page's status box: the predicted and explained classes, the layer and each method's time, then
    camfn's message for every failure (HTML-escaped plain text; never a traceback).

    Example:
        >>> from camfn import app
        >>> app.status_html(error="image not found: x.png")
        '<div class="camfn-error">image not found: x.png</div>'
    """
    parts = []
    if result is not None:
        parts.append(
            f"<div><b>Predicted:</b> {html.escape(result.predicted)} &nbsp; <b>Explained:</b> "
            f"{html.escape(result.target)} &nbsp; <b>Layer:</b> {html.escape(result.layer)}</div>"
        )
        if result.panels:
            rows = "".join(
                f"<tr><td>{html.escape(p.method)}</td><td>{p.seconds:.3f} s</td></tr>" for p in result.panels
            )
            parts.append(f"<table><tr><th>method</th><th>time</th></tr>{rows}</table>")
        grouped: dict[str, list[str]] = {}  # one line per distinct message (a bad layer fails every method)
        for name, text in result.errors.items():
            grouped.setdefault(text, []).append(name)
        parts += [
            f'<div class="camfn-error">{html.escape(", ".join(names))}: {html.escape(text)}</div>'
            for text, names in grouped.items()
        ]
    if error is not None:
        parts.append(f'<div class="camfn-error">{html.escape(error)}</div>')
    return "".join(parts)


def _message(e: Exception) -> str:
    """camfn's message for a :class:`CamfnError`; one line (type and text) for anything else."""
    if isinstance(e, CamfnError):
        return str(e)
    traceback.print_exc(file=sys.stderr)  # the server's log keeps the details
    first = str(e).splitlines()[0] if str(e) else ""
    return f"unexpected failure: {type(e).__name__}: {first}"


def _parse_target(value: Any) -> int | None:
    if value in (None, ""):
        return None
    text = str(value).strip()
    if not text.isdigit():
        raise TargetError(f"target {text!r}: pick a class from the list or type a class index (0, 1, ...)")
    return int(text)


def _model_spec(model: str, upload: str | None, weights: str | None) -> tuple[str, str | None]:
    """An uploaded ``.pt2`` replaces the model; any other uploaded file is the named model's weights."""
    if upload and Path(upload).suffix == ".pt2":
        return upload, None
    return (model or "shapes"), (upload or weights or None)


# ---------------------------------------------------------------------------------------------- page
def _theme() -> Any:
    import gradio as gr

    # System fonts: the default theme fetches web fonts, which an offline machine waits for
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


CSS = ".camfn-error { color: #b00020; white-space: pre-wrap; margin: 0.3em 0; } #camfn-status table { width: auto; }"


def build(model: str = "shapes", weights: str | None = None, downloads: str | Path | None = None) -> Any:
    """The page as a ``gradio.Blocks`` (launch it with ``.launch()``); ``model``/``weights`` are preselected
    and downloads are written under ``downloads`` (default: a new temporary folder)."""
    import gradio as gr

    root = Path(downloads or tempfile.mkdtemp(prefix="camfn-app-"))
    calls = iter(range(sys.maxsize))
    models = list(dict.fromkeys([model, *MODELS]))

    def refresh(image: str | None, model: str, upload: str | None, weights: str) -> tuple[Any, ...]:
        try:
            loaded = load(*_model_spec(model, upload, weights))
            item = sample(loaded, image)
            choices, default = layer_choices(loaded, item)
            top = [(f"{name} (class {i}, p={p:.2f})", str(i)) for i, name, p in top_classes(loaded, item)]
        except Exception as e:
            return gr.update(), gr.update(), gr.update(), status_html(error=_message(e))
        note = status_html(error=loaded.note) if loaded.note else ""
        return (
            viz.to_pil(viz.upscale(item.picture, _display_scale(item.picture))),
            gr.Dropdown(choices=choices, value=default),
            gr.Dropdown(choices=top, value=top[0][1]),
            note,
        )

    def run(
        image: str | None,
        model: str,
        upload: str | None,
        weights: str,
        layer: str | None,
        methods: list[str],
        target: str | None,
        cmap: str,
        alpha: float,
        progress: Any = gr.Progress(track_tqdm=True),  # noqa: B008 (gradio's way to ask for a bar)
    ) -> tuple[Any, str, Any]:
        try:
            loaded = load(*_model_spec(model, upload, weights))
            item = sample(loaded, image)
            result = explain(
                loaded,
                item,
                layer,
                methods or [],
                _parse_target(target),
                cmap=cmap,
                alpha=float(alpha),
                progress=lambda done, total, name: progress((done, total), desc=name, unit="methods"),
            )
            files = write_downloads(result, root / str(next(calls)))
        except Exception as e:
            return [], status_html(error=_message(e)), None
        gallery = [(p.overlay, f"{p.method} · {p.seconds:.3f} s") for p in result.panels]
        return gallery, status_html(result), [str(f) for f in files] or None

    with gr.Blocks(title="camfn", analytics_enabled=False) as page:
        gr.Markdown("## camfn: class activation maps, explained in the browser")
        image_path = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                preview = gr.Image(
                    label="Image", type="pil", format="png", interactive=False, height=256, elem_id="camfn-image"
                )
                with gr.Row():
                    upload_image = gr.UploadButton("Upload an image", type="filepath", elem_id="camfn-upload")
                    demo_button = gr.Button("Demo image")
                model_box = gr.Dropdown(
                    choices=models,
                    value=model,
                    allow_custom_value=True,
                    label="Model",
                    info="shapes, a torchvision or timm name, or a .pt2 path (random weights unless given)",
                    elem_id="camfn-model",
                )
                weights_box = gr.Textbox(value=weights or "", label="Weights file (state dict; empty: random)")
                upload_model = gr.File(label="Upload weights or a .pt2 model", type="filepath", height=80)
                layer_box = gr.Dropdown(label="Layer  ·  module  ·  output shape", elem_id="camfn-layer")
                methods_box = gr.CheckboxGroup(
                    choices=list(METHODS), value=["gradcam"], label="Methods", elem_id="camfn-methods"
                )
                target_box = gr.Dropdown(
                    label="Target (top-5 classes; or type an index)", allow_custom_value=True, elem_id="camfn-target"
                )
                with gr.Accordion("Display", open=False):
                    cmap_box = gr.Radio(choices=list(viz.COLORMAPS), value="jet", label="Colormap")
                    alpha_box = gr.Slider(0, 1, value=0.5, step=0.05, label="Map opacity")
                explain_button = gr.Button("Explain", variant="primary", elem_id="camfn-explain")
            with gr.Column(scale=2):
                status = gr.HTML(elem_id="camfn-status")
                gallery = gr.Gallery(
                    label="Overlays",
                    columns=3,
                    format="png",
                    object_fit="contain",
                    preview=False,
                    height="auto",
                    elem_id="camfn-overlays",
                )
                files = gr.File(label="Downloads: maps (.npy), pictures (.png)", file_count="multiple")

        model_inputs = [image_path, model_box, upload_model, weights_box]
        view = [preview, layer_box, target_box, status]
        shared = {"concurrency_id": "model", "concurrency_limit": 1}  # one model, one call at a time
        page.load(refresh, model_inputs, view, **shared)
        upload_image.upload(lambda f: f, upload_image, image_path).then(refresh, model_inputs, view, **shared)
        demo_button.click(lambda: None, None, image_path).then(refresh, model_inputs, view, **shared)
        for box in (model_box, upload_model):
            box.change(refresh, model_inputs, view, **shared)
        weights_box.submit(refresh, model_inputs, view, **shared)
        explain_button.click(
            run,
            [*model_inputs, layer_box, methods_box, target_box, cmap_box, alpha_box],
            [gallery, status, files],
            **shared,
        )
    return page


# ---------------------------------------------------------------------------------------------- command
def _serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise OptionError(f"--port {args.port}: use a port number between 1 and 65535")
    load(args.model, args.weights)  # a bad --model or --weights fails here, with camfn's message
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("camfn: error: camfn app needs Gradio; install it with pip install 'camfn[app]'", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="camfn-app-") as downloads:
        page = build(args.model, args.weights, downloads)
        print(f"camfn app: http://{args.host}:{args.port}  (Ctrl+C stops it)", flush=True)
        page.queue().launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            quiet=True,
            show_error=False,
            ssr_mode=False,
            footer_links=[],
            theme=_theme(),
            css=CSS,
            allowed_paths=[downloads],
        )
    return 0


def add_parser(sub: Any) -> None:
    """Add ``camfn app [--port N] [--host H] [--model M] [--weights FILE]`` to the command line's sub-parsers."""
    ap = sub.add_parser("app", help="a web page to explore maps in the browser (pip install 'camfn[app]')")
    ap.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--model", default="shapes", help="model preselected in the page (default shapes)")
    ap.add_argument("--weights", help="state dict file for --model (a torchvision or timm architecture)")
    ap.set_defaults(run=_serve)
