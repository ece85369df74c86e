"""``python -m camfn.demo``: every method on a torchvision resnet18 and a synthetic image, printed as a table.

Runs offline: the model has seeded random weights (no downloads) and the image is drawn here. The picture
demo (``make demo``: overlay PNGs on the shipped trained model) is ``camfn explain`` (see :mod:`camfn.cli`).

Run: ``python -m camfn.demo``.
"""

from __future__ import annotations

import time

import torch
import torchvision

import camfn

SHADES = " .:-=+*#%@"
QUICK = {"sscam": {"n": 2}, "iscam": {"n": 2}, "smooth_gradcampp": {"n": 4}}  # fewer noisy samples for the demo


def image(size: int = 112, seed: int = 0) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """A noisy background with one bright square; returns ``(1, 3, size, size)`` and the square's box."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(1, 3, size, size, generator=g)
    y0, x0, side = size // 5, size // 2, size // 3
    x[:, :, y0 : y0 + side, x0 : x0 + side] += torch.tensor([1.5, -0.5, 0.8])[:, None, None]
    return x, (y0, x0, y0 + side, x0 + side)


def ascii_map(m: torch.Tensor, width: int = 28) -> str:
    """A ``(H, W)`` map in ``[0, 1]`` as text, ``width`` characters wide."""
    small = camfn.postprocess.resize(m[None], (width // 2, width))[0]
    return "\n".join("".join(SHADES[min(int(v * len(SHADES)), len(SHADES) - 1)] for v in row) for row in small)


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    params = camfn.params(model)
    x, (y0, x0, y1, x1) = image()
    layer = camfn.default_layer(model, x)
    print(f"camfn {camfn.__version__} on torchvision resnet18 (random weights), input {tuple(x.shape)}")
    print(f"layer=None picks {layer!r}; target=None explains the top-1 class; sscam/iscam with n=2\n")
    print(f"{'method':<22}{'first call':>12}{'next call':>12}{'peak (y, x)':>14}{'mass in box':>13}")
    maps = {}
    for name, fn in camfn.METHODS.items():
        options = QUICK.get(name, {})
        start = time.perf_counter()
        fn(model, params, x, **options)
        first = time.perf_counter() - start
        start = time.perf_counter()
        m = fn(model, params, x, **options)[0]
        again = time.perf_counter() - start
        peak = divmod(int(m.argmax()), m.shape[1])
        inside = float(m[y0:y1, x0:x1].sum() / m.sum().clamp(min=1e-12))
        maps[name] = m
        print(f"{name:<22}{first * 1e3:>10.1f}ms{again * 1e3:>10.1f}ms{peak!s:>14}{inside:>13.2f}")
    print("\ngradcam map (random weights: the map shows the network, not the object):")
    print(ascii_map(maps["gradcam"]))
    model_after = camfn.params(model)
    assert all(torch.equal(params[k], model_after[k]) for k in params), "the model was modified"
    print("\nmodel untouched: parameters, buffers, modes and hooks as before.")


if __name__ == "__main__":
    main()
