r"""Graph rewriting: one program builder, zero-perturbation injection, and the cut after a layer.

Every program camfn runs is built by :func:`program` from a graph in *module form* (the traced graph, or
a rewrite of it: injection, the cut, the CPU inference fusion, guided ReLUs). The builder *lifts* the
model's state: each parameter or buffer read becomes ``params[key]`` and each module call that owns state
becomes a functional call on tensors taken from ``params`` (``F.conv2d(x, params["conv1.weight"], ...)``).
A :class:`Program` is therefore a pure function ``(params, *args) -> output`` that holds no tensor of its
own and swaps nothing on any module: calls from many threads with different ``params`` never meet.

In-place writes in the user's forward (``self.count.add_(1)``, ``x.mul_(2)``) land on camfn's own copies:
the builder clones every graph input or state tensor that an in-place op reaches through views, once, at
the start of the program.

*Injection* (:func:`inject`) makes the activation ``A`` of each requested layer feed ``A + \delta`` to the
rest of the network, with ``\delta`` a new input, and returns ``(output, (A_1, ..., A_n))``. At
``\delta = 0`` the output is unchanged and :math:`\partial S / \partial \delta = \partial S / \partial A`.
The *cut* (:func:`cut_after`) splits the graph into ``head(x) -> (A, extras)`` and
``tail(A, *extras) -> output``.

Example:
    >>> import torch, torchvision, camfn
    >>> from camfn.tracing import trace
    >>> from camfn.rewrite import inject
    >>> model = torchvision.models.resnet18().eval()
    >>> injected = inject(trace(model), ["layer4_1_relu_1"])
    >>> x = torch.randn(1, 3, 64, 64)
    >>> out, (a,) = injected.program(camfn.params(model), x, torch.zeros(1, 512, 2, 2))
    >>> out.shape, a.shape
    (torch.Size([1, 1000]), torch.Size([1, 512, 2, 2]))
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LayerError

if TYPE_CHECKING:
    from .tracing import Traced

__all__ = ["HeadTail", "Injected", "Program", "cut_after", "inject", "is_impure", "is_inplace", "program"]

Params = dict[str, Tensor]

# ------------------------------------------------------------------------------------------ predicates
_VIEWS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "transpose",
    "permute",
    "squeeze",
    "unsqueeze",
    "expand",
    "narrow",
    "select",
    "t",
    "contiguous",
    "__getitem__",
    "getitem",
    "movedim",
    "as_strided",
    "split",
    "chunk",
    "unbind",
    "view_as",
    "expand_as",
    "slice",
    "alias",
    "detach",
}


def _name(target: Any) -> str:
    packet = getattr(target, "_overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", None)
    return name if isinstance(name, str) else str(target)


def _mutating_op(target: Any) -> bool:
    """An aten op (from ``torch.export``) that writes one of its inputs, e.g. ``aten.relu_``."""
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def is_inplace(node: fx.Node, root: nn.Module) -> bool:
    """True when ``node`` writes its first argument (``relu_``, ``add_``, ``ReLU(inplace=True)``...)."""
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(node.target), "inplace", False))
    if node.op in ("call_method", "call_function"):
        name = _name(node.target)
        named = name.endswith("_") and not name.endswith("__")
        return named or _mutating_op(node.target) or node.kwargs.get("inplace", False) is True or _iop(node.target)
    return False


def _iop(target: Any) -> bool:
    return target in (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def is_impure(node: fx.Node) -> bool:
    """Nodes dead-code elimination must keep (in-place writes and other side effects)."""
    if node.is_impure() or (node.op == "call_function" and _mutating_op(node.target)):
        return True
    name = _name(node.target)
    return name.endswith("_") and not name.endswith("__")


def _view(node: fx.Node) -> bool:
    return node.op in ("call_method", "call_function") and _name(node.target).rstrip("_") in _VIEWS


def _base(node: Any, stop: Any = ()) -> Any:
    """The tensor a chain of views starts from (a node in ``stop`` is a start)."""
    while isinstance(node, fx.Node) and node not in stop and _view(node) and node.args:
        node = node.args[0]
    return node


# -------------------------------------------------------------------------------------------- lifting
def _local_state(module: nn.Module) -> list[str]:
    names = [k for k, _ in module.named_parameters(remove_duplicate=False)]
    return names + [k for k, _ in module.named_buffers(remove_duplicate=False)]


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(m, h, None) for m in module.modules() for h in ("_forward_hooks", "_forward_pre_hooks")) or any(
        bool(getattr(m, "parametrizations", None)) for m in module.modules()
    )


_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _functional(graph: fx.Graph, module: nn.Module, path: str, args: Any, kwargs: Any, weights: Any) -> fx.Node | None:
    """A call ``module(*args)`` as a functional call on lifted tensors, when the module is a known kind."""
    if len(args) != 1 or kwargs:
        return None
    x, kind = args[0], type(module)
    w = weights(f"{path}.weight") if getattr(module, "weight", None) is not None else None
    b = weights(f"{path}.bias") if getattr(module, "bias", None) is not None else None
    call = graph.call_function
    if kind in _CONV and module.padding_mode == "zeros":
        return call(_CONV[kind], (x, w, b, module.stride, module.padding, module.dilation, module.groups))
    if kind is nn.Linear:
        return call(F.linear, (x, w, b))
    if kind in _BATCHNORM and not module.training and module.running_mean is not None:
        mean, var = weights(f"{path}.running_mean"), weights(f"{path}.running_var")
        return call(F.batch_norm, (x, mean, var, w, b, False, 0.0, module.eps))
    if kind is nn.LayerNorm:
        return call(F.layer_norm, (x, module.normalized_shape, w, b, module.eps))
    if kind is nn.GroupNorm:
        return call(F.group_norm, (x, module.num_groups, w, b, module.eps))
    return None


_STATELESS: dict[type, Callable[[nn.Module], tuple[Callable[..., Any], tuple, dict]]] = {
    nn.ReLU: lambda m: (F.relu, (), {"inplace": m.inplace}),
    nn.ReLU6: lambda m: (F.relu6, (), {"inplace": m.inplace}),
    nn.Hardswish: lambda m: (F.hardswish, (), {"inplace": m.inplace}),
    nn.Hardsigmoid: lambda m: (F.hardsigmoid, (), {"inplace": m.inplace}),
    nn.SiLU: lambda m: (F.silu, (), {"inplace": m.inplace}),
    nn.GELU: lambda m: (F.gelu, (), {"approximate": m.approximate}),
    nn.Sigmoid: lambda m: (torch.sigmoid, (), {}),
    nn.Tanh: lambda m: (torch.tanh, (), {}),
    nn.Flatten: lambda m: (torch.flatten, (m.start_dim, m.end_dim), {}),
    nn.MaxPool2d: lambda m: (
        F.max_pool2d,
        (m.kernel_size, m.stride, m.padding, m.dilation),
        {"ceil_mode": m.ceil_mode, "return_indices": m.return_indices},
    ),
    nn.AdaptiveAvgPool2d: lambda m: (F.adaptive_avg_pool2d, (m.output_size,), {}),
    nn.AvgPool2d: lambda m: (
        F.avg_pool2d,
        (m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override),
        {},
    ),
    nn.Dropout: lambda m: (F.dropout, (m.p, m.training, m.inplace), {}),
}
"""Modules without state whose call is one function of their (fingerprinted) attributes: called directly,
not through ``nn.Module.__call__`` (a few microseconds each, on every call)."""


def _stateless(graph: fx.Graph, module: nn.Module, x: Any) -> fx.Node | None:
    """``module(x)`` as a direct function call when ``module`` is a known stateless kind, else None."""
    make = _STATELESS.get(type(module))
    if make is None:
        return None
    fn, args, kwargs = make(module)
    return graph.call_function(fn, (x, *args), kwargs)


def _private(module: nn.Module, state: Params, prefix: str) -> nn.Module:
    """A structural copy of ``module`` holding ``state``'s tensors (buffers copied: writes stay private)."""
    clone = copy.copy(module)
    clone._parameters = {k: None if v is None else state[prefix + k] for k, v in module._parameters.items()}
    clone._buffers = {k: None if v is None else state[prefix + k].clone() for k, v in module._buffers.items()}
    clone._modules = {k: None if m is None else _private(m, state, f"{prefix}{k}.") for k, m in module._modules.items()}
    return clone


class _Stateful(nn.Module):
    """A call of a module camfn has no functional form for (``MultiheadAttention``, a user's leaf module,
    one with weight hooks): a private copy per call, holding the tensors of ``params``."""

    def __init__(self, template: nn.Module, prefix: str) -> None:
        super().__init__()
        object.__setattr__(self, "template", template)  # not a submodule: it owns no state of this program
        self.prefix = prefix

    def forward(self, params: Params, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # dynamo traces functional_call; the template is camfn's copy
            state = {k: params[self.prefix + k] for k in _local_state(self.template)}
            return torch.func.functional_call(self.template, state, args, kwargs, strict=False)
        return _private(self.template, params, self.prefix)(*args, **kwargs)


def _lift(module: fx.GraphModule, graph: fx.Graph, state: frozenset[str]) -> tuple[fx.GraphModule, frozenset[str]]:
    """``graph`` (module form, attributes of ``module``) with its state taken from a ``params`` argument."""
    out = fx.Graph()
    params = out.placeholder("camfn_params")
    owned: dict[str, Any] = {}
    read: set[str] = set()
    getters: dict[str, fx.Node] = {}

    def weights(key: str) -> fx.Node:  # one read per key, placed before its first use
        read.add(key)
        if key not in getters:
            getters[key] = out.call_function(operator.getitem, (params, key))
        return getters[key]

    env: dict[fx.Node, fx.Node] = {}
    inplace_roots: set[fx.Node] = set()
    for node in graph.nodes:
        new = None
        if node.op == "get_attr" and node.target in state:
            new = weights(node.target)
        elif node.op == "get_attr":
            owned[node.target] = _fetch(module, node.target)
        elif node.op == "call_module":
            sub = module.get_submodule(node.target)
            local = _local_state(sub)
            if local or _has_hooks(sub):
                new = (
                    None
                    if _has_hooks(sub)
                    else _functional(
                        out, sub, str(node.target), fx.map_arg(node.args, lambda a: env[a]), node.kwargs, weights
                    )
                )
                if new is None and local:
                    name = "camfn_stateful_" + str(node.target).replace(".", "_")
                    owned[name] = _Stateful(sub, f"{node.target}.")
                    read.update(f"{node.target}.{k}" for k in local)
                    args = fx.map_arg(node.args, lambda a: env[a])
                    new = out.call_module(name, (params, *args), fx.map_arg(node.kwargs, lambda a: env[a]))
            elif not node.kwargs and len(node.args) == 1:
                new = _stateless(out, sub, env[node.args[0]] if isinstance(node.args[0], fx.Node) else node.args[0])
            if new is None:
                owned[node.target] = sub
        if new is None:
            new = out.node_copy(node, lambda a: env[a])
        new.meta = {**node.meta, "camfn_name": node.name}
        env[node] = new
        if is_inplace(node, module) and node.args:
            start = env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            base = _base(start, set(getters.values()))
            if isinstance(base, fx.Node) and (base.op == "placeholder" or base in getters.values()):
                inplace_roots.add(base)
    for base in inplace_roots:  # writes land on camfn's copy, never on the caller's tensors
        with out.inserting_after(base):
            fresh = out.call_method("clone", (base,))
        base.replace_all_uses_with(fresh, delete_user_cb=lambda user, f=fresh: user is not f)
    root = nn.Module()
    for target, value in owned.items():
        install(root, target, value)
    return fx.GraphModule(root, out, module.__class__.__name__), frozenset(read)


def _fetch(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def install(root: nn.Module, target: str, value: Any) -> None:
    """Set ``root.<target> = value`` (a dotted path), creating empty holder modules on the way."""
    *path, name = target.split(".")
    holder = root
    for part in path:
        if not hasattr(holder, part):
            holder.add_module(part, nn.Module())
        holder = getattr(holder, part)
    if isinstance(value, nn.Module):
        holder.add_module(name, value)
    elif isinstance(value, Tensor):
        holder.register_buffer(name, value, persistent=False)
    else:
        setattr(holder, name, value)


@dataclass(frozen=True)
class Program:
    """A pure function ``(params, *args) -> output`` of a rewritten graph.

    ``reads`` are the state keys the graph reads. ``params`` may hold any of the model's keys; a key the
    graph reads but ``params`` lacks is taken from a tied alias in ``params`` or else from the model's own
    tensor (read, never written).
    """

    module: fx.GraphModule
    reads: frozenset[str]
    traced: Traced

    def __call__(self, params: Params, *args: Any) -> Any:
        return self.module(self.traced.complete(params, self.reads), *args)


def program(traced: Traced, graph: fx.Graph, *, prune: bool = True, root: nn.Module | None = None) -> Program:
    """The one program builder: lift ``graph`` (module form, over ``root`` or the traced module)."""
    root = traced.module if root is None else root
    graph = copy.deepcopy(graph) if graph is traced.module.graph else graph
    if prune:
        graph.owning_module = root  # the purity check looks modules up (no GraphModule: no codegen)
        graph.eliminate_dead_code(is_impure_node=is_impure)
        graph.owning_module = None
    module, reads = _lift(root, graph, traced.state_keys)
    return Program(module, reads, traced)


# ------------------------------------------------------------------------------------------ injection
@dataclass(frozen=True)
class Injected:
    """The graph with ``delta`` injected after each of ``layers`` (fx node names).

    ``program(params, x, *deltas) -> (output, acts)``, or ``acts`` alone when ``with_output`` is False (then
    only the part of the network up to the last layer runs).
    """

    traced: Traced
    program: Program
    layers: tuple[str, ...]
    names: tuple[str, ...]
    with_output: bool

    def delta_shapes(self, x: Tensor) -> list[tuple[torch.Size, torch.dtype]]:
        shapes = self.traced.node_shapes(x)
        out = []
        for node, name in zip(self.layers, self.names, strict=True):
            info = shapes[node]
            if info is None:
                raise LayerError(f"layer {name!r} does not produce a tensor; pick a node that does")
            out.append(info)
        return out


def inject(traced: Traced, layers: Sequence[str], *, with_output: bool = True) -> Injected:
    """Rewrite the traced graph to inject ``delta`` after each of ``layers`` (fx node names); cached."""
    key = (tuple(layers), with_output)
    cached = traced.cache.injected.get(key)
    if cached is not None:
        return cached
    if len(set(layers)) != len(layers):
        raise LayerError(
            f"the same layer is requested twice: {[traced.qualname[n] for n in layers]}; pass each layer once"
        )
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(traced.module.graph, env)
    old = {n.name: n for n in traced.module.graph.nodes}
    anchor = next(n for n in graph.nodes if n.op == "placeholder")  # right after x: later ones may have defaults
    deltas = []
    for i, _ in enumerate(layers):
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"camfn_delta_{i}")
            deltas.append(anchor)
    acts = []
    for name, delta in zip(layers, deltas, strict=True):
        act = env[old[name]]
        with graph.inserting_after(act):
            perturbed = graph.call_function(operator.add, (act, delta))
        act.replace_all_uses_with(perturbed, delete_user_cb=lambda user, p=perturbed: user is not p)
        acts.append(act)
    graph.output((output, tuple(acts)) if with_output else tuple(acts))
    result = Injected(
        traced=traced,
        program=program(traced, graph, prune=not with_output),
        layers=tuple(layers),
        names=tuple(traced.qualname[n] for n in layers),
        with_output=with_output,
    )
    traced.cache.injected[key] = result
    return result


# ------------------------------------------------------------------------------------------------ cut
@dataclass(frozen=True)
class HeadTail:
    """The graph cut after one layer: ``head(params, x) -> (A, extras)``, ``tail(params, A, *extras) -> output``.

    ``extras`` are the values computed before the cut that the tail still needs (skip connections that
    cross it, the input itself). Running the head once and the tail many times is what makes Ablation-CAM
    cheap.
    """

    head: Program
    tail: Program


def cut_after(traced: Traced, layer: str) -> HeadTail:
    """Cut the traced graph right after node ``layer`` (an fx node name); cached."""
    cached = traced.cache.cuts.get(layer)
    if cached is not None:
        return cached
    nodes = list(traced.module.graph.nodes)
    cut = next(i for i, n in enumerate(nodes) if n.name == layer)
    head_nodes, tail_nodes = nodes[: cut + 1], nodes[cut + 1 :]
    tail_set = set(tail_nodes)
    act = nodes[cut]
    crossing = [n for n in head_nodes if n is not act and n.op != "get_attr" and set(n.users) & tail_set]

    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in head_nodes:
        env[n] = head.node_copy(n, lambda a: env[a])
    head.output((env[act], tuple(env[n] for n in crossing)))

    tail = fx.Graph()
    tenv: dict[fx.Node, fx.Node] = {act: tail.placeholder("camfn_act")}
    placeholders = {tenv[act]}
    for i, n in enumerate(crossing):
        tenv[n] = tail.placeholder(f"camfn_extra_{i}")
        placeholders.add(tenv[n])
    for n in head_nodes:  # parameters read after the cut
        if n.op == "get_attr" and set(n.users) & tail_set:
            tenv[n] = tail.node_copy(n)
    for n in tail_nodes:
        if n.op == "output":
            tail.output(fx.map_arg(n.args[0], lambda a: tenv[a]))
            continue
        copied = tail.node_copy(n, lambda a: tenv[a])
        first = copied.args[0] if copied.args else None
        if is_inplace(n, traced.module) and first in placeholders:  # never write the head's values
            with tail.inserting_before(copied):
                fresh = tail.call_method("clone", (first,))
            copied.args = (fresh, *copied.args[1:])
        tenv[n] = copied
    result = HeadTail(head=program(traced, head), tail=program(traced, tail))
    traced.cache.cuts[layer] = result
    return result
