"""Graph surgery: trace a model once, find layers, inject zero perturbations.

camfn never hooks the user's model. It traces a *skeleton* of it with torch.fx (torchvision's
``NodePathTracer``, which names every node by its module path), then rewrites the graph so that the
activation ``A`` of each requested layer feeds ``A + delta`` to the rest of the network, with ``delta`` a
new graph input, and the graph returns ``(output, (A_1, ..., A_n))``. At ``delta = 0`` the output is
unchanged and

.. math:: \\frac{\\partial S}{\\partial \\delta} = \\frac{\\partial S}{\\partial A},

so one ``torch.func.vjp`` gives every layer's gradient (see :mod:`camfn.forward`).

The skeleton is a structural copy: every submodule is a new object whose parameter, buffer, child and
hook dictionaries are new dictionaries holding the *same* tensors. ``functional_call`` swaps tensors on the
skeleton, so the user's modules are never written, not even for a moment. Tracing runs in the mode the
model is in and is cached per (model, structure, modes, hooks, tracer options); rewrites are cached per
layer tuple, and activation shapes per input shape.

Example:
    >>> import torch, torchvision, camfn
    >>> model = torchvision.models.resnet18().eval()
    >>> [info.name for info in camfn.layers(model)][-4:]
    ['layer4.1.relu_1', 'avgpool', 'flatten', 'fc']
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.fx as fx
import torchvision
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torchvision.models.feature_extraction import NodePathTracer

from .errors import HookError, InputError, LayerError, TraceError, nearest

__all__ = [
    "Cut",
    "Engine",
    "LayerInfo",
    "Program",
    "Split",
    "Traced",
    "default_layer",
    "engine",
    "layers",
    "split",
    "trace",
    "trace_export",
]

Layer = str | nn.Module
HookPolicy = Literal["error", "ignore", "keep"]

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_HOOK_SIDE_DICTS = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


# --------------------------------------------------------------------------------------------- hooks
def _weight_hooks() -> tuple[type, ...]:
    """Hook types that *define* weights (pruning masks, weight/spectral norm): always kept."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return (prune.BasePruningMethod, WeightNorm, SpectralNorm)


def _hook_name(hook: Any) -> str:
    owner = getattr(hook, "__self__", None)
    if owner is not None:
        return f"{type(owner).__module__}.{type(owner).__qualname__}.{hook.__name__}"
    name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    return f"{getattr(hook, '__module__', type(hook).__module__)}.{name}"


def foreign_hooks(model: nn.Module) -> list[tuple[str, str, str]]:
    """Hooks on ``model`` that camfn would have to run or drop: ``(module path, kind, hook name)``.

    Weight-defining hooks (``torch.nn.utils.prune``, ``weight_norm``, ``spectral_norm``) are not listed:
    they are part of the model's definition and are always kept.
    """
    keep = _weight_hooks()
    found = []
    for path, module in model.named_modules():
        for kind in _HOOK_DICTS:
            for hook in getattr(module, kind, {}).values():
                if not isinstance(hook, keep):
                    found.append((path or "<model>", kind.strip("_").replace("_", " ")[:-1], _hook_name(hook)))
    from torch.nn.modules import module as _m

    for kind in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        for hook in getattr(_m, kind, {}).values():
            found.append(("<every module>", kind.strip("_").replace("_", " ")[:-1], _hook_name(hook)))
    return found


def _check_hooks(model: nn.Module, policy: HookPolicy) -> None:
    if policy not in ("error", "ignore", "keep"):
        raise ValueError(f"hooks={policy!r}: use 'error', 'ignore' or 'keep'")
    found = foreign_hooks(model)
    global_ = [f for f in found if f[0] == "<every module>"]
    if global_ and policy != "keep":
        raise HookError(
            "global module hooks are registered (torch.nn.modules.module.register_module_forward_hook): "
            + ", ".join(f"{k} {n}" for _, k, n in global_)
            + ". They would run inside camfn's traced copy too; remove them (handle.remove()) or pass "
            "hooks='keep' if they only read."
        )
    if found and policy == "error":
        lines = "\n".join(f"  {path}: {kind} {name}" for path, kind, name in found[:10])
        more = f"\n  ... and {len(found) - 10} more" if len(found) > 10 else ""
        raise HookError(
            f"the model carries {len(found)} hook(s) camfn did not register:\n{lines}{more}\n"
            "camfn traces a copy of the model and never touches these hooks. Choose what the copy does:\n"
            "  hooks='ignore'  trace without them (right for observers: loggers, grad-cam/torchcam extractors);\n"
            "  hooks='keep'    run them inside the copy (only for hooks that are pure functions of their inputs);\n"
            "or remove them from the model (handle.remove(), or the extractor's remove_hooks()/__exit__)."
        )


# ------------------------------------------------------------------------------------------ skeleton
def _skeleton(module: nn.Module, policy: HookPolicy, memo: dict[int, nn.Module]) -> nn.Module:
    """A structural copy of ``module`` that shares tensors but no mutable container with it."""
    if id(module) in memo:
        return memo[id(module)]
    clone = copy.copy(module)
    memo[id(module)] = clone
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    keep = _weight_hooks()
    kept_ids: set[int] = set()
    for name in _HOOK_DICTS:
        hooks = getattr(module, name, None)
        if hooks is not None:
            kept = OrderedDict((k, v) for k, v in hooks.items() if policy == "keep" or isinstance(v, keep))
            kept_ids |= set(kept)
            object.__setattr__(clone, name, kept)
    for name in _HOOK_SIDE_DICTS:  # bookkeeping keyed by hook id
        hooks = getattr(module, name, None)
        if hooks is not None:
            object.__setattr__(clone, name, OrderedDict((k, v) for k, v in hooks.items() if k in kept_ids))
    clone._modules = {k: None if m is None else _skeleton(m, policy, memo) for k, m in module._modules.items()}
    return clone


def _fingerprint(model: nn.Module) -> tuple:
    """Everything that changes the traced graph: structure, per-module mode, hooks."""
    return tuple(
        (id(m), type(m), m.training, *(tuple(getattr(m, h, ())) for h in _HOOK_DICTS)) for m in model.modules()
    )


# --------------------------------------------------------------------------------------------- trace
def _leaf_ops() -> list[type]:
    return [
        obj
        for obj in vars(torchvision.ops).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj is not nn.Module
    ]


def _tracer_kwargs(options: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(options or {})
    kwargs.pop("concrete_args", None)
    kwargs["autowrap_modules"] = tuple(set(kwargs.get("autowrap_modules", ())) | {math, torchvision.ops})
    kwargs["leaf_modules"] = list(set(kwargs.get("leaf_modules", [])) | set(_leaf_ops()))
    return kwargs


def _freeze(options: dict[str, Any] | None) -> tuple:
    def key(v: Any) -> Any:
        if isinstance(v, dict):
            return tuple(sorted((k, key(x)) for k, x in v.items()))
        if isinstance(v, list | tuple | set | frozenset):
            return tuple(sorted((key(x) for x in v), key=repr))
        return v if isinstance(v, str | int | float | bool | type(None)) else id(v)

    return key(options or {})


@dataclass
class Traced:
    """A model traced once: the plain graph module, node names and cached rewrites and shapes."""

    module: fx.GraphModule
    qualname: dict[str, str]  # fx node name -> module-path name ("layer4.1.relu_1")
    state_keys: frozenset[str]
    engines: dict[tuple, Engine] = field(default_factory=dict)
    shapes: dict[tuple, dict[str, tuple[torch.Size, torch.dtype] | None]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def program(self) -> Program:
        """The traced model itself as a pure function ``(params, x) -> output``; cached."""
        if ("plain",) not in self.engines:
            self.engines[("plain",)] = _program(self, self.module.graph, prune=False)  # type: ignore[assignment]
        return self.engines[("plain",)]  # type: ignore[return-value]

    def names(self) -> list[str]:
        """Every node name a user may pass as ``layer``, in execution order."""
        return list(self.qualname.values())

    def resolve(self, layer: str) -> str:
        """fx node name for a node name (``"layer4.1.relu_1"``) or module path (``"layer4"``)."""
        by_qual = {q: n for n, q in self.qualname.items()}
        if layer in by_qual:
            return by_qual[layer]
        depth = layer.count(".") + 1
        for node, qual in reversed(self.qualname.items()):  # last node inside the module
            if ".".join(qual.split(".")[:depth]) == layer:
                return node
        paths = {".".join(q.split(".")[:i]) for q in self.qualname.values() for i in range(1, q.count(".") + 1)}
        hint = nearest(layer, [*paths, *self.qualname.values()])
        raise LayerError(
            f"layer {layer!r} is neither a node nor a module path of the traced model. "
            f"Nearest names: {', '.join(hint) or '(none)'}. camfn.layers(model) lists them all."
        )

    def node_shapes(self, x: torch.Tensor) -> dict[str, tuple[torch.Size, torch.dtype] | None]:
        """Output (shape, dtype) of every node for an input like ``x``, by fake-tensor propagation.

        Only ``x``'s shape, dtype and device are used (its logical shape under ``vmap``), so this is
        cheap, pure and cached.
        """
        key = (tuple(x.shape), x.dtype, x.device.type)
        if key not in self.shapes:
            with self.lock:
                self.shapes[key] = self._propagate(x)
        return self.shapes[key]

    def _propagate(self, x: torch.Tensor) -> dict[str, Any]:
        def info(v: Any) -> Any:
            return (v.shape, v.dtype) if isinstance(v, torch.Tensor) else None

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fake = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        try:
            FakeTensorProp(self.module, mode).propagate_dont_convert_inputs(fake)
            values = {n.name: n.meta.get("val") for n in self.module.graph.nodes}
            output = self._output_val(values)
        except Exception:
            values, output = self._run_zeros(x)
        out = {name: info(v) for name, v in values.items()}
        out["output"] = torch.utils._pytree.tree_map(info, output)
        return out

    def _run_zeros(self, x: torch.Tensor) -> tuple[dict[str, Any], Any]:
        """Shapes from one real forward of zeros (for graphs fake tensors cannot run)."""
        values: dict[str, Any] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                values[n.name] = result = super().run_node(n)
                return result

        try:
            with torch.no_grad():
                output = Recorder(self.module).run(torch.zeros(x.shape, dtype=x.dtype, device=x.device))
        except Exception as err:
            raise TraceError(
                f"running the traced model on an input of shape {tuple(x.shape)} failed: {type(err).__name__}: {err}"
            ) from err
        return values, output

    def _output_val(self, values: dict[str, Any]) -> Any:
        node = next(n for n in self.module.graph.nodes if n.op == "output")
        return torch.utils._pytree.tree_map(lambda a: values[a.name] if isinstance(a, fx.Node) else a, node.args[0])


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Traced]] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _cache_lock() -> Any:
    """The trace-cache lock; a no-op inside ``torch.compile`` (dynamo cannot enter a lock, and a compiled
    call only reads a cache that :func:`camfn.compiled` filled before compiling)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _CACHE_LOCK


def trace(
    model: nn.Module,
    *,
    hooks: HookPolicy = "error",
    tracer_options: dict[str, Any] | None = None,
) -> Traced:
    """Trace ``model`` (a skeleton copy of it) in its current mode; cached.

    Args:
        model: the user's module; it is read, never written.
        hooks: what to do with forward/backward hooks camfn did not register: ``"error"`` (default:
            raise :class:`~camfn.errors.HookError` naming them), ``"ignore"`` (trace a copy without them),
            ``"keep"`` (run them inside the copy). Pruning, weight-norm and spectral-norm hooks are kept.
        tracer_options: passed to ``NodePathTracer`` (``leaf_modules``, ``autowrap_functions``,
            ``autowrap_modules``, ``param_shapes_constant``) and ``concrete_args`` to ``trace``: the escape
            hatch for code torch.fx cannot trace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_hooks(model, hooks)
    key = (_fingerprint(model), hooks, _freeze(tracer_options))
    with _cache_lock():
        per_model = _CACHE.setdefault(model, {})
        if key in per_model:
            return per_model[key]
        per_model.clear()  # structure or mode changed: old graphs are stale
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError("TorchScript modules cannot be traced by torch.fx; explain the original nn.Module instead.")
    skeleton = _skeleton(model, hooks, {})
    tracer = (_CutTracer if isinstance(model, Cut) else NodePathTracer)(**_tracer_kwargs(tracer_options))
    try:
        graph = tracer.trace(skeleton, concrete_args=(tracer_options or {}).get("concrete_args"))
    except Exception as err:
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {err}\n"
            "Three ways out:\n"
            "  1. tracer options: mark the untraceable submodules as leaves, "
            "tracer_options={'leaf_modules': [TheirClass]} (layers inside them can no longer be picked); wrap free "
            "functions with tracer_options={'autowrap_functions': [fn]}; fix Python control flow on arguments with "
            "tracer_options={'concrete_args': {...}};\n"
            "  2. tracer='export': trace with torch.export instead (handles control flow on shapes; layer names "
            "stay module paths such as 'layer4');\n"
            "  3. camfn.Cut(head, tail): explain model=camfn.Cut(head, tail) at layer='head', with head(x) -> A "
            "and tail(A) -> output written by you (works for any model)."
        ) from err
    module = fx.GraphModule(tracer.root, graph, type(model).__name__)
    qualname = _module_paths(
        {n: q for n, q in tracer.node_to_qualname.items() if n.op not in ("placeholder", "get_attr")}
    )
    return _store(model, key, module, qualname)


def _store(model: nn.Module, key: tuple, module: fx.GraphModule, qualname: dict[str, str]) -> Traced:
    """Cache and return the trace of ``model`` under ``key``."""
    state_keys = frozenset(k for k, _ in model.named_parameters(remove_duplicate=False)) | frozenset(
        k for k, _ in model.named_buffers(remove_duplicate=False)
    )
    traced = Traced(module=module, qualname=qualname, state_keys=state_keys)
    with _cache_lock():
        _CACHE.setdefault(model, {})[key] = traced
    return traced


def _module_paths(names: dict[fx.Node, str]) -> dict[str, str]:
    """Node name -> user-facing name, with every module call named by its true module path.

    torchvision's tracer strips a trailing ``_<digits>`` before numbering repeated calls, so a module
    named ``ln_2`` was listed as ``ln_1`` (the name of another module). Here the ``k``-th call of module
    ``path`` is ``path`` (``k = 0``) or ``path_k``, as for ``layer4.1.relu`` / ``layer4.1.relu_1``.
    """
    calls: dict[str, int] = {}
    out = {}
    for node, name in names.items():
        if node.op == "call_module":
            k = calls.get(str(node.target), 0)
            calls[str(node.target)] = k + 1
            name = str(node.target) if k == 0 else f"{node.target}_{k}"
        out[node.name] = name
    return out


# ------------------------------------------------------------------------------------------- rewrite
def _mutating_op(target: Any) -> bool:
    """An aten op (from ``torch.export``) that writes one of its inputs, e.g. ``aten.relu_``."""
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _impure(node: fx.Node) -> bool:
    if node.is_impure() or (node.op == "call_function" and _mutating_op(node.target)):
        return True
    target = getattr(node.target, "__name__", node.target)
    return isinstance(target, str) and target.endswith("_") and not target.endswith("__")


@dataclass(frozen=True)
class Program:
    """A graph module called as a pure function of ``(params, *args)``.

    ``params`` may hold any of the model's keys (``known``); those this graph does not read are dropped
    before ``functional_call`` (which refuses keys of pruned submodules), and missing ones fall back to
    the model's own tensors (read, never written).
    """

    module: fx.GraphModule
    keys: frozenset[str]
    known: frozenset[str]

    def __call__(self, params: dict[str, torch.Tensor], *args: Any) -> Any:
        if not isinstance(params, dict):
            raise InputError(f"params must be a dict of tensors (camfn.params(model)), got {type(params).__name__}")
        unknown = [k for k in params if k not in self.known]
        if unknown:
            raise InputError(
                f"params has {len(unknown)} key(s) the model does not have, e.g. {unknown[:3]}; "
                "build it with camfn.params(model) or model.state_dict() of the same architecture"
            )
        state = {k: v for k, v in params.items() if k in self.keys}
        return torch.func.functional_call(self.module, state, args, strict=False)


def _program(traced: Traced, graph: fx.Graph, prune: bool = True) -> Program:
    module = fx.GraphModule(traced.module, copy.deepcopy(graph) if graph is traced.module.graph else graph)
    if prune:
        module.graph.eliminate_dead_code(is_impure_node=_impure)
        module.recompile()
    keys = {k for k, _ in module.named_parameters(remove_duplicate=False)}
    keys |= {k for k, _ in module.named_buffers(remove_duplicate=False)}
    return Program(module, frozenset(keys), traced.state_keys)


@dataclass(frozen=True)
class Engine:
    """The rewritten graph: ``program(params, x, *deltas) -> (output, acts)`` (or ``acts`` when headless).

    ``layers`` are fx node names, ``names`` the module-path names a user sees.
    """

    traced: Traced
    program: Program
    layers: tuple[str, ...]
    names: tuple[str, ...]
    with_output: bool

    def delta_shapes(self, x: torch.Tensor) -> list[tuple[torch.Size, torch.dtype]]:
        shapes = self.traced.node_shapes(x)
        out = []
        for node, name in zip(self.layers, self.names, strict=True):
            info = shapes[node]
            if info is None:
                raise LayerError(f"layer {name!r} does not produce a tensor; pick a node that does")
            out.append(info)
        return out


def engine(traced: Traced, layers: Sequence[str], *, with_output: bool = True) -> Engine:
    """Rewrite the traced graph to inject ``delta`` after each of ``layers`` (fx node names); cached."""
    key = (tuple(layers), with_output)
    if key in traced.engines:
        return traced.engines[key]
    if len(set(layers)) != len(layers):
        raise LayerError(f"the same layer is requested twice: {[traced.qualname[n] for n in layers]}")
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
    result = Engine(
        traced=traced,
        program=_program(traced, graph, prune=not with_output),
        layers=tuple(layers),
        names=tuple(traced.qualname[n] for n in layers),
        with_output=with_output,
    )
    traced.engines[key] = result
    return result


# --------------------------------------------------------------------------------------------- split
def _inplace(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(node.target), "inplace", False))
    if node.op in ("call_method", "call_function"):
        name = getattr(node.target, "__name__", node.target)
        named = isinstance(name, str) and name.endswith("_") and not name.endswith("__")
        return named or _mutating_op(node.target) or node.kwargs.get("inplace", False) is True
    return False


@dataclass(frozen=True)
class Split:
    """The graph cut after one layer: ``head(x) -> (A, extras)`` and ``tail(A, *extras) -> output``.

    ``extras`` are the values computed before the cut that the tail still needs (skip connections that
    cross it, the input itself). Running the head once and the tail many times is what makes
    perturbation methods cheap.
    """

    head: Program
    tail: Program
    name: str


def split(traced: Traced, layer: str) -> Split:
    """Cut the traced graph right after node ``layer`` (an fx node name); cached."""
    key = ("split", layer)
    if key in traced.engines:
        return traced.engines[key]  # type: ignore[return-value]
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
        if _inplace(n, traced.module) and first in placeholders:  # never write the head's values
            with tail.inserting_before(copied):
                fresh = tail.call_method("clone", (first,))
            copied.args = (fresh, *copied.args[1:])
        tenv[n] = copied
    result = Split(
        head=_program(traced, head),
        tail=_program(traced, tail),
        name=traced.qualname[layer],
    )
    traced.engines[key] = result  # type: ignore[assignment]
    return result


# ------------------------------------------------------------------------------------------- layers
class LayerInfo(NamedTuple):
    """One traced node: its name (what to pass as ``layer``), op, module type and output shape."""

    name: str
    op: str
    module: str
    shape: tuple[int, ...] | None


def _module_path(model: nn.Module, layer: nn.Module) -> str:
    for path, module in model.named_modules():
        if module is layer:
            return path
    raise LayerError(
        f"the module {type(layer).__name__} passed as layer is not a submodule of the model; "
        "pass one of model.modules() or its path as a string"
    )


def layer_names(model: nn.Module, layer: Layer | Sequence[Layer] | None) -> list[Layer] | None:
    """Normalise ``layer`` to a list of names (modules are turned into their paths)."""
    if layer is None:
        return None
    items = [layer] if isinstance(layer, str | nn.Module) else list(layer)
    if not items:
        raise LayerError("layer is an empty list; pass at least one layer name")
    return [_module_path(model, x) if isinstance(x, nn.Module) else x for x in items]


def spatial(shape: tuple[int, ...] | None) -> bool:
    """True for ``(B, K, *spatial)`` with at least one spatial extent above 1."""
    return shape is not None and len(shape) >= 3 and math.prod(shape[2:]) > 1


def _default_node(traced: Traced, x: torch.Tensor) -> str:
    """The last node whose output is ``(B, K, h, w, ...)`` with ``h * w > 1`` (as torchcam chooses)."""
    shapes = traced.node_shapes(x)
    for node in reversed(list(traced.qualname)):
        info = shapes.get(node)
        if info is not None and spatial(tuple(info[0])) and len(info[0]) == x.ndim:
            return node
    raise LayerError(
        "no layer of this model has a spatial output (B, K, h, w) with h * w > 1; pass layer= explicitly "
        "(camfn.layers(model, x) lists the candidates)"
    )


def default_layer(
    model: nn.Module,
    x: torch.Tensor | Sequence[int],
    *,
    hooks: HookPolicy = "error",
    tracer_options: dict[str, Any] | None = None,
    tracer: str = "fx",
) -> str:
    """The layer ``layer=None`` picks: the last one whose output has a spatial extent above 1.

    Example:
        >>> import torchvision, camfn
        >>> camfn.default_layer(torchvision.models.resnet18().eval(), (1, 3, 64, 64))
        'layer4.1.relu_1'
    """
    x = x if isinstance(x, torch.Tensor) else torch.empty(tuple(x))
    traced = _traced(model, x, hooks, tracer_options, tracer)
    return traced.qualname[_default_node(traced, x)]


def _traced(
    model: nn.Module, x: torch.Tensor | None, hooks: HookPolicy, tracer_options: dict[str, Any] | None, tracer: str
) -> Traced:
    if tracer == "export":
        if x is None:
            raise InputError(
                "tracer='export' needs an example input: pass x (a tensor or a shape such as (1, 3, 64, 64))"
            )
        return trace_export(model, x, hooks=hooks)
    if tracer != "fx":
        raise ValueError(f"tracer={tracer!r}: use 'fx' (default) or 'export'")
    return trace(model, hooks=hooks, tracer_options=tracer_options)


def layers(
    model: nn.Module,
    x: torch.Tensor | Sequence[int] | None = None,
    *,
    hooks: HookPolicy = "error",
    tracer_options: dict[str, Any] | None = None,
    tracer: str = "fx",
) -> list[LayerInfo]:
    """List the layers a user can pass, in execution order, with output shapes for input ``x``.

    Args:
        model: the model (not modified).
        x: an example input or its shape, e.g. ``(1, 3, 224, 224)``; without it shapes are ``None``.
        tracer: ``"fx"`` or ``"export"`` (``torch.export``; needs ``x``), as the methods' option.

    Example:
        >>> import torchvision, camfn
        >>> info = camfn.layers(torchvision.models.resnet18().eval(), (1, 3, 64, 64))
        >>> info[-4]
        LayerInfo(name='layer4.1.relu_1', op='call_module', module='ReLU', shape=(1, 512, 2, 2))
    """
    if x is not None and not isinstance(x, torch.Tensor):
        x = torch.empty(tuple(x))
    traced = _traced(model, x, hooks, tracer_options, tracer)
    shapes = traced.node_shapes(x) if x is not None else {}
    nodes = {n.name: n for n in traced.module.graph.nodes}
    out = []
    for name, qual in traced.qualname.items():
        node = nodes[name]
        if node.op == "call_module":
            kind = type(traced.module.get_submodule(node.target)).__name__
        else:
            kind = getattr(node.target, "__name__", str(node.target))
        info = shapes.get(name)
        out.append(LayerInfo(qual, node.op, kind, tuple(info[0]) if info else None))
    return out


def resolve_layers(
    traced: Traced, model: nn.Module, layer: Layer | Sequence[Layer] | None, x: torch.Tensor
) -> tuple[list[str], bool]:
    """fx node names for ``layer`` (``None``: the default layer) and whether a single layer was given."""
    names = layer_names(model, layer)
    if names is None and isinstance(model, Cut):
        return [traced.resolve("head")], True
    if names is None:
        return [_default_node(traced, x)], True
    single = isinstance(layer, str | nn.Module)
    return [traced.resolve(n) for n in names], single


# ------------------------------------------------------------------------------ escape hatch: a cut
class _Function(nn.Module):
    """A plain callable as a module (no parameters of its own: it closes over whatever it uses)."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


class Cut(nn.Module):
    r"""A model given as ``head(x) -> A`` and ``tail(A) -> output``: the escape hatch for any model.

    Explain ``Cut(head, tail)`` as the model at ``layer="head"`` (the default). camfn never traces
    inside ``head`` or ``tail``; the gradient is the pullback of the tail at ``A``:

    .. math:: G = \frac{\partial S(\mathrm{tail}(A))}{\partial A}\Big|_{A = \mathrm{head}(x)}

    ``head`` and ``tail`` are modules or plain callables (closures over the user's modules: their
    parameters are then read from those modules, not from ``params``). With ``tail_takes_input=True``
    the tail is called as ``tail(A, x)`` (detection models need the images after the backbone).
    ``autograd_tail=True`` differentiates the tail with plain ``torch.autograd`` instead of
    ``torch.func`` (for ops without functorch support, such as torchvision's ``roi_align`` in detection
    heads); the tail must then return a tensor and the target one score per sample.

    Example:
        >>> import torch, torchvision, camfn
        >>> net = torchvision.models.resnet18().eval()
        >>> head = torch.nn.Sequential(*list(net.children())[:-2])
        >>> tail = lambda a: net.fc(a.mean((2, 3)))
        >>> cut = camfn.Cut(head, tail)
        >>> camfn.gradcam(cut, camfn.params(cut), torch.randn(1, 3, 64, 64), "head", 3).shape
        torch.Size([1, 64, 64])
    """

    def __init__(self, head: Any, tail: Any, *, tail_takes_input: bool = False, autograd_tail: bool = False) -> None:
        super().__init__()
        if not (callable(head) and callable(tail)):
            raise TypeError("Cut(head, tail) needs two callables: head(x) -> A and tail(A) -> output")
        self.head = head if isinstance(head, nn.Module) else _Function(head)
        if autograd_tail:
            tail = _Function(lambda a, *rest, fn=tail: _AutogradTail.apply(a, fn, rest))
        self.tail = tail if isinstance(tail, nn.Module) else _Function(tail)
        self.tail_takes_input = tail_takes_input

    def forward(self, x: torch.Tensor) -> Any:
        a = self.head(x)
        return self.tail(a, x) if self.tail_takes_input else self.tail(a)


class _AutogradTail(torch.autograd.Function):
    """``fn(a, *rest)`` whose backward re-runs ``fn`` under plain autograd (once differentiable)."""

    @staticmethod
    def forward(a: torch.Tensor, fn: Any, rest: tuple) -> torch.Tensor:
        with torch.no_grad():
            return fn(a, *rest)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        a, fn, rest = inputs
        ctx.fn, ctx.rest = fn, rest
        ctx.save_for_backward(a)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (a,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = a.detach().requires_grad_(True)
            rest = [r.detach() if isinstance(r, torch.Tensor) else r for r in ctx.rest]
            (g,) = torch.autograd.grad(ctx.fn(leaf, *rest), leaf, grad, allow_unused=True)
        return (torch.zeros_like(a) if g is None else g), None, None


class _CutTracer(NodePathTracer):
    """Traces a :class:`Cut` as two opaque calls."""

    def is_leaf_module(self, m: nn.Module, module_qualname: str) -> bool:
        return module_qualname in ("head", "tail") or super().is_leaf_module(m, module_qualname)


# -------------------------------------------------------------------------- escape hatch: export
def _size(t: torch.Tensor, dim: int) -> int:
    """``t.shape[dim]``: replaces ``aten.sym_size`` in exported graphs (it has no vmap rule)."""
    return t.shape[dim]


def _op_name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "_overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))
    return name if name.startswith("__") else name.rstrip("_")  # add_ -> add, as torch.fx names it


def _export_names(gm: fx.GraphModule, model: nn.Module) -> dict[str, str]:
    """Module-path names for exported nodes, from ``node.meta["nn_module_stack"]``.

    The last node of a call to a leaf module gets the module path (``"layer4.1.relu"``; a second call
    ``"layer4.1.relu_1"``, as torchvision's tracer names them); other nodes get ``path.op``.
    """
    modules = dict(model.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    groups: dict[str, list[fx.Node]] = {}
    for n in nodes:
        stack = n.meta.get("nn_module_stack") or {}
        key = next(reversed(stack)) if stack else ""
        groups.setdefault(key, []).append(n)
    names: dict[str, str] = {}
    used: dict[str, int] = {}

    def unique(name: str) -> str:
        count = used.get(name, 0)
        used[name] = count + 1
        return name if count == 0 else f"{name}_{count}"

    for n in nodes:
        stack = n.meta.get("nn_module_stack") or {}
        key = next(reversed(stack)) if stack else ""
        path = stack[key][0] if stack else ""
        leaf = path in modules and path != "" and not any(True for _ in modules[path].children())
        if leaf and groups[key][-1] is n:
            names[n.name] = unique(path)
        else:
            names[n.name] = unique(f"{path}.{_op_name(n)}" if path else _op_name(n))
    return names


def trace_export(model: nn.Module, x: torch.Tensor, *, hooks: HookPolicy = "error") -> Traced:
    """Trace ``model`` with ``torch.export`` (for models torch.fx cannot trace); cached per input shape.

    The batch dimension is exported as dynamic, other dimensions are fixed to ``x``'s. Layer names are
    module paths recovered from ``nn_module_stack`` (``"layer4"`` resolves to the last node inside it),
    so the same ``layer`` works with ``tracer="fx"`` and ``tracer="export"``.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> camfn.gradcam(model, camfn.params(model), x, "layer4", 2, tracer="export").shape
        torch.Size([1, 64, 64])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_hooks(model, hooks)
    key = (_fingerprint(model), hooks, "export", tuple(x.shape[1:]), x.dtype, x.device.type)
    with _cache_lock():
        per_model = _CACHE.setdefault(model, {})
        if key in per_model:
            return per_model[key]
    skeleton = _skeleton(model, hooks, {})
    example = torch.zeros((2, *x.shape[1:]), dtype=x.dtype, device=x.device)
    try:
        program = torch.export.export(skeleton, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    except Exception as err:
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}: {type(err).__name__}: {str(err)[:2000]}\n"
            "Data-dependent Python control flow defeats both torch.fx and torch.export: mark that submodule "
            "as a leaf (tracer_options={'leaf_modules': [TheirClass]}) or explain camfn.Cut(head, tail)."
        ) from err
    unlifted = program.module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    flat_out = graph.graph_copy(unlifted.graph, env)
    spec = getattr(unlifted, "_out_spec", None) or program.call_spec.out_spec
    out = torch.utils._pytree.tree_unflatten(list(flat_out), spec) if spec is not None else flat_out
    graph.output(out)
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int:
            n.target = _size
        elif n.op == "call_module" and str(n.target).startswith("_guards"):
            graph.erase_node(n)
    graph.eliminate_dead_code()
    module = fx.GraphModule(unlifted, graph, type(model).__name__)
    qualname = _export_names(module, model)
    return _store(model, key, module, qualname)
