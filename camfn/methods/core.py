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
from ..graph import HookPolicy, Layer, Traced, engine, resolve_layers, spatial, trace, trace_export
from ..layout import LayoutSpec, layout_fn, patch_gradient_vanishes, prefix_of
from ..postprocess import Size, finish, first_component
from ..targets import Output, Target, concrete, pick, scores

__all__ = [
    "Combine",
    "Maps",
    "Options",
    "explain",
    "finalize",
    "num_classes",
    "per_target",
    "prepare",
    "reduce",
    "to_maps",
    "traced_model",
]

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
    output: the part of the model's output the target reads: ``None`` (default, as it is), a dict key or
    attribute (``"out"``, ``"logits"``), a tuple index or a callable (see :func:`camfn.targets.pick`).
    """

    relu: bool
    size: Size
    normalize: bool
    hooks: HookPolicy
    tracer_options: dict[str, Any] | None
    eigen_smooth: bool
    aug_smooth: bool
    layout: LayoutSpec
    tracer: str
    output: Output


_DEFAULTS: dict[str, Any] = {
    "relu": True,
    "size": "input",
    "normalize": True,
    "hooks": "error",
    "tracer_options": None,
    "eigen_smooth": False,
    "output": None,
    "layout": None,
    "tracer": "fx",
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


def traced_model(model: nn.Module, x: Tensor, opts: dict[str, Any]) -> Traced:
    """The model traced by ``opts["tracer"]``: torch.fx (default) or ``torch.export`` (cached)."""
    if opts.get("tracer", "fx") == "export":
        return trace_export(model, x, hooks=opts["hooks"])
    if opts.get("tracer", "fx") != "fx":
        raise OptionError(f"tracer={opts['tracer']!r}: use 'fx' (default) or 'export' (torch.export)")
    return trace(model, hooks=opts["hooks"], tracer_options=opts["tracer_options"])


def prepare(
    model: nn.Module, x: Tensor, layer: Layer | Sequence[Layer] | None, opts: dict[str, Any]
) -> tuple[Traced, list[str], bool]:
    """Check inputs, trace (cached), resolve layers to node names; check they give spatial maps.

    With a ``layout`` option the check applies to the layer's output *after* the layout.
    """
    check_input(x)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_model(model)
    traced = traced_model(model, x, opts)
    if layer is None and opts.get("layout") is not None:
        raise LayerError(
            f"layout={opts['layout']!r} needs an explicit layer (the default layer is chosen for (B, K, h, w) "
            "maps); for a ViT pass e.g. layer='encoder.layers.encoder_layer_<L-1>.ln_1' (the last block's first norm)"
        )
    nodes, single = resolve_layers(traced, model, layer, x)
    for node in nodes:
        _check_spatial(traced, model, node, x, opts)
    return traced, nodes, single


def _check_spatial(traced: Traced, model: nn.Module, node: str, x: Tensor, opts: dict[str, Any]) -> None:
    info = traced.node_shapes(x)[node]
    shape = None if info is None else tuple(info[0])
    name = traced.qualname[node]
    if shape is not None and opts.get("layout") is not None:
        fn = to_maps(traced, model, node, x, opts)
        shape = tuple(fn(torch.empty(shape, device="meta")).shape)
    if shape is None or len(shape) != x.ndim or not spatial(shape):
        hint = ""
        if shape is not None and len(shape) == 3 and x.ndim == 4 and opts.get("layout") is None:
            hint = "; for (B, N, D) tokens of a transformer pass layout='tokens' (or 'vit', 'deit', an einops pattern)"
        raise LayerError(
            f"layer {name!r} outputs {shape}, not a (B, K, *spatial) map with spatial size above 1 for an input "
            f"of shape {tuple(x.shape)}{hint}; otherwise pick an earlier layer "
            "(camfn.layers(model, x) lists the shapes)"
        )


def to_maps(traced: Traced, model: nn.Module, node: str, x: Tensor, opts: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    """The ``layout`` option of ``opts`` as a function ``layer output -> (B, K, *spatial)`` (identity if unset)."""
    info = traced.node_shapes(x)[node]
    if opts.get("layout") is None or info is None:
        return _identity
    prefix = getattr(model, "num_prefix_tokens", None)
    fn = layout_fn(opts["layout"], tuple(info[0]), tuple(x.shape), prefix if isinstance(prefix, int) else None)
    return fn or _identity


def _identity(t: Tensor) -> Tensor:
    return t


def per_target(fn: Callable[[Tensor], Tensor], g: Tensor) -> Tensor:
    """Apply a layout ``fn`` to gradients ``(B, T, ...)`` (``T`` folded into the batch and unfolded again)."""
    if fn is _identity:
        return g
    return fn(g.flatten(0, 1)).unflatten(0, g.shape[:2])


def _check_patch_gradients(
    traced: Traced, model: nn.Module, p: Params, x: Tensor, score: Any, node: str, g: Tensor, opts: dict[str, Any]
) -> None:
    """Raise when a token layer's gradient is zero on every patch token (see :func:`patch_gradient_vanishes`)."""
    info = traced.node_shapes(x)[node]
    shape = tuple(info[0])
    prefix = prefix_of(to_maps(traced, model, node, x, opts), shape)
    if not patch_gradient_vanishes(g, prefix):
        return
    better = _token_mixing_layer(traced, p, x, score, node, shape, prefix)
    name = traced.qualname[node]
    raise LayerError(
        f"layer {name!r}: the gradient is exactly zero on every patch token (only the {prefix} prefix token(s) "
        "reach the output), so every map would be flat. Nothing after this layer mixes tokens: pick a layer "
        "before the last attention, "
        + (f"e.g. layer={better!r}" if better else "e.g. the last block's first norm (ln_1 / norm1)")
    )


def _token_mixing_layer(
    traced: Traced, p: Params, x: Tensor, score: Any, node: str, shape: tuple[int, ...], prefix: int
) -> str | None:
    """The latest norm layer before ``node`` with the same token shape whose patch gradient is nonzero."""
    shapes = traced.node_shapes(x)
    order = list(traced.qualname)
    graph_nodes = {n.name: n for n in traced.module.graph.nodes}
    candidates = []
    for name in reversed(order[: order.index(node)]):
        n = graph_nodes[name]
        info = shapes.get(name)
        if info is None or tuple(info[0]) != shape or n.op != "call_module":
            continue
        if "norm" in type(traced.module.get_submodule(n.target)).__name__.lower():
            candidates.append(name)
        if len(candidates) == 4:
            break
    if not candidates:
        return None
    result = gradients(engine(traced, candidates), p, x, score)
    for name, g in zip(candidates, result.grads, strict=True):
        if not bool((g[:, :, prefix:] == 0).all()):
            return traced.qualname[name]
    return None


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


def num_classes(traced: Traced, x: Tensor, output: Output = None) -> int | None:
    """Number of outputs when the model (or the ``output`` part of it) is ``(B, C)`` logits, else ``None``."""
    info = traced.node_shapes(x)["output"]
    if output is not None:
        try:
            info = pick(info, output) if isinstance(output, str | int) else None
        except Exception:  # an attribute of an object fake propagation did not keep: checked at run time
            return None
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
    fns = [to_maps(traced, model, n, x, opts) for n in nodes]
    if uses_gradient:
        score = scores(target, x.shape[0], num_classes(traced, x, opts["output"]), opts["output"])
        result = gradients(engine(traced, nodes), p, x, score)
        if opts["layout"] is not None and concrete(x):
            for node, g in zip(nodes, result.grads, strict=True):
                _check_patch_gradients(traced, model, p, x, score, node, g, opts)
        parts = [
            combine(fn(a).unsqueeze(1), per_target(fn, g))
            for fn, a, g in zip(fns, result.acts, result.grads, strict=True)
        ]
        squeeze = result.squeeze
    else:
        _, acts = activations(engine(traced, nodes, with_output=False), p, x)
        parts = [combine(fn(a).unsqueeze(1), None) for fn, a in zip(fns, acts, strict=True)]
        squeeze = True
    return finalize([reduce(c, opts["eigen_smooth"]) for c in parts], x, opts, squeeze, single)
