r"""A faster inference-only program for the CPU: BatchNorm folded, ReLU and residual adds fused, weights packed.

The perturbation methods run the network thousands of times without gradients. On the CPU this module
rewrites the traced graph (never the model) for that case:

1. *fold* every eval-mode BatchNorm into the convolution before it. With running statistics
   :math:`(\mu, \sigma^2)`, affine :math:`(\gamma, \beta)`:

   .. math:: s = \gamma / \sqrt{\sigma^2 + \epsilon}, \quad W' = s \cdot W, \quad b' = s (b - \mu) + \beta;

2. *fuse* a ReLU that follows a convolution, and a residual ``conv(x) + other`` followed by a ReLU, into
   one oneDNN convolution (``torch.ops.mkldnn._convolution_pointwise``);
3. *pack* the convolution weights into oneDNN's blocked layout once per call instead of once per forward.

Everything that depends only on the parameters (steps 1 and 3) is split off into a ``weights`` program,
so :func:`bind` computes it once from the ``params`` it is given and the per-forward program reads the
result: a pure function of ``(params, x)`` still, for any checkpoint. Maps agree with the plain graph up to
float32 rounding. The fast path needs float32 CPU tensors outside ``torch.func`` transforms and
``torch.compile`` (:func:`available`); elsewhere :func:`bind` returns the plain program.

Example:
    >>> import torch, torchvision, camfn
    >>> from camfn.inference import bind
    >>> model = torchvision.models.resnet18().eval()
    >>> p, x = camfn.params(model), torch.randn(2, 3, 64, 64)
    >>> traced = camfn.tracing.trace(model)
    >>> fast = bind(traced, p, x)
    >>> torch.allclose(fast(x), traced.program()(p, x), atol=1e-4)
    True
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .pullback import channels_last
from .rewrite import Program, program
from .runtime import in_transform
from .tracing import Traced

__all__ = ["Inference", "available", "bind", "inference"]

_NORM = (nn.BatchNorm2d,)
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
_ADD = {operator.add, operator.iadd, torch.add}


def available(x: Tensor) -> bool:
    """True when the fused oneDNN path can run for input ``x``.

    Never where gradients may flow: the fused oneDNN ops have no autograd formula.
    """
    return (
        not torch.compiler.is_compiling()  # first: dynamo cannot trace mkldnn.is_available
        and not (torch.is_grad_enabled() and x.requires_grad)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.ndim == 4
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and not in_transform()
    )


def _module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    return root.get_submodule(node.target) if node.op == "call_module" else None


def _is_relu(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(_module(root, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _conv(root: nn.Module, node: fx.Node) -> nn.Conv2d | None:
    m = _module(root, node)
    ok = type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return m if ok and len(node.args) == 1 and not node.kwargs else None  # type: ignore[return-value]


def _attr(graph: fx.Graph, module: str, name: str) -> fx.Node:
    return graph.get_attr(f"{module}.{name}")


def _fold(graph: fx.Graph, conv_node: fx.Node, conv: nn.Conv2d, root: nn.Module) -> tuple[fx.Node, fx.Node | None]:
    """Weight and bias nodes of ``conv``, with a following eval BatchNorm folded in (then erased)."""
    weight = _attr(graph, conv_node.target, "weight")
    bias = _attr(graph, conv_node.target, "bias") if conv.bias is not None else None
    users = list(conv_node.users)
    bn = _module(root, users[0]) if len(users) == 1 else None
    if not (isinstance(bn, _NORM) and not bn.training and bn.track_running_stats and bn.running_mean is not None) or (
        len(users[0].args) != 1 or users[0].kwargs
    ):
        return weight, bias
    node = users[0]
    call = graph.call_function
    scale = call(torch.rsqrt, (call(torch.add, (_attr(graph, node.target, "running_var"), bn.eps)),))
    if bn.affine:
        scale = call(torch.mul, (scale, _attr(graph, node.target, "weight")))
    shift = call(torch.neg, (_attr(graph, node.target, "running_mean"),))
    if bias is not None:
        shift = call(torch.add, (shift, bias))
    bias = call(torch.mul, (shift, scale))
    if bn.affine:
        bias = call(torch.add, (bias, _attr(graph, node.target, "bias")))
    weight = call(torch.mul, (weight, graph.call_method("reshape", (scale, (-1, 1, 1, 1)))))
    node.replace_all_uses_with(conv_node)
    graph.erase_node(node)
    return weight, bias


def _pack(graph: fx.Graph, weight: fx.Node, conv: nn.Conv2d, shape: tuple[int, ...]) -> fx.Node:
    layout = graph.call_method("contiguous", (weight,), {"memory_format": torch.channels_last})
    args = (layout, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(shape))
    return graph.call_function(torch.ops.mkldnn._reorder_convolution_weight, args)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fuse(graph: fx.Graph, root: nn.Module, shapes: dict[str, Any]) -> int:
    """Rewrite every plain ``Conv2d`` call (plus BatchNorm, ReLU, residual add) into one oneDNN call."""
    count = 0
    shapes = dict(shapes)  # grows with the fused nodes
    for node in list(graph.nodes):
        conv = _conv(root, node) if node.op == "call_module" else None
        info = shapes.get(node.args[0].name) if conv is not None and isinstance(node.args[0], fx.Node) else None
        if conv is None or info is None:
            continue
        with graph.inserting_before(node):
            weight, bias = _fold(graph, node, conv, root)
            packed = _pack(graph, weight, conv, tuple(info[0]))
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        user, last = _only_user(node), node
        unary = "none"
        other = None
        if user is not None and user.op == "call_function" and user.target in _ADD and len(user.args) == 2:
            other = next((a for a in user.args if a is not node), None)
            out_shape, other_shape = shapes.get(node.name), shapes.get(getattr(other, "name", ""))
            same = out_shape is not None and other_shape is not None and out_shape[0] == other_shape[0]
            if isinstance(other, fx.Node) and user.args.count(node) == 1 and same:
                last, user = user, _only_user(user)
            else:
                other = None
        if user is not None and _is_relu(root, user):
            unary, last = "relu", user
        with graph.inserting_before(last):  # `other` may be computed after the convolution
            if other is None:
                fused = graph.call_function(
                    torch.ops.mkldnn._convolution_pointwise.default,
                    (node.args[0], packed, bias, *geometry, unary, [], ""),
                )
            else:
                fused = graph.call_function(
                    torch.ops.mkldnn._convolution_pointwise.binary,
                    (node.args[0], other, packed, bias, *geometry, "add", None, unary, [], ""),
                )
        chain = []
        cursor = node
        while cursor is not last:
            chain.append(cursor)
            cursor = next(iter(cursor.users))
        chain.append(last)
        shapes[fused.name] = shapes.get(last.name)
        last.replace_all_uses_with(fused)
        for n in reversed(chain):
            graph.erase_node(n)
        count += 1
    return count


def _static(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from parameters alone (no input flows into them)."""
    static: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method")
            and node.all_input_nodes
            and all(a in static for a in node.all_input_nodes)
        ):
            static.add(node)
    return static


@dataclass
class Inference:
    """``weights(params) -> consts`` (parameter-only work) and ``run(params, x, *consts) -> output``.

    ``fused`` convolutions were rewritten; ``checked`` once the fused program has run (oneDNN refuses some
    fusions only when it runs them: :func:`bind` then falls back to the plain program and sets ``fused=0``).
    """

    weights: Program
    run: Program
    fused: int
    checked: bool = False


def _partition(traced: Traced, graph: fx.Graph, fused: int) -> Inference:
    static = _static(graph)
    boundary = [n for n in graph.nodes if n in static and any(u not in static for u in n.users)]
    wgraph = fx.Graph()
    wenv: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in static:
            wenv[node] = wgraph.node_copy(node, lambda a: wenv[a])
    wgraph.output(tuple(wenv[n] for n in boundary))

    rgraph = fx.Graph()
    renv: dict[fx.Node, fx.Node] = {}
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    for node in inputs:
        renv[node] = rgraph.node_copy(node)
    for i, node in enumerate(boundary):
        renv[node] = rgraph.placeholder(f"camfn_const_{i}")
    for node in graph.nodes:
        if node.op == "placeholder" or node in static:
            continue
        renv[node] = rgraph.node_copy(node, lambda a: renv[a])
    return Inference(program(traced, wgraph), program(traced, rgraph), fused)


def inference(traced: Traced, x: Tensor) -> Inference:
    """The fused, folded, packed rewrite of ``traced`` for inputs shaped like ``x``; cached per shape."""
    key = tuple(x.shape)
    found = traced.cache.inference.get(key)
    if found is None:
        graph = copy.deepcopy(traced.module.graph)
        fused = _fuse(graph, traced.module, traced.node_shapes(x))
        graph.lint()
        found = traced.cache.inference[key] = _partition(traced, graph, fused)
    return found


def bind(traced: Traced, params: dict[str, Tensor], x: Tensor) -> Callable[[Tensor], Any]:
    """``inputs -> output`` for inputs shaped like ``x``: the fast program with ``params``' weights packed once.

    Falls back to the plain traced program where the fast path is not :func:`available`, finds no
    convolution to fuse, or oneDNN refuses a fusion the first time it runs (e.g. on a 1 x 1 map).
    """
    plain_program = traced.program()
    plain_params: list[dict[str, Tensor]] = []  # channels-last copies, made on first use

    def plain(inputs: Tensor) -> Any:
        if not plain_params:
            plain_params.append(channels_last(params))
        return plain_program(plain_params[0], inputs)

    differentiable = torch.is_grad_enabled() and any(v.requires_grad for v in params.values())
    if differentiable or not available(x):
        return plain
    fast = inference(traced, x)
    if not fast.fused:
        return plain
    try:
        consts = fast.weights(params)  # folds and packs into oneDNN's layout from any layout
    except RuntimeError:
        fast.fused = 0
        return plain

    def run(inputs: Tensor) -> Any:
        if not (fast.fused and available(inputs)):
            return plain(inputs)
        if fast.checked:
            return fast.run(params, inputs, *consts)
        try:
            out = fast.run(params, inputs, *consts)
        except RuntimeError:
            out = plain(inputs)  # the plain program raises an error of the model's own
            fast.fused = 0
            return out
        fast.checked = True
        return out

    return run
