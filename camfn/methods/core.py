"""The one driver every method shares: checks, trace, forward/gradients, combine, reduce, post-process.

A method is a *combine* function ``(A, G) -> C``: ``A`` the activation ``(B, 1, K, *spatial)``, ``G`` the
gradients ``(B, T, K, *spatial)`` (``None`` for gradient-free methods), ``C`` the per-channel
contributions ``(B, T, K, *spatial)`` (e.g. ``w_k A_k``). :func:`reduce` turns them into raw maps
(``sum_k C_k``, or their first principal component with ``eigen_smooth=True``); :func:`explain` does
everything else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from ..checks import check_input, check_model
from ..errors import LayerError, OptionError, nearest
from ..forward import Params, activations, gradients
from ..graph import HookPolicy, Layer, Traced, engine, resolve_layers, spatial, trace
from ..postprocess import Size, finish, first_component
from ..targets import Target, scores

__all__ = ["Combine", "Maps", "Options", "explain", "finalize", "num_classes", "prepare", "reduce"]

Maps = Tensor | list[Tensor]
Combine = Callable[[Tensor, Tensor | None], Tensor]


class Options(TypedDict, total=False):
    """Keyword options every method takes.

    relu: clamp the raw map at 0 (default True). size: ``"input"`` (default), ``None`` (layer
    resolution) or ``(h, w)``. normalize: min-max to ``[0, 1]`` per map (default True). hooks:
    ``"error"`` / ``"ignore"`` / ``"keep"`` for hooks camfn did not register (see :func:`camfn.graph.trace`).
    tracer_options: passed to the fx tracer (the escape hatch for untraceable code).
    eigen_smooth: replace ``sum_k C_k`` by the first principal component of the contributions ``C``.
    aug_smooth: average the maps over horizontal flips x input multipliers {1.0, 1.1, 0.9}.
    """

    relu: bool
    size: Size
    normalize: bool
    hooks: HookPolicy
    tracer_options: dict[str, Any] | None
    eigen_smooth: bool
    aug_smooth: bool


_DEFAULTS: dict[str, Any] = {
    "relu": True,
    "size": "input",
    "normalize": True,
    "hooks": "error",
    "tracer_options": None,
    "eigen_smooth": False,
}


def _options(options: dict[str, Any], extra: Sequence[str] = ()) -> dict[str, Any]:
    known = [*_DEFAULTS, *extra]
    for key in options:
        if key not in known:
            hint = nearest(key, known, n=3)
            raise OptionError(
                f"unknown option {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "") + f" Options: {known}"
            )
    size = options.get("size", "input")
    if not (
        size is None or size == "input" or (isinstance(size, tuple | list) and all(isinstance(s, int) for s in size))
    ):
        raise OptionError(f"size={size!r}: use 'input', None or a tuple of ints such as (224, 224)")
    return {**_DEFAULTS, **options}


def prepare(
    model: nn.Module, x: Tensor, layer: Layer | Sequence[Layer] | None, opts: dict[str, Any]
) -> tuple[Traced, list[str], bool]:
    """Check inputs, trace (cached), resolve layers to node names; check they have spatial outputs."""
    check_input(x)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_model(model)
    traced = trace(model, hooks=opts["hooks"], tracer_options=opts["tracer_options"])
    nodes, single = resolve_layers(traced, model, layer, x)
    shapes = traced.node_shapes(x)
    for node in nodes:
        info = shapes[node]
        shape = None if info is None else tuple(info[0])
        if shape is None or len(shape) != x.ndim or not spatial(shape):
            raise LayerError(
                f"layer {traced.qualname[node]!r} outputs {shape}, not a (B, K, *spatial) map with spatial size "
                f"above 1 for an input of shape {tuple(x.shape)}; pick an earlier layer "
                "(camfn.layers(model, x) lists the shapes)"
            )
    return traced, nodes, single


def reduce(contributions: Tensor, eigen: bool) -> Tensor:
    """Raw maps from contributions ``(B, T, K, *spatial)``: ``sum_k C_k``, or the first principal component."""
    if eigen:
        return first_component(contributions, ndim=contributions.ndim - 3)
    return contributions.sum(2)


def finalize(raw: list[Tensor], x: Tensor, opts: dict[str, Any], squeeze: bool, single: bool) -> Maps:
    """Post-process raw maps ``(B, T, *spatial)`` per layer, squeeze ``T`` and unwrap a single layer."""
    maps = [finish(m, x, relu=opts["relu"], size=opts["size"], normalize=opts["normalize"]) for m in raw]
    if squeeze:
        maps = [m.squeeze(1) for m in maps]
    return maps[0] if single else maps


def num_classes(traced: Traced, x: Tensor) -> int | None:
    """Number of outputs when the model returns ``(B, C)`` logits, else ``None``."""
    info = traced.node_shapes(x)["output"]
    if isinstance(info, tuple) and len(info) == 2 and isinstance(info[0], torch.Size) and len(info[0]) == 2:
        return int(info[0][1])
    return None


def explain(
    model: nn.Module,
    p: Params,
    x: Tensor,
    layer: Layer | Sequence[Layer] | None,
    target: Target,
    combine: Combine,
    *,
    uses_gradient: bool = True,
    **options: Any,
) -> Maps:
    """Run a method given by its ``combine`` function; see the module docstring."""
    opts = _options(options)
    traced, nodes, single = prepare(model, x, layer, opts)
    if uses_gradient:
        score = scores(target, x.shape[0], num_classes(traced, x))
        result = gradients(engine(traced, nodes), p, x, score)
        parts = [combine(a.unsqueeze(1), g) for a, g in zip(result.acts, result.grads, strict=True)]
        squeeze = result.squeeze
    else:
        _, acts = activations(engine(traced, nodes, with_output=False), p, x)
        parts = [combine(a.unsqueeze(1), None) for a in acts]
        squeeze = True
    return finalize([reduce(c, opts["eigen_smooth"]) for c in parts], x, opts, squeeze, single)
