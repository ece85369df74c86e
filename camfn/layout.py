r"""Token and channels-last layouts: turn any layer's output into channel-first maps ``(B, K, h, w)``.

Transformers give ``(B, N, D)`` tokens (ViT: one class token then an ``h x w`` patch grid; DeiT: two
prefix tokens) and Swin gives channels-last grids ``(B, h, w, C)``. The option ``layout=`` of every method
maps the activation ``A`` and its gradient ``G`` with the same function right after they are taken, so
every method sees ``(B, K, h, w)``:

.. math:: \operatorname{tokens}(A)_{d, i, j} = A_{p + i w + j,\; d} \qquad
          \operatorname{nhwc}(A)_{c, i, j} = A_{i, j, c}

with ``p`` the number of prefix tokens. Accepted values:

=================================  ==========================================================================
``layout``                         meaning
=================================  ==========================================================================
``None``                           the layer already gives ``(B, K, *spatial)``
``"tokens"``                       ``(B, p + h w, D)``; ``p`` from the model's ``num_prefix_tokens`` (timm)
                                   or the smallest ``p`` leaving a grid with the input's aspect ratio
``"vit"`` / ``"deit"``             tokens with ``p = 1`` / ``p = 2``
``"nhwc"``                         channels-last ``(B, *spatial, C)`` (torchvision and timm Swin)
``Tokens(prefix, grid)``           tokens with the prefix count and/or the grid ``(h, w)`` stated
an einops pattern                  e.g. ``"b (h w) d -> b d h w"``; ``h`` and ``w`` inferred from the input
a callable                         ``fn(t) -> (B, K, *spatial)``; it must only select and move entries (it is
                                   applied to gradients too, and inverted for ``ablationcam``)
=================================  ==========================================================================

Example:
    >>> import torch
    >>> from camfn.layout import layout_fn
    >>> to_maps = layout_fn("vit", (2, 1 + 4 * 4, 8), (2, 3, 32, 32))
    >>> to_maps(torch.randn(2, 17, 8)).shape
    torch.Size([2, 8, 4, 4])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import einops
import torch
from torch import Tensor

from .errors import LayerError, OptionError

__all__ = [
    "LayoutSpec",
    "Tokens",
    "grid_of",
    "layout_fn",
    "patch_gradient_vanishes",
    "prefix_of",
    "pull_back",
    "resolve_tokens",
    "tokens_to_maps",
]

MAX_PREFIX = 8
"""The largest number of prefix (class, distillation, register) tokens ``"tokens"`` tries."""


@dataclass(frozen=True)
class Tokens:
    """A token layout ``(B, prefix + h * w, D)``; ``None`` fields are inferred from the input."""

    prefix: int | None = None
    grid: tuple[int, int] | None = None


LayoutSpec = None | str | Tokens | Callable[[Tensor], Tensor]
_NAMED = {"vit": Tokens(prefix=1), "deit": Tokens(prefix=2), "tokens": Tokens()}
_CHANNELS_LAST = ("nhwc", "channels_last")


def grid_of(n: int, spatial: Sequence[int]) -> tuple[int, int] | None:
    """The grid ``(h, w)`` with ``h * w = n`` and the aspect ratio of an input of spatial size ``(H, W)``.

    Example:
        >>> grid_of(16, (64, 64)), grid_of(8, (32, 64)), grid_of(7, (64, 64))
        ((4, 4), (2, 4), None)
    """
    if n < 1 or len(spatial) != 2:
        return None
    big_h, big_w = spatial
    h = round(math.sqrt(n * big_h / big_w))
    for cand in (h - 1, h, h + 1):
        if cand >= 1 and n % cand == 0 and cand * big_w == (n // cand) * big_h:
            return cand, n // cand
    return None


def tokens_to_maps(t: Tensor, prefix: int, grid: tuple[int, int]) -> Tensor:
    """``(B, prefix + h w, D) -> (B, D, h, w)``: drop the prefix tokens, fold the patch tokens into the grid."""
    return einops.rearrange(t[:, prefix:], "b (h w) d -> b d h w", h=grid[0], w=grid[1])


def _channels_first(t: Tensor) -> Tensor:
    return einops.rearrange(t, "b ... c -> b c ...")


def resolve_tokens(spec: Tokens, shape: Sequence[int], spatial: Sequence[int], model_prefix: int | None) -> Tokens:
    """``spec`` with its prefix and grid filled in for a ``(B, N, D)`` layer of ``shape`` and an input of
    spatial size ``spatial``: the stated prefix, else ``model_prefix``, else the smallest leaving a grid.

    Example:
        >>> resolve_tokens(Tokens(), (1, 18, 8), (64, 64), None)
        Tokens(prefix=2, grid=(4, 4))
    """
    if len(shape) != 3:
        raise LayerError(
            f"layout='tokens' needs a (B, N, D) token layer, but this layer outputs {tuple(shape)}; "
            "pick a transformer block's output or norm (camfn.layers(model, x) lists the shapes)"
        )
    n = shape[1]
    prefixes = [spec.prefix] if spec.prefix is not None else []
    if not prefixes:
        prefixes = [model_prefix] if model_prefix is not None else list(range(min(MAX_PREFIX, n - 1) + 1))
    for p in prefixes:
        grid = spec.grid or grid_of(n - p, spatial)
        if grid is not None and p + grid[0] * grid[1] == n:
            return Tokens(p, grid)
    raise LayerError(
        f"cannot fold {n} tokens into a patch grid for an input of spatial size {tuple(spatial)} "
        f"(prefix tokens tried: {prefixes}); state it: layout=camfn.layout.Tokens(prefix=P, grid=(h, w))"
    )


def _pattern(pattern: str, shape: Sequence[int], spatial: Sequence[int]) -> Callable[[Tensor], Tensor]:
    lhs = pattern.split("->")[0]
    axes: dict[str, int] = {}
    if "(h w)" in lhs.replace("  ", " ") and len(shape) == 3:
        grid = grid_of(shape[1], spatial)
        if grid is None:
            raise LayerError(f"cannot fold {shape[1]} tokens into a grid for input {tuple(spatial)}; pass Tokens(...)")
        axes = {"h": grid[0], "w": grid[1]}
    return lambda t: einops.rearrange(t, pattern, **axes)


def layout_fn(
    spec: LayoutSpec, shape: Sequence[int], x_shape: Sequence[int], model_prefix: int | None = None
) -> Callable[[Tensor], Tensor] | None:
    """The function mapping a layer output of ``shape`` to ``(B, K, *spatial)`` for an input of ``x_shape``.

    ``model_prefix`` is the model's own prefix-token count (timm's ``num_prefix_tokens``) when known.
    ``None`` for ``spec=None``. Raises :class:`~camfn.errors.OptionError` for an unknown ``spec`` and
    :class:`~camfn.errors.LayerError` when the shape cannot be folded.
    """
    spatial = tuple(x_shape[2:])
    if spec is None:
        return None
    if isinstance(spec, str) and spec in _NAMED:
        spec = _NAMED[spec]
    if isinstance(spec, Tokens):
        tok = resolve_tokens(spec, shape, spatial, model_prefix)
        return lambda t: tokens_to_maps(t, tok.prefix or 0, tok.grid)  # type: ignore[arg-type]
    if isinstance(spec, str) and spec in _CHANNELS_LAST:
        return _channels_first
    if isinstance(spec, str) and "->" in spec:
        return _pattern(spec, shape, spatial)
    if callable(spec) and not isinstance(spec, str):
        return spec
    raise OptionError(
        f"layout={spec!r} is not understood; use None, 'tokens', 'vit', 'deit', 'nhwc', "
        "camfn.layout.Tokens(prefix=..., grid=...), an einops pattern such as 'b (h w) d -> b d h w', or a callable"
    )


def prefix_of(fn: Callable[[Tensor], Tensor], shape: Sequence[int]) -> int:
    """How many leading tokens of a ``(B, N, D)`` layer ``fn`` drops (0 for other layouts)."""
    if len(shape) != 3:
        return 0
    probe = torch.arange(shape[1], dtype=torch.float32, device="cpu").reshape(1, -1, 1).expand(1, shape[1], shape[2])
    try:
        kept = fn(probe)
    except Exception:
        return 0
    return int(kept.min()) if kept.numel() else 0


def patch_gradient_vanishes(g: Tensor, prefix: int) -> bool:
    """True when the gradient ``(B, T, N, D)`` is exactly zero on every patch token but not on the prefix.

    That happens at the last block of a ViT whose head reads only the class token: nothing after the
    block mixes tokens, so the patch tokens cannot change the score and every map would be flat.
    """
    if prefix < 1 or g.ndim != 4:
        return False
    return bool((g[:, :, prefix:] == 0).all()) and bool((g[:, :, :prefix] != 0).any())


def pull_back(fn: Callable[[Tensor], Tensor], like: Tensor, maps: Tensor) -> Tensor:
    """Carry ``maps`` (in the layout's ``(B, K, *spatial)`` frame) back to the layer's frame of ``like``.

    For a layout that only selects and moves entries this is its transpose: each position of the layer
    gets the value of the map position it was moved to, and dropped positions (prefix tokens) get 0.
    """
    _, pull = torch.func.vjp(fn, torch.zeros_like(like))
    return pull(maps)[0]
