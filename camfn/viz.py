r"""Pictures of maps: colormaps, overlays on images, and grids of methods x images.

No OpenCV and no matplotlib needed: colormaps are small tables (or a closed form) evaluated with torch (any
callable ``values -> RGB`` and, when matplotlib is installed, its colormap names work too), images are tensors,
numpy arrays or PIL images, text is drawn with PIL's default font. An overlay is the convex blend

.. math:: O = (1 - \alpha)\, I + \alpha\, \mathrm{cmap}(L)

of the image ``I`` (``(3, H, W)`` in ``[0, 1]``) and the colored map ``L`` (resized to the image, bilinear).

Colormaps (``t`` in ``[0, 1]``):

* ``jet``: the MATLAB / OpenCV closed form ``(r, g, b) = clip(1.5 - |4t - (3, 2, 1)|, 0, 1)``
  (dark blue -> cyan -> yellow -> dark red);
* ``viridis`` and ``turbo``: linear interpolation between 17 evenly spaced 8-bit colors of the published
  maps (within 0.03 of matplotlib's 256-entry tables).

Example:
    >>> import torch
    >>> from camfn import viz
    >>> image = torch.zeros(3, 8, 12)
    >>> m = torch.linspace(0, 1, 12).expand(8, 12)
    >>> pic = viz.overlay(image, m, cmap="jet", alpha=1.0, scale=2)
    >>> pic.size, pic.getpixel((0, 0)), pic.getpixel((23, 0))
    ((24, 16), (0, 0, 128), (128, 0, 0))
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .errors import InputError, OptionError, nearest

__all__ = [
    "COLORMAPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WRAP",
    "as_image",
    "blend",
    "colorize",
    "concepts_overlay",
    "deprocess",
    "grid",
    "overlay",
    "preprocess",
    "to_pil",
    "upscale",
]

ImageLike = Tensor | np.ndarray | Image.Image
MapLike = Tensor | np.ndarray
Colormap = str | Callable[[np.ndarray], Any]
"""A name in :data:`COLORMAPS`, a matplotlib colormap name (with matplotlib installed), or a callable taking
values ``(...)`` in ``[0, 1]`` (a numpy float array) to colors ``(..., 3)`` or ``(..., 4)`` (floats in ``[0, 1]``
or uint8), such as a matplotlib ``Colormap`` object."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet images in ``[0, 1]`` (torchvision's normalisation)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet images in ``[0, 1]``."""

_VIRIDIS = (
    0x440154, 0x48186A, 0x472D7B, 0x424086, 0x3B528B, 0x33638D, 0x2C728E, 0x26828E, 0x21918C,
    0x1FA088, 0x28AE80, 0x3FBC73, 0x5EC962, 0x84D44B, 0xADDC30, 0xD8E219, 0xFDE725,
)  # fmt: skip
_TURBO = (
    0x30123B, 0x4040A2, 0x466BE3, 0x4294FF, 0x28BCEB, 0x18DDC2, 0x32F298, 0x6DFE62, 0xA4FC3C,
    0xCDEC34, 0xEECF3A, 0xFDAC34, 0xFB7E21, 0xEB500E, 0xD02F05, 0xA91601, 0x7A0403,
)  # fmt: skip
COLORMAPS = ("jet", "turbo", "viridis")
"""Colormap names :func:`colorize` accepts."""


def _table(colors: Sequence[int]) -> Tensor:
    return torch.tensor([[(c >> s) & 0xFF for s in (16, 8, 0)] for c in colors], dtype=torch.float32) / 255


def _interpolate(table: Tensor, t: Tensor) -> Tensor:
    """Piecewise-linear lookup of ``t`` in ``[0, 1]`` between the rows of ``table`` ``(N, 3)``: ``(..., 3)``."""
    pos = t * (table.shape[0] - 1)
    low = pos.floor().clamp(0, table.shape[0] - 2).long()
    frac = (pos - low).unsqueeze(-1)
    table = table.to(t.device)
    return table[low] * (1 - frac) + table[low + 1] * frac


def _matplotlib_cmap(name: str) -> Callable[[np.ndarray], Any]:
    try:
        import matplotlib
    except ImportError:
        hint = nearest(name, COLORMAPS, n=1)
        raise OptionError(
            f"unknown colormap {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "") + f" Use one of "
            f"{COLORMAPS}, a callable values -> RGB, or install matplotlib for its colormap names"
        ) from None
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        hint = nearest(name, [*COLORMAPS, *matplotlib.colormaps], n=3)
        raise OptionError(
            f"unknown colormap {name!r}"
            + (f"; did you mean {' or '.join(map(repr, hint))}?" if hint else "")
            + f" Use one of {COLORMAPS}, a matplotlib colormap name or a callable values -> RGB"
        ) from None


def _call_cmap(fn: Callable[[np.ndarray], Any], t: Tensor) -> Tensor:
    values = t.cpu().numpy().astype(np.float64)
    try:
        rgb = fn(values)
    except Exception as e:
        raise OptionError(f"the colormap callable failed on values in [0, 1]: {type(e).__name__}: {e}") from None
    rgb = torch.as_tensor(np.asarray(rgb.detach().cpu() if isinstance(rgb, Tensor) else rgb))
    if tuple(rgb.shape[:-1]) != tuple(t.shape) or rgb.shape[-1:] not in ((3,), (4,)):
        raise OptionError(
            f"the colormap callable returned shape {tuple(rgb.shape)} for values of shape {tuple(t.shape)}; it must "
            "return colors (..., 3) or (..., 4) (RGB or RGBA), e.g. a matplotlib colormap"
        )
    rgb = rgb[..., :3].float() / 255 if not rgb.is_floating_point() else rgb[..., :3].float()
    if not bool(torch.isfinite(rgb).all()) or float(rgb.min()) < 0 or float(rgb.max()) > 1:
        raise OptionError("the colormap callable returned colors outside [0, 1]; return floats in [0, 1] or uint8")
    return rgb.to(t.device)


def colorize(maps: MapLike, cmap: Colormap = "jet") -> Tensor:
    """Color maps ``(..., H, W)`` with values in ``[0, 1]`` (clipped): ``(..., 3, H, W)`` RGB in ``[0, 1]``.

    ``cmap``: see :data:`Colormap` (a callable's alpha channel is dropped).

    Example:
        >>> import torch
        >>> from camfn.viz import colorize
        >>> colorize(torch.tensor([[0.0, 0.5, 1.0]]), "jet")[:, 0].T  # one (r, g, b) row per value
        tensor([[0.0000, 0.0000, 0.5000],
                [0.5000, 1.0000, 0.5000],
                [0.5000, 0.0000, 0.0000]])
        >>> colorize(torch.tensor([[0.25]]), lambda v: v[..., None].repeat(3, -1))[:, 0, 0]  # a gray ramp
        tensor([0.2500, 0.2500, 0.2500])
    """
    t = _as_tensor_map(maps).float().clamp(0, 1)
    if isinstance(cmap, str) and cmap not in COLORMAPS:
        cmap = _matplotlib_cmap(cmap)
    if callable(cmap):
        rgb = _call_cmap(cmap, t)
    elif cmap == "jet":
        rgb = (1.5 - (4 * t.unsqueeze(-1) - torch.tensor([3.0, 2.0, 1.0], device=t.device)).abs()).clamp(0, 1)
    elif cmap in ("viridis", "turbo"):
        rgb = _interpolate(_table(_VIRIDIS if cmap == "viridis" else _TURBO), t)
    else:
        raise OptionError(
            f"cmap={cmap!r} ({type(cmap).__name__}): pass a colormap name such as 'jet' or a callable values -> RGB"
        )
    return rgb.movedim(-1, -3)


def _as_tensor_map(m: Any) -> Tensor:
    if isinstance(m, np.ndarray):
        m = torch.from_numpy(np.ascontiguousarray(m))
    if not isinstance(m, Tensor):
        raise InputError(f"a map must be a torch tensor or a numpy array, got {type(m).__name__}")
    if m.dtype == torch.bool or m.is_complex():
        raise InputError(f"a map of dtype {m.dtype}: pass real values in [0, 1] (m.float())")
    m = m.detach().cpu()
    if m.is_floating_point() and not bool(torch.isfinite(m).all()):
        raise InputError("the map holds NaN or Inf values; a picture of it would be wrong. Check the map's source")
    return m


def _composite(rgba: Tensor) -> Tensor:
    """``(4, H, W)`` RGBA in ``[0, 1]`` over a white background: ``rgb * a + (1 - a)``."""
    a = rgba[3:4]
    return rgba[:3] * a + (1 - a)


def _pil_pixels(image: Image.Image) -> Tensor:
    """A PIL image of any mode as ``(3, H, W)`` in ``[0, 1]``: 16-bit scaled by 65535, alpha over white."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit gray (PNG); "I" holds 16-bit PNGs in older Pillow
        a = np.asarray(image).astype(np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise InputError(f"a {mode} image with values outside 0..65535; save it as an 8- or 16-bit image")
        return torch.from_numpy(a / 65535).float()[None].expand(3, -1, -1).clone()
    if mode == "F":
        a = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        if not bool(torch.isfinite(a).all()) or (a.numel() and (float(a.min()) < 0 or float(a.max()) > 1)):
            raise InputError("a floating-point (mode F) image with values outside [0, 1]; scale it to [0, 1]")
        return a[None].expand(3, -1, -1).clone()
    alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    rgb = image.convert("RGBA" if alpha else "RGB")
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    x = data.reshape(rgb.height, rgb.width, len(rgb.mode)).permute(2, 0, 1).float() / 255
    return _composite(x) if alpha else x


def as_image(image: ImageLike) -> Tensor:
    """An image as a ``(3, H, W)`` float tensor in ``[0, 1]``.

    Accepts a PIL image (any mode: 16-bit gray divided by 65535, palette and gray expanded, an alpha channel
    composited over white), a numpy array ``(H, W)``, ``(H, W, 1 | 3 | 4)`` (grad-cam's habit), or a tensor
    ``(H, W)``, ``(1 | 3, H, W)`` or ``(1, 1 | 3, H, W)``. uint8 values are divided by 255, uint16 by 65535;
    floats already in ``[0, 1]`` are kept, others (a normalised network input) are min-max rescaled for
    display. Gray images are repeated to 3 channels; NaN or Inf pixels raise :class:`InputError`.

    Example:
        >>> import numpy as np, torch
        >>> from camfn.viz import as_image
        >>> as_image(torch.tensor([[-1.0, 1.0]])).tolist()
        [[[0.0, 1.0]], [[0.0, 1.0]], [[0.0, 1.0]]]
        >>> as_image(np.full((1, 2, 3), 255, dtype=np.uint8)).shape
        torch.Size([3, 1, 2])
    """
    if isinstance(image, Image.Image):
        return _pil_pixels(image)
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16:
            return as_image(torch.from_numpy(image.astype(np.float32) / 65535))
        x = torch.from_numpy(np.ascontiguousarray(image))
        if x.ndim == 3 and x.shape[-1] in (1, 3, 4):  # numpy images are (H, W, C)
            x = x.permute(2, 0, 1)
        if x.ndim == 3 and x.shape[0] == 4:  # RGBA: the color as any image, then alpha over white
            a = x[3:4].float() / 255 if not x.is_floating_point() else x[3:4].float()
            if not bool(torch.isfinite(a).all()) or float(a.min()) < 0 or float(a.max()) > 1:
                raise InputError("the alpha channel of an (H, W, 4) image must lie in [0, 1] (floats) or 0..255")
            return _composite(torch.cat([as_image(x[:3]), a]))
        image = x
    if not isinstance(image, Tensor):
        raise InputError(f"image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    x = image.detach().cpu()
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise InputError(
            f"image of shape {tuple(image.shape)}: expected (H, W), (C, H, W) or (1, C, H, W) with C = 1 or 3 "
            "(numpy: (H, W, C))"
        )
    if x.dtype == torch.bool or x.is_complex():
        raise InputError(f"image of dtype {x.dtype}: pass uint8, uint16 or floats in [0, 1]")
    if not x.is_floating_point():
        x = x.float() / (65535 if x.dtype == torch.uint16 else 255)
    elif not bool(torch.isfinite(x).all()):
        raise InputError("the image holds NaN or Inf pixels; replace them (torch.nan_to_num) before drawing")
    elif x.numel() and (x.min() < 0 or x.max() > 1):
        low, high = x.min(), x.max()
        x = (x - low) / (high - low) if high > low else torch.zeros_like(x)
    return x.float().expand(3, -1, -1).clone()


def _target_size(h: int, w: int, size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, tuple):
        return size
    short = min(h, w)
    return max(1, round(h * size / short)), max(1, round(w * size / short))


def _check_size(size: Any) -> None:
    ok = size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 1)
    if isinstance(size, tuple | list):
        ok = len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    if not ok:
        raise OptionError(f"size={size!r}: use None (keep), a whole number >= 1 (the shorter side) or (h, w)")


def _stats(value: Any, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if t.numel() not in (1, 3) or not bool(torch.isfinite(t).all()) or (name == "std" and bool((t <= 0).any())):
        raise OptionError(
            f"{name}={value!r}: use 1 or 3 finite numbers"
            + (" > 0" if name == "std" else "")
            + " (ImageNet: viz.IMAGENET_MEAN, viz.IMAGENET_STD)"
        )
    return t.expand(3).reshape(1, 3, 1, 1)


def preprocess(
    image: ImageLike,
    size: int | tuple[int, int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """An image (as :func:`as_image` takes it) -> a network input ``(1, 3, h, w)``: ``(pixel - mean) / std``.

    ``size``: ``None`` keeps the image's size, a whole number resizes the shorter side to it, ``(h, w)`` resizes
    to exactly that (bilinear, antialiased). ImageNet statistics by default.

    Example:
        >>> import numpy as np
        >>> from camfn.viz import preprocess
        >>> x = preprocess(np.full((10, 20, 3), 255, dtype=np.uint8), 5, mean=(0.5,), std=(0.25,))
        >>> tuple(x.shape), float(x[0, 0, 0, 0])
        ((1, 3, 5, 10), 2.0)
    """
    _check_size(size)
    mean_t, std_t = _stats(mean, "mean"), _stats(std, "std")
    picture = as_image(image)
    x = picture[None]
    if size is not None:
        h, w = _target_size(picture.shape[1], picture.shape[2], tuple(size) if isinstance(size, list) else size)
        if (h, w) != tuple(picture.shape[1:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return (x - mean_t) / std_t


def deprocess(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """A network input ``(1, 3, H, W)`` or ``(3, H, W)`` -> a uint8 image ``(H, W, 3)``: ``x * std + mean`` in
    ``[0, 1]`` (clipped), times 255, rounded. Inverts :func:`preprocess` (at the same size) to 8-bit precision.

    Example:
        >>> import numpy as np
        >>> from camfn.viz import deprocess, preprocess
        >>> image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
        >>> bool((deprocess(preprocess(image)) == image).all())
        True
    """
    if not isinstance(x, Tensor):
        raise InputError(f"deprocess takes a torch tensor (1, 3, H, W) or (3, H, W), got {type(x).__name__}")
    t = x.detach().cpu().float()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[0] != 3:
        raise InputError(f"deprocess takes (1, 3, H, W) or (3, H, W), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise InputError("the input holds NaN or Inf values; there is no image to show")
    t = (t[None] * _stats(std, "std") + _stats(mean, "mean"))[0].clamp(0, 1)
    return (t * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def upscale(image: Tensor, scale: int) -> Tensor:
    """Resize ``(C, H, W)`` by an integer ``scale`` (bilinear, ``align_corners=False``); ``scale=1`` is a no-op."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise OptionError(f"scale={scale!r}: use a whole number >= 1")
    if scale == 1:
        return image
    return F.interpolate(image[None], scale_factor=scale, mode="bilinear", align_corners=False)[0].clamp(0, 1)


def _map2d(m: MapLike) -> Tensor:
    m = _as_tensor_map(m).float()
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise InputError(f"map of shape {tuple(m.shape)}: expected one (H, W) map (or (1, H, W))")
    return m


def _alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= float(alpha) <= 1:
        raise OptionError(
            f"alpha={alpha!r} ({type(alpha).__name__}): use a number between 0 (image only) and 1 (map only), "
            "e.g. alpha=0.5"
        )
    return float(alpha)


def blend(image: ImageLike, m: MapLike, cmap: Colormap = "jet", alpha: float = 0.5) -> Tensor:
    """``(1 - alpha) * image + alpha * cmap(m)`` as ``(3, H, W)`` in ``[0, 1]``; ``m`` resized to the image.

    ``image`` as :func:`as_image` takes it (numpy too), ``m`` a tensor or numpy array ``(H', W')``.

    Example:
        >>> import torch
        >>> from camfn.viz import blend
        >>> blend(torch.ones(3, 2, 2), torch.zeros(2, 2), alpha=0.5)[:, 0, 0]
        tensor([0.5000, 0.5000, 0.7500])
    """
    alpha = _alpha(alpha)
    m = _map2d(m)
    picture = as_image(image)
    if tuple(m.shape) != tuple(picture.shape[1:]):
        m = F.interpolate(m[None, None], size=picture.shape[1:], mode="bilinear", align_corners=False)[0, 0]
    return ((1 - alpha) * picture + alpha * colorize(m, cmap)).clamp(0, 1)


def to_pil(image: Tensor) -> Image.Image:
    """A ``(3, H, W)`` (or ``(H, W)``) tensor in ``[0, 1]`` as an 8-bit PIL image (RGB or L)."""
    x = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    if x.ndim == 2:
        return Image.fromarray(x.numpy(), mode="L")
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def overlay(image: ImageLike, m: MapLike, cmap: Colormap = "jet", alpha: float = 0.5, scale: int = 1) -> Image.Image:
    """The map ``m`` ``(H', W')`` over ``image``, as a PIL image ``scale`` times the image's size.

    The blend :func:`blend` is computed at the image's own size (``m`` resized to it), then upscaled:
    ``scale=1`` gives a picture exactly the image's size, ``scale=4`` makes a 64-pixel image viewable. Numpy
    images ``(H, W, 3)`` (uint8 or floats in ``[0, 1]``) and numpy maps work as in pytorch-grad-cam's
    ``show_cam_on_image``; ``cmap`` may be a callable or a matplotlib name (:data:`Colormap`).

    Example:
        >>> import numpy as np
        >>> from camfn.viz import overlay
        >>> image = np.full((4, 4, 3), 255, dtype=np.uint8)
        >>> overlay(image, np.zeros((2, 2)), alpha=0.5).getpixel((0, 0))  # white + jet(0) = (0, 0, 0.5)
        (128, 128, 191)
    """
    return to_pil(upscale(blend(image, m, cmap, alpha), scale))


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return int(box[2] - box[0])


WRAP = 5
"""Columns a single-image :func:`grid` wraps to by default."""


def _lines(count: int, columns: int | None, images: int) -> int:
    """Cells per line of a grid row: ``columns``, or by default :data:`WRAP` for one image, all for several."""
    if columns is None:
        return min(count, WRAP) if images == 1 else count
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise OptionError(f"columns={columns!r}: use a whole number >= 1 of cells per line, or None for the default")
    return min(count, columns)


def grid(
    images: Sequence[ImageLike],
    maps: Mapping[str, MapLike | Sequence[MapLike]],
    *,
    cmap: Colormap = "jet",
    alpha: float = 0.5,
    cell: int = 128,
    row_titles: Sequence[str] | None = None,
    show_image: bool = True,
    pad: int = 4,
    columns: int | None = None,
) -> Image.Image:
    """A grid picture: one row per image, one column per method (titled), each cell an overlay.

    A row with more cells than ``columns`` wraps onto several lines, each with its own titles.

    Args:
        images: the ``N`` images (tensors or PIL images; sizes may differ).
        maps: method name -> ``N`` maps (a ``(N, H, W)`` tensor or a list of ``(H, W)`` maps).
        cmap, alpha: as in :func:`overlay`.
        cell: every cell is scaled (by a whole factor, at least 1) so its longer side reaches ``cell`` pixels.
        row_titles: optional text drawn above each row (e.g. file name and target class).
        show_image: put the plain image in a first column titled "image".
        pad: pixels between cells.
        columns: cells per line; ``None``: at most :data:`WRAP` (5) for a single image, one line per image
            for several (so methods stay aligned in columns).

    Example:
        >>> import torch
        >>> from camfn.viz import grid
        >>> maps = {"a": torch.rand(2, 16, 16), "b": torch.rand(2, 16, 16)}
        >>> grid([torch.rand(3, 16, 16), torch.rand(3, 16, 16)], maps, cell=32).size
        (112, 90)
        >>> many = {f"m{k}": torch.rand(1, 16, 16) for k in range(7)}  # 8 cells: 5 on the first line, 3 below
        >>> grid([torch.rand(3, 16, 16)], many, cell=32).size
        (184, 108)
    """
    images = list(images)
    if not images or not maps:
        raise InputError("grid needs at least one image and one map")
    for name, per in maps.items():
        if len(per) != len(images):
            raise InputError(f"maps[{name!r}] holds {len(per)} maps for {len(images)} images; give one per image")
    pictures = [as_image(im) for im in images]
    names = (["image"] if show_image else []) + list(maps)
    per_line = _lines(len(names), columns, len(images))
    wrapped = per_line < len(names)
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 2
    scales = [max(1, math.ceil(cell / max(p.shape[1:]))) for p in pictures]
    cell_w = max(p.shape[2] * s for p, s in zip(pictures, scales, strict=True))
    cell_w = max(cell_w, *(_text_width(probe, c, font) + 2 for c in names))
    heights = [p.shape[1] * s for p, s in zip(pictures, scales, strict=True)]
    title_h = line if row_titles else 0
    chunks = [names[k : k + per_line] for k in range(0, len(names), per_line)]
    header_h = line + pad  # a line of column titles
    band = [title_h + len(chunks) * (h + pad + (header_h if wrapped else 0)) for h in heights]
    width = pad + per_line * (cell_w + pad)
    height = (0 if wrapped else header_h) + sum(band)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def titles(chunk: Sequence[str], y: int) -> None:
        for j, name in enumerate(chunk):
            x0 = pad + j * (cell_w + pad)
            draw.text((x0 + (cell_w - _text_width(draw, name, font)) // 2, y + 1), name, fill="black", font=font)

    y = 0
    if not wrapped:
        titles(names, y)
        y += header_h
    for i, (picture, s) in enumerate(zip(pictures, scales, strict=True)):
        if row_titles:
            draw.text((pad, y), str(row_titles[i]), fill="black", font=font)
            y += title_h
        tiles = [to_pil(upscale(picture, s))] if show_image else []
        tiles += [overlay(picture, per[i], cmap, alpha, s) for per in maps.values()]
        for k, chunk in enumerate(chunks):
            if wrapped:
                titles(chunk, y)
                y += header_h
            for j, tile in enumerate(tiles[k * per_line : k * per_line + len(chunk)]):
                canvas.paste(tile, (pad + j * (cell_w + pad) + (cell_w - tile.width) // 2, y))
            y += heights[i] + pad
    return canvas


def concepts_overlay(
    image: ImageLike, maps: Tensor, labels: Sequence[str] | None = None, alpha: float = 0.5, scale: int = 1
) -> Image.Image:
    r"""Concept maps ``(n, H', W')`` of one image (:func:`camfn.methods.factorization.dff`) over ``image``.

    Concept ``j`` gets the hue ``j / n`` (full saturation); each pixel shows the concept with the largest
    map there, with brightness its value (grad-cam's ``show_factorization_on_image``):

    .. math:: O = (1 - \alpha)\, I + \alpha\, c_{j^*} L_{j^*}, \qquad j^* = \arg\max_j L_j

    ``labels`` (one per concept, e.g. the concept's top classes) are drawn as a legend of colour swatches
    under the picture. Returns a PIL image ``scale`` times the image's size (plus the legend).

    Example:
        >>> import torch
        >>> from camfn.viz import concepts_overlay
        >>> maps = torch.stack([torch.eye(4), 1 - torch.eye(4)])
        >>> pic = concepts_overlay(torch.zeros(3, 4, 4), maps, alpha=1.0)
        >>> pic.size, pic.getpixel((0, 0)), pic.getpixel((1, 0))
        ((4, 4), (255, 0, 0), (0, 255, 255))
    """
    if not 0 <= alpha <= 1:
        raise OptionError(f"alpha={alpha!r}: use a number between 0 (image only) and 1 (map only)")
    picture = as_image(image)
    m = maps.detach().float().cpu()
    if m.ndim == 4 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 3 or m.shape[0] < 1:
        raise InputError(f"maps of shape {tuple(maps.shape)}: expected one image's concept maps (n, H, W)")
    n = m.shape[0]
    if labels is not None and len(labels) != n:
        raise InputError(f"{len(labels)} labels for {n} concepts: pass one label per concept")
    if tuple(m.shape[1:]) != tuple(picture.shape[1:]):
        m = F.interpolate(m[None], size=picture.shape[1:], mode="bilinear", align_corners=False)[0]
    h6 = torch.arange(n, dtype=torch.float32) * 6 / n  # hue * 6; HSV -> RGB at full saturation and value
    colors = torch.stack([(h6 - 3).abs() - 1, 2 - (h6 - 2).abs(), 2 - (h6 - 4).abs()], 1).clamp(0, 1)
    value, best = m.clamp(0, 1).max(0)
    mask = colors[best].permute(2, 0, 1) * value
    out = to_pil(upscale(((1 - alpha) * picture + alpha * mask).clamp(0, 1), scale))
    if not labels:
        return out
    font, pad = _font(), 4
    probe = ImageDraw.Draw(out)
    line = max(probe.textbbox((0, 0), str(t), font=font)[3] for t in labels) + pad
    width = max(out.width, max(_text_width(probe, str(t), font) for t in labels) + line + 2 * pad)
    canvas = Image.new("RGB", (width, out.height + n * line + pad), "white")
    canvas.paste(out, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(labels):
        y = out.height + pad + j * line
        rgb = tuple(round(255 * c) for c in colors[j].tolist())
        draw.rectangle((pad, y, pad + line - pad, y + line - pad), fill=rgb)
        draw.text((2 * pad + line - pad, y), str(text), fill="black", font=font)
    return canvas
