"""camfn's own localisation benchmark: synthetic shapes with known boxes and a small CNN trained on them.

Each image holds one *object* (a circle, square, triangle, cross or ring) at a random position, scale and
colour on a coloured background, plus *clutter* that is none of the classes (thin straight strokes and soft
blobs, drawn with the same colours as objects, so brightness alone does not find the object) and Gaussian
pixel noise. Every image comes with its class, its object mask and the mask's bounding box, so the pointing
game and the energy pointing game can be scored exactly. Images are deterministic functions of
``(n, size, seed)``; :data:`TRAIN_SEED` and :data:`TEST_SEED` name the splits.

The classifier :func:`net` (conv/BN/ReLU stack, global average pooling, linear) is trained by
``python -m benchmarks.train_shapes``; its weights ship with the package and :func:`load` reads them offline.

Example:
    >>> import camfn
    >>> from camfn import shapes
    >>> batch = shapes.make(8, seed=shapes.TEST_SEED)
    >>> model = shapes.load()
    >>> maps = camfn.gradcam(model, camfn.params(model), batch.images, shapes.LAYER, batch.labels)
    >>> maps.shape
    torch.Size([8, 64, 64])
"""

from __future__ import annotations

import importlib.resources
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .errors import InputError

__all__ = [
    "CLASSES",
    "LAYER",
    "MEAN",
    "STD",
    "TEST_SEED",
    "TRAIN_SEED",
    "Batch",
    "demo_image",
    "load",
    "make",
    "net",
    "tolerance",
]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
"""Class names; ``labels`` index this tuple."""

TRAIN_SEED = 1
"""Seed of the first training chunk (the training script uses ``TRAIN_SEED + k`` for chunk ``k``)."""

TEST_SEED = 1_000_000
"""Seed of the test split: ``make(n, seed=TEST_SEED)``; never used for training."""

LAYER = "features.5"
"""The layer to explain on :func:`net`: the last conv block (16 x 16 at 64 px)."""

MEAN = 0.45
"""Images are ``(pixel - MEAN) / STD`` with pixels in about ``[0, 1]``."""

STD = 0.3

WEIGHTS = "shapes.pt"

_CHUNK = 256  # images rendered at a time (bounds memory; results do not depend on it)
_STROKES = 6
_BLOBS = 3
_NOISE = 0.08


class Batch(NamedTuple):
    """A batch of the benchmark.

    images: ``(n, 3, size, size)`` float32, normalised as ``(pixel - MEAN) / STD``. labels: ``(n,)`` long,
    indices into :data:`CLASSES`. boxes: ``(n, 4)`` float ``(x0, y0, x1, y1)`` of the object mask, in pixels,
    inclusive-exclusive (the torchvision convention). masks: ``(n, size, size)`` bool, the object's pixels.
    """

    images: Tensor
    labels: Tensor
    boxes: Tensor
    masks: Tensor


def _uniform(g: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def _object_masks(labels: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Object masks from class labels ``(n,)`` and object coordinates ``u, v`` ``(n, H, W)`` (radius 1)."""
    rho2 = u**2 + v**2
    au, av = u.abs(), v.abs()
    shapes = torch.stack(
        [
            rho2 <= 1.0,  # circle
            torch.maximum(au, av) <= 0.85,  # square
            (v <= 0.75) & (au <= (v + 0.95) / 1.7),  # triangle, apex up
            ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0)),  # cross
            (rho2 <= 1.0) & (rho2 >= 0.55**2),  # ring
        ],
        1,
    )
    return shapes.gather(1, labels.view(-1, 1, 1, 1).expand(-1, 1, *u.shape[1:])).squeeze(1)


def _segment_distance(px: Tensor, py: Tensor, ends: Tensor) -> Tensor:
    """Distance of pixel centres ``(H, W)`` to segments ``ends`` ``(n, S, 4)`` = ``(ax, ay, bx, by)``."""
    ax, ay, bx, by = (ends[..., i, None, None] for i in range(4))
    dx, dy = bx - ax, by - ay
    t = (((px - ax) * dx + (py - ay) * dy) / (dx**2 + dy**2).clamp(min=1e-6)).clamp(0, 1)
    return torch.hypot(px - ax - t * dx, py - ay - t * dy)


def _boxes(masks: Tensor) -> Tensor:
    """Inclusive-exclusive boxes ``(n, 4)`` of non-empty masks ``(n, H, W)``."""
    cols, rows = masks.any(1), masks.any(2)
    width, height = masks.shape[2], masks.shape[1]
    x0 = cols.int().argmax(1)
    x1 = width - cols.flip(1).int().argmax(1)
    y0 = rows.int().argmax(1)
    y1 = height - rows.flip(1).int().argmax(1)
    return torch.stack([x0, y0, x1, y1], 1).float()


def make(n: int, *, size: int = 64, seed: int = 0) -> Batch:
    """``n`` benchmark images, deterministic from ``(n, size, seed)``.

    Per image: background colour ``b ~ U[0, 0.3]^3``; object of class ``c ~ U{0..4}``, radius
    ``r ~ U[0.13, 0.24] * size``, centre uniform with the object inside the image, colour ``~ U[0.55, 1]^3``;
    clutter: 6 strokes (segments of half-width 0.7-1.2 px) and 3 Gaussian blobs (sigma 1-2 px) with colours
    ``~ U[0.55, 1]^3``, drawn below the object; noise ``N(0, 0.08^2)`` per pixel; then ``(p - MEAN) / STD``.

    Example:
        >>> from camfn import shapes
        >>> batch = shapes.make(4, size=32, seed=0)
        >>> tuple(batch.images.shape), batch.labels.dtype, tuple(batch.boxes.shape), tuple(batch.masks.shape)
        ((4, 3, 32, 32), torch.int64, (4, 4), (4, 32, 32))
        >>> bool((shapes.make(4, size=32, seed=0).images == batch.images).all())
        True
    """
    if not isinstance(n, int) or n < 0:
        raise InputError(f"n={n!r}: pass the number of images as a non-negative int")
    if not isinstance(size, int) or size < 16:
        raise InputError(f"size={size!r}: pass an int of at least 16 pixels (objects are 4+ px in radius)")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CLASSES), (n,), generator=g)
    radius = _uniform(g, (n,), 0.13, 0.24) * size
    centre = radius[:, None] + torch.rand(n, 2, generator=g) * (size - 2 * radius[:, None])
    background = _uniform(g, (n, 3), 0.0, 0.3)
    colour = _uniform(g, (n, 3), 0.55, 1.0)
    start = torch.rand(n, _STROKES, 2, generator=g) * size
    angle = torch.rand(n, _STROKES, generator=g) * 2 * math.pi
    length = _uniform(g, (n, _STROKES), 0.15, 0.45) * size
    ends = torch.cat([start, start + length[..., None] * torch.stack([angle.cos(), angle.sin()], -1)], -1)
    half_width = _uniform(g, (n, _STROKES), 0.7, 1.2)
    stroke_colour = _uniform(g, (n, _STROKES, 3), 0.55, 1.0)
    blob_centre = torch.rand(n, _BLOBS, 2, generator=g) * size
    blob_sigma = _uniform(g, (n, _BLOBS), 1.0, 2.0)
    blob_colour = _uniform(g, (n, _BLOBS, 3), 0.55, 1.0)

    axis = torch.arange(size) + 0.5  # pixel centres
    py, px = torch.meshgrid(axis, axis, indexing="ij")
    images, masks = torch.empty(n, 3, size, size), torch.empty(n, size, size, dtype=torch.bool)
    for lo in range(0, n, _CHUNK):
        s = slice(lo, min(lo + _CHUNK, n))
        img = background[s, :, None, None].expand(-1, -1, size, size).clone()
        d = _segment_distance(px, py, ends[s])  # (m, S, H, W)
        cover = (half_width[s, :, None, None] + 0.5 - d).clamp(0, 1)
        for k in range(_STROKES):
            a = cover[:, k, None]
            img = img * (1 - a) + stroke_colour[s, k, :, None, None] * a
        scale = -0.5 / blob_sigma[s, :, None] ** 2  # separable Gaussian: exp(-dx^2 / 2s^2) exp(-dy^2 / 2s^2)
        along_x = torch.exp((axis - blob_centre[s, :, 0, None]) ** 2 * scale)
        along_y = torch.exp((axis - blob_centre[s, :, 1, None]) ** 2 * scale)
        blob = along_y[..., :, None] * along_x[..., None, :]
        for k in range(_BLOBS):
            a = blob[:, k, None]
            img = img * (1 - a) + blob_colour[s, k, :, None, None] * a
        r = radius[s, None, None]
        mask = _object_masks(labels[s], (px - centre[s, 0, None, None]) / r, (py - centre[s, 1, None, None]) / r)
        img = torch.where(mask[:, None], colour[s, :, None, None], img)
        img = img + _NOISE * torch.randn(img.shape, generator=g)
        images[s], masks[s] = (img - MEAN) / STD, mask
    return Batch(images, labels, _boxes(masks), masks)


def tolerance(size: int = 64) -> int:
    """Pointing-game tolerance in pixels at image size ``size``: the usual 15 px at 224 px, scaled.

    Example:
        >>> from camfn import shapes
        >>> shapes.tolerance(64), shapes.tolerance(224)
        (4, 15)
    """
    return round(15 * size / 224)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShapesNet(nn.Module):
    """Six 3 x 3 conv/BN/ReLU blocks (strides 2, 1, 2, 1, 1, 1), global average pool, linear; 46,509 parameters.

    At 64 px the last block (:data:`LAYER`) is 16 x 16 with a receptive field of 35 px, enough to see the
    largest object (31 px) whole. (Dilating the last two blocks, receptive field 51 px, gave the same
    accuracy but Grad-CAM peaks up to 8 px outside squares: pointing game 0.93 instead of 0.995.)
    """

    def __init__(self, classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(3, 16, stride=2),
            _block(16, 24),
            _block(24, 32, stride=2),
            _block(32, 32),
            _block(32, 40),
            _block(40, 40),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(40, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def net() -> nn.Module:
    """A fresh, untrained :class:`ShapesNet` (train mode, seeded by the global RNG)."""
    return ShapesNet()


def load() -> nn.Module:
    """The shipped trained :class:`ShapesNet` in eval mode, read offline from ``camfn/assets/shapes.pt``.

    Example:
        >>> from camfn import shapes
        >>> model = shapes.load()
        >>> model.training, model(shapes.make(2).images).shape
        (False, torch.Size([2, 5]))
    """
    model = net()
    with importlib.resources.as_file(importlib.resources.files("camfn") / "assets" / WEIGHTS) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def demo_image() -> tuple[Tensor, int, Tensor]:
    """A fixed demo sample: ``(image (1, 3, 64, 64), label, box (4,))``.

    Example:
        >>> from camfn import shapes
        >>> x, label, box = shapes.demo_image()
        >>> tuple(x.shape), shapes.CLASSES[label]
        ((1, 3, 64, 64), 'triangle')
    """
    batch = make(8, seed=TEST_SEED + 7)
    i = 4  # a triangle left of centre, crossed by clutter
    return batch.images[i : i + 1], int(batch.labels[i]), batch.boxes[i]
