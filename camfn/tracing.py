"""Tracing: a model (or a function ``model_fn(params, x)``) traced once into a graph, cached, never stale.

camfn never hooks the user's model. It traces a *skeleton* of it (new module objects and containers
holding the same tensors, see :func:`camfn.hooks.skeleton`) with torch.fx (torchvision's
``NodePathTracer``, which names every node by its module path) or with ``torch.export``. The trace is
cached per model and reused only while the model would trace to the same graph: the cache key covers
every module's identity, type and mode, its hooks, its non-tensor attributes (stride, padding, eps, a
user's ``self.temperature``...), and the identity, shape and dtype of every parameter and buffer; it is
recomputed and compared on each call.

What a method runs is built from the trace by :mod:`camfn.rewrite`: a pure function of
``(params, x, ...)`` that holds no state of its own.

Example:
    >>> import torch, torchvision
    >>> from camfn.tracing import trace
    >>> model = torchvision.models.resnet18().eval()
    >>> traced = trace(model)
    >>> traced is trace(model), traced.qualname["layer4_1_relu_1"]
    (True, 'layer4.1.relu_1')
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torchvision
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torchvision.models.feature_extraction import NodePathTracer

from .cut import Cut, CutTracer
from .errors import InputError, LayerError, OptionError, TraceError, nearest
from .hooks import HOOK_DICTS, HookPolicy, check_hooks, skeleton
from .rewrite import Program, install, program

__all__ = [
    "TRACERS",
    "Cache",
    "Model",
    "Traced",
    "apply",
    "params",
    "trace",
    "trace_export",
    "trace_function",
    "traced",
]

Params = dict[str, Tensor]
Model = nn.Module | Callable[[Params, Tensor], Any]
"""A module, or a plain function ``model_fn(params, x) -> output`` (JAX style)."""

TRACERS = ("auto", "fx", "export")


def params(model: nn.Module) -> Params:
    """The model's parameters and buffers as a dict of detached tensors (shared storage, no copy).

    Pass it, or any dict with the same keys (another checkpoint, a randomised copy, a stack of them made
    with :func:`camfn.stack_params` under ``vmap``), as the ``params`` of every method. Tied parameters
    appear under every name that uses them.

    Example:
        >>> import torch, camfn
        >>> sorted(camfn.params(torch.nn.Linear(2, 3)))
        ['bias', 'weight']
    """
    if not isinstance(model, nn.Module):
        raise InputError(
            f"camfn.params needs an nn.Module, got {type(model).__name__}; a model_fn's params are your own dict"
        )
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    return {k: v.detach() for k, v in state.items()}


# ------------------------------------------------------------------------------------------ the trace
@dataclass
class Cache:
    """What camfn derives from one trace, each under its own typed key."""

    plain: Program | None = None
    injected: dict[tuple, Any] = field(default_factory=dict)  # (layers, with_output) -> rewrite.Injected
    cuts: dict[str, Any] = field(default_factory=dict)  # layer -> rewrite.HeadTail
    inference: dict[tuple, Any] = field(default_factory=dict)  # input shape -> inference.Inference
    guided: Program | None = None
    classifier: dict[str, str] = field(default_factory=dict)  # layer -> path of the final nn.Linear
    biases: tuple | None = None  # fullgrad: (node, module path, BatchNorm eps or None) of each bias layer


@dataclass
class Traced:
    """A model traced once: the graph (module form), node names, state keys, and what is derived from it."""

    module: fx.GraphModule
    qualname: dict[str, str]  # fx node name -> user-facing name ("layer4.1.relu_1")
    state_keys: frozenset[str]
    defaults: dict[str, Tensor]  # the model's own tensors, for keys params lacks
    aliases: dict[str, tuple[str, ...]]  # tied parameters: key -> the other keys of the same tensor
    tracer: str = "fx"
    modules: frozenset[str] = frozenset()  # the model's module paths
    prefix_tokens: int | None = None
    cache: Cache = field(default_factory=Cache)
    shapes: dict[tuple, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def program(self) -> Program:
        """The traced model itself as a pure function ``(params, x) -> output``; cached."""
        if self.cache.plain is None:
            self.cache.plain = program(self, self.module.graph, prune=False)
        return self.cache.plain

    def complete(self, params: Params, reads: frozenset[str]) -> Params:
        """``params`` with every key in ``reads`` present (tied aliases, else the model's own tensors)."""
        if not isinstance(params, dict):
            raise InputError(f"params must be a dict of tensors (camfn.params(model)), got {type(params).__name__}")
        keys = params.keys()
        unknown = keys - self.state_keys
        if unknown:
            some = sorted(unknown)[:3]
            hint = nearest(some[0], self.state_keys, n=2)
            raise InputError(
                f"params has {len(unknown)} key(s) the model does not have, e.g. {some}"
                + (f" (nearest: {hint})" if hint else "")
                + "; build it with camfn.params(model) or model.state_dict() of the same architecture"
            )
        if keys >= reads:
            return params
        state = dict(params)
        for key in reads - keys:
            alias = next((a for a in self.aliases.get(key, ()) if a in params), None)
            if alias is not None:
                state[key] = params[alias]
            elif key in self.defaults:
                state[key] = self.defaults[key]
            else:
                raise InputError(f"params lacks {key!r}, which the model_fn reads; pass every key it reads")
        return state

    def resolve(self, layer: str) -> str:
        """fx node name for a node name (``"layer4.1.relu_1"``) or module path (``"layer4"``)."""
        by_qual = {q: n for n, q in self.qualname.items()}
        if layer in by_qual:
            return by_qual[layer]
        if layer in self.qualname:  # an fx node name
            return layer
        depth = layer.count(".") + 1
        for node, qual in reversed(self.qualname.items()):  # last node inside the module
            if ".".join(qual.split(".")[:depth]) == layer:
                return node
        paths = {".".join(q.split(".")[:i]) for q in self.qualname.values() for i in range(1, q.count(".") + 1)}
        hint = nearest(layer, [*paths, *self.qualname.values()])
        extra = ""
        if self.tracer == "fx":
            extra = (
                " If the layer sits inside a module torch.fx keeps as a leaf (torchvision.ops blocks such as "
                "Conv2dNormActivation), tracer='export' reaches it."
            )
        raise LayerError(
            f"layer {layer!r} is neither a node nor a module path of the traced model. "
            f"Nearest names: {', '.join(hint) or '(none)'}. camfn.layers(model, x) lists them all.{extra}"
        )

    def node_shapes(self, x: Tensor) -> dict[str, Any]:
        """Output ``(shape, dtype)`` of every node for an input like ``x`` (cached per shape, dtype, device)."""
        key = (tuple(x.shape), x.dtype, x.device.type)
        found = self.shapes.get(key)
        if found is None:
            with _lock(self.lock):
                found = self.shapes[key] = self._propagate(x)
        return found

    def _propagate(self, x: Tensor) -> dict[str, Any]:
        """Shapes by running the *lifted* program (in-place writes land on its copies, never on the
        model's tensors): fake tensors first, one real forward of zeros where they cannot run."""

        def info(v: Any) -> Any:
            return (v.shape, v.dtype) if isinstance(v, Tensor) else None

        plain = self.program()
        state = dict(self.module.named_parameters(remove_duplicate=False))
        state.update(self.module.named_buffers(remove_duplicate=False))
        state = {k: state[k] for k in plain.reads if k in state}
        values: dict[str, Any] = {}
        leaves = any(n.op == "call_module" and n.target in ("head", "tail") for n in self.module.graph.nodes)
        if not leaves:  # a Cut runs user code: shapes from a real forward, no fake tensor reaches it
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with mode:
                fake = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            try:
                FakeTensorProp(plain.module, mode).propagate_dont_convert_inputs(state, fake)
                values = {n.meta.get("camfn_name", n.name): n.meta.get("val") for n in plain.module.graph.nodes}
            except Exception:
                values = {}
        if not values:
            values = self._run_zeros(plain.module, state, x)
        output = next(n for n in plain.module.graph.nodes if n.op == "output").args[0]
        output = torch.utils._pytree.tree_map(
            lambda a: values[a.meta.get("camfn_name", a.name)] if isinstance(a, fx.Node) else a, output
        )
        out = {name: info(v) for name, v in values.items()}
        out["output"] = torch.utils._pytree.tree_map(info, output)
        return out

    @staticmethod
    def _run_zeros(module: fx.GraphModule, state: Params, x: Tensor) -> dict[str, Any]:
        """Values from one real forward of zeros (for graphs fake tensors cannot run)."""
        values: dict[str, Any] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                values[n.meta.get("camfn_name", n.name)] = result = super().run_node(n)
                return result

        try:
            with torch.no_grad():
                Recorder(module).run(state, torch.zeros(x.shape, dtype=x.dtype, device=x.device))
        except Exception as err:
            raise TraceError(
                f"running the traced model on an input of shape {tuple(x.shape)} failed: {type(err).__name__}: "
                f"{err}{_where(err)}"
            ) from err
        return values


# ---------------------------------------------------------------------------------------- cache keys
_SKIP = {
    "training",
    "_parameters",
    "_buffers",
    "_modules",
    "_non_persistent_buffers_set",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_is_full_backward_hook",
    *HOOK_DICTS,
}
_PLAIN = (int, float, str, bool, type(None), torch.dtype, torch.device)


def _value(v: Any) -> Any:
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, tuple | list) and len(v) <= 16 and all(isinstance(i, _PLAIN) for i in v):
        return (type(v), *v)
    if isinstance(v, Tensor):
        return (id(v), v.shape, v.dtype, v.device)
    return id(v)


def _state(d: dict[str, Any]) -> tuple:
    return tuple((k, None if v is None else (id(v), v.shape, v.dtype, v.device)) for k, v in d.items())


def fingerprint(model: nn.Module) -> tuple:
    """Everything the traced graph depends on: per module its identity, type, mode, hooks, non-tensor
    attributes, and the identity, shape and dtype of its parameters and buffers."""
    return tuple(
        (
            id(m),
            type(m),
            m.training,
            *(tuple(getattr(m, h, ())) for h in HOOK_DICTS),
            tuple((k, _value(v)) for k, v in m.__dict__.items() if k not in _SKIP),
            _state(m._parameters),
            _state(m._buffers),
        )
        for m in model.modules()
    )


def _freeze(options: dict[str, Any] | None) -> tuple:
    def key(v: Any) -> Any:
        if isinstance(v, dict):
            return tuple(sorted((k, key(x)) for k, x in v.items()))
        if isinstance(v, list | tuple | set | frozenset):
            return tuple(sorted((key(x) for x in v), key=repr))
        return v if isinstance(v, str | int | float | bool | type(None)) else id(v)

    return key(options or {})


_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple, tuple[tuple, Traced]]] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.RLock()


def _lock(lock: Any) -> Any:
    """``lock``, or a no-op inside ``torch.compile`` (dynamo cannot enter a lock, and a compiled call only
    reads caches that :func:`camfn.compiled` filled before compiling)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else lock


def _cached(model: Any, key: tuple, stamp: tuple, build: Callable[[], Traced]) -> Traced:
    per_model = _CACHE.get(model)
    if per_model is not None:
        hit = per_model.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    with _lock(_CACHE_LOCK):
        per_model = _CACHE.setdefault(model, {})
        hit = per_model.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        traced = build()
        per_model[key] = (stamp, traced)
        return traced


# ---------------------------------------------------------------------------------------- torch.fx
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


def _check_module(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module or a function model_fn(params, x), got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError("TorchScript modules cannot be traced; explain the original nn.Module instead.")
    return model


def _where(err: BaseException) -> str:
    """``file:line`` of the innermost frame of ``err`` outside torch (where the user's code failed)."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    outside = [f for f in frames if "/torch/" not in f.filename and "/camfn/" not in f.filename]
    frame = (outside or frames or [None])[-1]
    return f" (at {frame.filename}:{frame.lineno}: {frame.line})" if frame is not None else ""


def trace(model: nn.Module, *, hooks: HookPolicy = "error", tracer_options: dict[str, Any] | None = None) -> Traced:
    """Trace ``model`` (a skeleton copy of it) with torch.fx in its current mode; cached, never stale.

    Args:
        model: the user's module; it is read, never written.
        hooks: what to do with forward/backward hooks camfn did not register: ``"error"`` (default:
            raise :class:`~camfn.errors.HookError` naming them), ``"ignore"`` (trace a copy without them),
            ``"keep"`` (run them inside the copy). Weight-defining hooks and transformers' own are kept.
        tracer_options: passed to ``NodePathTracer`` (``leaf_modules``, ``autowrap_functions``,
            ``autowrap_modules``, ``param_shapes_constant``) and ``concrete_args`` to ``trace``.
    """
    model = _check_module(model)
    check_hooks(model, hooks)
    if tracer_options is not None and not isinstance(tracer_options, dict):
        raise OptionError(f"tracer_options must be a dict or None, got {type(tracer_options).__name__}")
    return _cached(
        model, ("fx", hooks, _freeze(tracer_options)), fingerprint(model), lambda: _fx(model, hooks, tracer_options)
    )


def _fx(model: nn.Module, hooks: HookPolicy, tracer_options: dict[str, Any] | None) -> Traced:
    copy = skeleton(model, hooks, {})
    tracer = (CutTracer if isinstance(model, Cut) else NodePathTracer)(**_tracer_kwargs(tracer_options))
    tracer.proxy_buffer_attributes = True  # a buffer written in forward is recorded, never written while tracing
    try:
        graph = tracer.trace(copy, concrete_args=(tracer_options or {}).get("concrete_args"))
    except Exception as err:
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {err}{_where(err)}\n"
            "Ways out:\n"
            "  1. tracer='export' (or the default tracer='auto', which falls back to it): torch.export handles "
            "control flow on shapes and dtypes; layer names stay module paths such as 'layer4';\n"
            "  2. tracer options, when a submodule is what fails: tracer_options={'leaf_modules': [TheirClass]} "
            "(layers inside it can no longer be picked), {'autowrap_functions': [fn]}, {'concrete_args': {...}};\n"
            "  3. camfn.Cut(head, tail): explain model=camfn.Cut(head, tail) at layer='head', with head(x) -> A "
            "and tail(A) -> output written by you (works for any model)."
        ) from err
    module = fx.GraphModule(tracer.root, graph, type(model).__name__)
    qualname = _module_paths(
        {n: q for n, q in tracer.node_to_qualname.items() if n.op not in ("placeholder", "get_attr")}
    )
    return _traced(model, module, qualname, "fx")


def _traced(model: nn.Module, module: fx.GraphModule, qualname: dict[str, str], tracer: str) -> Traced:
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    by_tensor: dict[int, list[str]] = {}
    for k, v in state.items():
        by_tensor.setdefault(id(v), []).append(k)
    aliases = {k: tuple(a for a in by_tensor[id(v)] if a != k) for k, v in state.items() if len(by_tensor[id(v)]) > 1}
    prefix = getattr(model, "num_prefix_tokens", None)
    return Traced(
        module=module,
        qualname=qualname,
        state_keys=frozenset(state),
        defaults={k: v.detach() for k, v in state.items()},
        aliases=aliases,
        tracer=tracer,
        modules=frozenset(p for p, _ in model.named_modules() if p),
        prefix_tokens=prefix if isinstance(prefix, int) and not isinstance(prefix, bool) else None,
    )


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


# ------------------------------------------------------------------------------------- torch.export
def _size(t: Tensor, dim: int) -> int:
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


def _export_message(err: BaseException, model: nn.Module, x: Tensor) -> str:
    text = f"{type(err).__name__}: {str(err)[:1500]}"
    if isinstance(err, AttributeError | TypeError) and "NoneType" in str(err):
        why = (
            "the forward read an input that was not given (None): pass the model's other inputs with "
            "model_kwargs={...} (e.g. CLIPModel's input_ids), or wrap the model so it takes one tensor"
        )
    elif isinstance(err, ValueError | AssertionError | RuntimeError) and "shape" in str(err).lower():
        why = f"the model refused an input of shape {tuple(x.shape)}: check the input size and channels it expects"
    elif "data-dependent" in str(err).lower() or "guard" in str(err).lower():
        why = (
            "data-dependent Python control flow (an `if` on tensor values) defeats both tracers: mark that "
            "submodule as a leaf (tracer_options={'leaf_modules': [TheirClass]}) or explain camfn.Cut(head, tail)"
        )
    else:
        why = "see the original error above; camfn.Cut(head, tail) explains any model"
    return f"torch.export could not trace {type(model).__name__}: {text}{_where(err)}\nWhy and what to do: {why}."


def trace_export(
    model: nn.Module, x: Tensor, *, hooks: HookPolicy = "error", model_kwargs: dict | None = None
) -> Traced:
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
    model = _check_module(model)
    check_hooks(model, hooks)
    key = ("export", hooks, tuple(x.shape[1:]), x.dtype, x.device.type, _freeze(model_kwargs))
    return _cached(model, key, fingerprint(model), lambda: _export(model, x, hooks, model_kwargs))


def _export(model: nn.Module, x: Tensor, hooks: HookPolicy, model_kwargs: dict | None) -> Traced:
    copy = skeleton(model, hooks, {})
    example = torch.zeros((2, *x.shape[1:]), dtype=x.dtype, device=x.device)
    kwargs = dict(model_kwargs or {})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(
                copy, (example,), kwargs or None, dynamic_shapes=({0: torch.export.Dim.AUTO},) if not kwargs else None
            )
    except Exception as err:
        raise TraceError(_export_message(err, model, x)) from err
    return _from_exported(exported, model, _export_names)


def _from_exported(exported: Any, model: nn.Module, names: Callable[[fx.GraphModule, nn.Module], dict]) -> Traced:
    unlifted = exported.module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    flat_out = graph.graph_copy(unlifted.graph, env)
    spec = getattr(unlifted, "_out_spec", None) or exported.call_spec.out_spec
    out = torch.utils._pytree.tree_unflatten(list(flat_out), spec) if spec is not None else flat_out
    graph.output(out)
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int:
            n.target = _size
        elif n.op == "call_module" and str(n.target).startswith("_guards"):
            graph.erase_node(n)
    graph.eliminate_dead_code()
    module = fx.GraphModule(unlifted, graph, type(model).__name__)
    return _traced(model, module, names(module, model), "export")


# ---------------------------------------------------------------------------------------- model_fn
class _Function(nn.Module):
    """``model_fn(params, x)`` with the trace-time ``params`` as this module's buffers (for tracing only)."""

    def __init__(self, fn: Callable[[Params, Tensor], Any], example: Params) -> None:
        super().__init__()
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "keys", list(example))
        holder = nn.Module()
        for i, v in enumerate(example.values()):
            holder.register_buffer(f"p{i}", v, persistent=False)
        self.state = holder
        object.__setattr__(self, "names", {f"state.p{i}": k for i, k in enumerate(example)})

    def forward(self, x: Tensor) -> Any:
        return self.fn({k: getattr(self.state, f"p{i}") for i, k in enumerate(self.keys)}, x)


def trace_function(fn: Callable[[Params, Tensor], Any], params: Params, x: Tensor) -> Traced:
    """Trace a plain function ``model_fn(params, x) -> output`` with ``torch.export``; cached.

    Layers are named by graph node (``conv2d``, ``relu_1``...; :func:`camfn.layers` lists them). The trace
    is cached per function, input shape and the keys, shapes and dtypes of ``params``.

    Example:
        >>> import torch, torch.nn.functional as F, camfn
        >>> def model_fn(p, x):
        ...     a = F.relu(F.conv2d(x, p["w"], padding=1))
        ...     return a.mean((2, 3)) @ p["fc"]
        >>> p = {"w": torch.randn(4, 3, 3, 3), "fc": torch.randn(4, 2)}
        >>> camfn.gradcam(model_fn, p, torch.randn(1, 3, 8, 8), "relu", 1).shape
        torch.Size([1, 8, 8])
    """
    if not callable(fn):
        raise InputError(f"model must be an nn.Module or a function model_fn(params, x), got {type(fn).__name__}")
    if not isinstance(params, dict) or not all(isinstance(v, Tensor) for v in params.values()):
        raise InputError("a model_fn needs params as a dict of tensors (its own parameters), e.g. {'w': tensor}")
    stamp = tuple((k, v.shape, v.dtype, v.device) for k, v in params.items())
    key = ("function", tuple(x.shape[1:]), x.dtype, x.device.type)
    example = {k: v.detach() for k, v in params.items()}
    return _cached(fn, key, stamp, lambda: _function(fn, example, x))


def _function(fn: Callable[[Params, Tensor], Any], example: Params, x: Tensor) -> Traced:
    wrapper = _Function(fn, example)
    sample = torch.zeros((2, *x.shape[1:]), dtype=x.dtype, device=x.device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(wrapper, (sample,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    except Exception as err:
        raise TraceError(
            f"camfn could not trace the model_fn {getattr(fn, '__qualname__', fn)!r}: {type(err).__name__}: {err}"
            f"{_where(err)}\nA model_fn is called as model_fn(params, x) with params a dict of tensors and x a "
            "(B, C, H, W) batch; make it traceable by torch.export (no data-dependent Python control flow)"
        ) from err
    traced = _from_exported(exported, wrapper, _node_names)
    traced.tracer = "function"

    for n in traced.module.graph.nodes:  # the holder's buffers are the user's keys
        if n.op == "get_attr" and n.target in wrapper.names:
            tensor = traced.module.get_buffer(n.target)
            n.target = wrapper.names[n.target]
            install(traced.module, n.target, tensor)
    traced.module.recompile()
    traced.state_keys = frozenset(example)
    traced.defaults, traced.aliases = {}, {}
    return traced


def _node_names(gm: fx.GraphModule, model: nn.Module) -> dict[str, str]:
    return {n.name: n.name for n in gm.graph.nodes if n.op == "call_function"}


# ---------------------------------------------------------------------------------------- selection
def traced(
    model: Model,
    params: Params | None,
    x: Tensor | None,
    *,
    tracer: str = "auto",
    hooks: HookPolicy = "error",
    tracer_options: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Traced:
    """The trace a method runs on: ``model_fn`` by export; a module by fx, export, or fx falling back to
    export (``tracer="auto"``, with one warning naming ``tracer=``); Hugging Face models go to export."""
    if tracer not in TRACERS:
        raise OptionError(f"tracer={tracer!r}: use 'auto' (default), 'fx' or 'export' (torch.export)")
    if not isinstance(model, nn.Module):
        if x is None or params is None:
            raise InputError("a model_fn is traced from an example: pass params and x (or an input shape)")
        return trace_function(model, params, x)
    wants_export = tracer == "export" or (tracer == "auto" and _is_transformers(model))
    if model_kwargs and not wants_export:
        if tracer == "fx":
            raise OptionError("model_kwargs needs tracer='export' (or the default 'auto')")
        wants_export = True
    if wants_export:
        if x is None:
            raise InputError(
                "tracer='export' needs an example input: pass x (a tensor or a shape such as (1, 3, 64, 64))"
            )
        return trace_export(model, x, hooks=hooks, model_kwargs=model_kwargs)
    if tracer == "fx" or x is None or isinstance(model, Cut):
        return trace(model, hooks=hooks, tracer_options=tracer_options)
    try:
        return trace(model, hooks=hooks, tracer_options=tracer_options)
    except TraceError as fx_error:
        if tracer_options:
            raise
        try:
            result = trace_export(model, x, hooks=hooks)
        except TraceError as export_error:
            raise TraceError(
                f"{fx_error}\n\nThe fallback to torch.export failed too:\n{export_error}"
            ) from export_error
        _warn_fallback(model, fx_error)
        return result


_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _warn_fallback(model: nn.Module, err: TraceError) -> None:
    if model in _WARNED:
        return
    _WARNED.add(model)
    first = str(err).splitlines()[0]
    warnings.warn(
        f"camfn traced {type(model).__name__} with torch.export because torch.fx failed ({first[:300]}); "
        "pass tracer='export' to choose it (and silence this warning) or tracer='fx' to refuse the fallback",
        stacklevel=4,
    )


def _is_transformers(model: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] == "transformers" for c in type(model).__mro__)


def apply(model: Model, p: Params, x: Tensor, **trace_options: Any) -> Any:
    """The model's output for ``x`` under parameters ``p``: ``f(p, x)``, pure.

    Example:
        >>> import torch, camfn
        >>> net = torch.nn.Linear(3, 2)
        >>> bool(torch.equal(camfn.apply(net, camfn.params(net), torch.ones(1, 3)), net(torch.ones(1, 3))))
        True
    """
    return traced(model, p, x, **trace_options).program()(p, x)


def layer_list(layer: Any) -> list[Any] | None:
    """``layer`` as a list (``None`` stays ``None``)."""
    if layer is None:
        return None
    items = [layer] if isinstance(layer, str | nn.Module) else list(layer) if isinstance(layer, Sequence) else [layer]
    if not items:
        raise LayerError("layer is an empty list; pass at least one layer name")
    return items
