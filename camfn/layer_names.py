"""Layers a user can name: listing them with output shapes, the default layer, and name resolution.

A layer is a node name of the trace (``"layer4.1.relu_1"``), a module path (``"layer4"``: the last node
inside that module), the module object itself, or a list of these (one map per layer).

Example:
    >>> import torchvision, camfn
    >>> model = torchvision.models.resnet18().eval()
    >>> [info.name for info in camfn.layers(model)][-4:]
    ['layer4.1.relu_1', 'avgpool', 'flatten', 'fc']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from .cut import Cut
from .errors import InputError, LayerError
from .hooks import HookPolicy
from .tracing import Model, Params, Traced, layer_list, traced

__all__ = [
    "Layer",
    "LayerInfo",
    "channel_first",
    "default_layer",
    "input_nodes",
    "layers",
    "resolve_layers",
    "spatial",
    "token_layer",
]

Layer = str | nn.Module


class LayerInfo(NamedTuple):
    """One traced node: its name (what to pass as ``layer``), op, module type and output shape."""

    name: str
    op: str
    module: str
    shape: tuple[int, ...] | None


def _module_path(model: Model, layer: nn.Module) -> str:
    if isinstance(model, nn.Module):
        for path, module in model.named_modules():
            if module is layer:
                return path
    raise LayerError(
        f"the module {type(layer).__name__} passed as layer is not a submodule of the model; "
        "pass one of model.modules() or its path as a string"
    )


def layer_names(model: Model, layer: Layer | Sequence[Layer] | None) -> list[str] | None:
    """Normalise ``layer`` to a list of names (modules are turned into their paths)."""
    items = layer_list(layer)
    if items is None:
        return None
    out = []
    for item in items:
        if isinstance(item, nn.Module):
            out.append(_module_path(model, item))
        elif isinstance(item, str) and item:
            out.append(item)
        else:
            raise LayerError(
                f"layer {item!r} ({type(item).__name__}) is not a layer name: pass a node name or module path "
                "string (camfn.layers(model, x) lists them), a submodule, or a list of these"
            )
    return out


def spatial(shape: tuple[int, ...] | None) -> bool:
    """True for ``(B, K, *spatial)`` with at least one spatial extent above 1."""
    return shape is not None and len(shape) >= 3 and math.prod(shape[2:]) > 1


def default_node(trace: Traced, x: Tensor) -> str:
    """The last module output of shape ``(B, K, h, w, ...)`` with ``h * w > 1`` (as torchcam chooses).

    Only nodes computed from the input ``x`` count (never a position bias built from weights alone), only
    channel-first outputs (every spatial extent the input's divided by one common stride, so a
    channels-last ``(B, h, w, C)`` output is skipped), and under ``torch.export`` only nodes that end a
    module call (never an internal view of an attention block).
    """
    shapes = trace.node_shapes(x)
    live = input_nodes(trace)
    for node in reversed(list(trace.qualname)):
        info = shapes.get(node)
        if info is None or not spatial(tuple(info[0])) or len(info[0]) != x.ndim or node not in live:
            continue
        if not channel_first(tuple(info[0]), tuple(x.shape)):
            continue
        if trace.tracer == "export" and not _module_output(trace, node):
            continue
        return node
    tokens = token_layer(trace, x)
    hint = (
        f"for this transformer pass layer={tokens!r}, layout='tokens' (the last block's first norm)"
        if tokens
        else "for transformer tokens pass a layer and layout='tokens'"
    )
    raise LayerError(
        "no layer of this model has a spatial output (B, K, h, w) with h * w > 1 for an input of shape "
        f"{tuple(x.shape)}; pass layer= explicitly (camfn.layers(model, x) lists the candidates; {hint})"
    )


def channel_first(shape: tuple[int, ...], x_shape: tuple[int, ...]) -> bool:
    """True when ``shape`` ``(B, K, *s)`` reads as channels first for an input ``(B, C, *S)``: the
    strides ``S_i / s_i`` agree within a factor 1.5 (rounding of odd sizes), unlike a channels-last
    ``(B, h, w, C)`` read as ``K = h``.

    Example:
        >>> channel_first((1, 32, 8, 8), (1, 3, 64, 64)), channel_first((1, 8, 8, 32), (1, 3, 64, 64))
        (True, False)
    """
    ratios = [big / small for big, small in zip(x_shape[2:], shape[2:], strict=True) if small > 0]
    return bool(ratios) and max(ratios) <= 1.5 * min(ratios)


def input_nodes(trace: Traced) -> set[str]:
    """Names of the nodes computed from the first input ``x`` (not from weights or other inputs alone)."""
    graph = trace.module.graph
    first = next((n for n in graph.nodes if n.op == "placeholder"), None)
    live: set[fx.Node] = set()
    for n in graph.nodes:
        if n is first or any(a in live for a in n.all_input_nodes):
            live.add(n)
    return {n.name for n in live}


def _is_norm(trace: Traced, node: fx.Node) -> bool:
    if node.op == "call_module":
        return "norm" in type(trace.module.get_submodule(node.target)).__name__.lower()
    return "norm" in str(node.target).lower()


def token_layer(trace: Traced, x: Tensor) -> str | None:
    """The last transformer block's first norm: the layer to explain a ViT-like model at.

    Among module outputs computed from ``x`` that are norms with ``(B, N, D)`` outputs, grouped by parent
    module, the first norm of the last parent holding two or more (``norm1``/``norm2``, ``ln_1``/``ln_2``,
    ``layernorm_before``/``layernorm_after``). ``None`` when the model has no such blocks.

    Example:
        >>> import torch, torchvision
        >>> from camfn.tracing import traced
        >>> vit = torchvision.models.VisionTransformer(32, 16, 2, 2, 16, 32).eval()
        >>> token_layer(traced(vit, None, torch.zeros(1, 3, 32, 32)), torch.zeros(1, 3, 32, 32))
        'encoder.layers.encoder_layer_1.ln_1'
    """
    shapes, live = trace.node_shapes(x), input_nodes(trace)
    nodes = {n.name: n for n in trace.module.graph.nodes}
    blocks: dict[str, list[str]] = {}
    for node, name in trace.qualname.items():
        info = shapes.get(node)
        if info is None or len(info[0]) != 3 or node not in live or not _is_norm(trace, nodes[node]):
            continue
        if trace.tracer == "export" and not _module_output(trace, node):
            continue
        blocks.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
    found = [names[0] for names in blocks.values() if len(names) >= 2]
    return found[-1] if found else None


def _module_output(trace: Traced, node: str) -> bool:
    """An exported node named by a module path alone (the last node of a leaf module's call)."""
    name = trace.qualname[node]
    base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
    return name in trace.modules or base in trace.modules


def _example(x: Tensor | Sequence[int] | None) -> Tensor | None:
    if x is None or isinstance(x, Tensor):
        return x
    try:
        shape = tuple(int(s) for s in x)
    except (TypeError, ValueError):
        raise InputError(f"x must be a tensor or a shape: pass e.g. (1, 3, 224, 224), got {x!r}") from None
    return torch.empty(shape)


def _probe(model: Model, x: Tensor | None) -> Tensor | None:
    """A probe input in the model's own dtype and device (so a float64 model gets a float64 probe)."""
    if x is None or not isinstance(model, nn.Module) or (x.numel() == 0 and x.ndim == 0):
        return x
    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    if ref is not None and (x.dtype != ref.dtype or x.device != ref.device) and x.is_floating_point():
        return torch.zeros(x.shape, dtype=ref.dtype, device=ref.device)
    return x


def default_layer(
    model: Model,
    x: Tensor | Sequence[int],
    *,
    params: Params | None = None,
    hooks: HookPolicy = "error",
    tracer_options: dict[str, Any] | None = None,
    tracer: str = "auto",
) -> str:
    """The layer ``layer=None`` picks: the one the model family's adapter names (:mod:`camfn.adapters`, e.g.
    a Hugging Face ViT's last block's first norm), else the last module output whose spatial extent is above 1.

    Example:
        >>> import torchvision, camfn
        >>> camfn.default_layer(torchvision.models.resnet18().eval(), (1, 3, 64, 64))
        'layer4.1.relu_1'
    """
    from .adapters import defaults

    probe = _probe(model, _example(x))
    trace = traced(model, params, probe, tracer=tracer, hooks=hooks, tracer_options=tracer_options)
    if isinstance(model, nn.Module) and probe is not None:
        hint = defaults(model, trace.defaults if params is None else params, trace, probe)
        if hint.layer is not None:
            return hint.layer
    return trace.qualname[default_node(trace, probe)]


def layers(
    model: Model,
    x: Tensor | Sequence[int] | None = None,
    *,
    params: Params | None = None,
    hooks: HookPolicy = "error",
    tracer_options: dict[str, Any] | None = None,
    tracer: str = "auto",
) -> list[LayerInfo]:
    """List the layers a user can pass, in execution order, with output shapes for input ``x``.

    Args:
        model: the model (not modified), or a function ``model_fn(params, x)`` (then pass ``params``).
        x: an example input or its shape, e.g. ``(1, 3, 224, 224)``; without it shapes are ``None``.
        tracer: ``"auto"``, ``"fx"`` or ``"export"`` (``torch.export``; needs ``x``), as the methods' option.

    Example:
        >>> import torchvision, camfn
        >>> info = camfn.layers(torchvision.models.resnet18().eval(), (1, 3, 64, 64))
        >>> info[-4]
        LayerInfo(name='layer4.1.relu_1', op='call_module', module='ReLU', shape=(1, 512, 2, 2))
    """
    probe = _probe(model, _example(x))
    trace = traced(model, params, probe, tracer=tracer, hooks=hooks, tracer_options=tracer_options)
    shapes = trace.node_shapes(probe) if probe is not None else {}
    nodes = {n.name: n for n in trace.module.graph.nodes}
    out = []
    for name, qual in trace.qualname.items():
        node = nodes[name]
        if node.op == "call_module":
            kind = type(trace.module.get_submodule(node.target)).__name__
        else:
            kind = getattr(node.target, "__name__", str(node.target))
        info = shapes.get(name)
        out.append(LayerInfo(qual, node.op, kind, tuple(info[0]) if info else None))
    return out


def resolve_layers(
    trace: Traced, model: Model, layer: Layer | Sequence[Layer] | None, x: Tensor
) -> tuple[list[str], bool]:
    """fx node names for ``layer`` (``None``: the default layer) and whether a single layer was given."""
    names = layer_names(model, layer)
    if names is None and isinstance(model, Cut):
        return [trace.resolve("head")], True
    if names is None:
        return [default_node(trace, x)], True
    single = isinstance(layer, str | nn.Module)
    nodes = [trace.resolve(n) for n in names]
    if len(set(nodes)) != len(nodes):
        raise LayerError(
            f"the same layer is requested twice: {names}; pass each layer once (a module path and the node "
            "name of its last node are the same layer)"
        )
    return nodes, single
