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
import operator
import threading
import warnings
import weakref
from collections import OrderedDict
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

from .checks import check_model
from .cut import Cut, CutTracer
from .errors import InputError, LayerError, OptionError, TraceError, nearest
from .hooks import HookPolicy, check_hooks, skeleton
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
            f"camfn.params needs an nn.Module, got {type(model).__name__}; for a model_fn pass your own dict of "
            "tensors as params"
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
    attention: dict[tuple, Any] = field(default_factory=dict)  # (pool, item shape) -> legrad's (Program, blocks)
    probes: dict[tuple, Any] = field(default_factory=dict)  # (pool, input shape...) -> legrad's (blocks, P shapes)
    biases: tuple | None = None  # fullgrad: (node, bias key, BatchNorm keys and eps or None) of each bias layer
    defaults: dict[tuple, Any] = field(default_factory=dict)  # item shape -> adapters.Defaults (structure only)


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
    batch: int | None = None  # the batch size the graph is fixed to (None: any)
    prefix_tokens: int | None = None
    cache: Cache = field(default_factory=Cache)
    by_name: dict[str, str] | None = None  # user-facing name -> node name, built on first use
    checked: tuple | None = None  # the last params dict found valid (camfn.checks.check_params), and its tensors
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
            raise InputError(f"params must be a dict of tensors, got {type(params).__name__}; pass camfn.params(model)")
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
        if self.by_name is None:  # derived once per trace (resolve runs on every call)
            self.by_name = {q: n for n, q in self.qualname.items()}
        if layer in self.by_name:
            return self.by_name[layer]
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
            f"Pick one of the nearest names: {', '.join(hint) or '(none)'}; "
            f"camfn.layers(model, x) lists them all.{extra}"
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
        model's tensors): on the meta device first (no data: ~10x faster than fake tensors), fake tensors
        where meta kernels cannot run, one real forward of zeros where neither can."""

        def info(v: Any) -> Any:
            return (v.shape, v.dtype) if isinstance(v, Tensor) else None

        plain = self.program()
        state = dict(self.module.named_parameters(remove_duplicate=False))
        state.update(self.module.named_buffers(remove_duplicate=False))
        state = {k: state[k] for k in plain.reads if k in state}
        values: dict[str, Any] = {}
        leaves = any(n.op == "call_module" and n.target in ("head", "tail") for n in self.module.graph.nodes)
        if not leaves:  # a Cut runs user code: shapes from a real forward, no meta or fake tensor reaches it
            values = _recorded(plain.module, {k: v.to("meta") for k, v in state.items()}, x, "meta")
            if not values:
                values = _faked(plain.module, state, x)
        if not values:
            values = _recorded(plain.module, state, x, "zeros")
        output = next(n for n in plain.module.graph.nodes if n.op == "output").args[0]
        output = torch.utils._pytree.tree_map(
            lambda a: values[a.meta.get("camfn_name", a.name)] if isinstance(a, fx.Node) else a, output
        )
        out = {name: info(v) for name, v in values.items()}
        out["output"] = torch.utils._pytree.tree_map(info, output)
        return out


def _faked(module: fx.GraphModule, state: Params, x: Tensor) -> dict[str, Any]:
    """Node values from fake-tensor propagation; ``{}`` where it fails."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    try:
        FakeTensorProp(module, mode).propagate_dont_convert_inputs(state, fake)
    except Exception:
        return {}
    return {n.meta.get("camfn_name", n.name): n.meta.get("val") for n in module.graph.nodes}


def _recorded(module: fx.GraphModule, state: Params, x: Tensor, on: str) -> dict[str, Any]:
    """Node values from one run on an input like ``x``: of meta tensors (``on="meta"``; ``{}`` where a
    kernel or the graph's own tensors refuse them), or of real zeros (``"zeros"``; a failure is a TraceError)."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n.meta.get("camfn_name", n.name)] = result = super().run_node(n)
            return result

    device = "meta" if on == "meta" else x.device
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Recorder(module).run(state, torch.zeros(x.shape, dtype=x.dtype, device=device))
    except Exception as err:
        if on == "meta":
            return {}
        raise TraceError(
            f"running the traced model on an input of shape {tuple(x.shape)} failed: {type(err).__name__}: "
            f"{err}{_where(err)}"
        ) from err
    return values


# ---------------------------------------------------------------------------------------- cache keys


class Fingerprint:
    """Everything the traced graph depends on, compared on every call: per module its type, every attribute
    (mode, stride, padding, eps, a user's ``self.temperature``...), the contents of its containers (hooks,
    children, list and dict attributes: an in-place edit counts), the identities of its parameters and
    buffers (a replaced tensor — ``m.weight = ...``, ``load_state_dict(assign=True)`` — is a new object); and
    the global module hooks.

    The walk over the module tree is done once. :meth:`matches` first reads the version tag CPython keeps in
    every dict (bumped by any write; the one torch.compile's guards read): when no ``__dict__`` and no dict
    container changed and the lists hold what they held, nothing did. Otherwise it compares each live
    ``__dict__`` with a copy taken then, and each container with a copy of its contents, in C
    (``dict.__eq__``: identity first, then ``==``), and remembers the new tags when all still match (a
    repeated ``model.eval()``). A replaced child changes its parent's ``_modules``, so the walk is still valid
    whenever everything else matches. About 0.45 us per module (resnet18: 68 modules, ~30 us), and a
    fraction of it on the version path, which also touches far less memory after a forward has cooled the
    caches.
    """

    __slots__ = (
        "_children",
        "_containers",
        "_contents",
        "_dicts",
        "_hooks",
        "_keys",
        "_listed",
        "_lists",
        "_saved",
        "_tensor_ids",
        "_tensors",
        "_versioned",
        "_versions",
    )

    def __init__(self, model: nn.Module) -> None:
        modules, stack, seen = [], [model], set()
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            modules.append(m)
            stack.extend(c for c in (m.__dict__.get("_modules") or {}).values() if c is not None)
        self._children = modules[1:]  # never the root: the cache holds this weakly keyed by the root
        self._dicts = [m.__dict__ for m in modules]
        containers = [v for d in self._dicts for k, v in d.items() if type(v) in _CONTAINERS and k not in _INERT]
        self._containers = [c for c in containers if isinstance(c, dict)]  # version-tagged, compared on a change
        self._lists = [c for c in containers if not isinstance(c, dict)]  # lists and sets: compared every call
        # a replaced tensor of more than one element fails ``==`` (elementwise: ambiguous): only those of
        # one element or none need their identity compared
        small = [
            (t, k)
            for d in self._dicts
            for name in ("_parameters", "_buffers")
            if type(t := d.get(name)) is dict
            for k, v in t.items()
            if v is None or v.numel() <= 1
        ]
        self._tensors, self._keys = [t for t, _ in small], [k for _, k in small]
        self._saved = (type(model), *map(type, self._children), *map(dict.copy, self._dicts))
        self._contents = [type(c)(c) for c in self._containers]
        self._listed = [type(c)(c) for c in self._lists]
        self._tensor_ids = self._small_ids()
        self._hooks = _global_hooks()
        self._versioned = self._dicts + self._containers
        self._versions = self._tags()

    def _tags(self) -> list[int] | None:
        return None if _DICT_VERSION is None else list(map(_DICT_VERSION, self._versioned))

    def _small_ids(self) -> list[int]:
        return list(map(id, map(dict.get, self._tensors, self._keys)))

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model``'s modules are as they were when this fingerprint was taken."""
        saved, contents, ids, hooks = self._saved, self._contents, self._tensor_ids, self._hooks
        try:
            same = (
                saved[0] is type(model)
                and all(map(operator.is_, saved[1 : len(self._children) + 1], map(type, self._children)))
                and _global_hooks() == hooks
                and all(map(operator.eq, self._lists, self._listed))
            )
            if not same or (self._versions is not None and self._tags() == self._versions):
                return bool(same)
            same = all(map(operator.eq, self._dicts, saved[len(self._children) + 1 :])) and bool(
                all(map(operator.eq, self._containers, contents)) and self._small_ids() == ids
            )
        except (RuntimeError, TypeError, ValueError):  # a changed tensor attribute (``==`` is elementwise)
            return False
        if same:
            self._versions = self._tags()  # written, but to the same values (model.eval() on an eval model)
        return bool(same)


_CONTAINERS = frozenset({dict, list, set, OrderedDict})


def _dict_version() -> Callable[[dict], int] | None:
    """CPython's per-dict version tag (torch.compile's guard primitive), where this torch and Python have one
    that moves on every write (checked once: a constant tag would make every change invisible)."""
    tag = getattr(getattr(getattr(torch._C, "_dynamo", None), "guards", None), "dict_version", None)
    if tag is None:
        return None
    try:
        probe: dict[str, Any] = {}
        seen = [tag(probe)]
        probe["a"] = 1
        seen.append(tag(probe))
        probe["a"] = 2
        seen.append(tag(probe))
        del probe["a"]
        seen.append(tag(probe))
    except Exception:
        return None
    return tag if len(set(seen)) == len(seen) else None


_DICT_VERSION = _dict_version()
_INERT = frozenset(
    {
        "_non_persistent_buffers_set",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_forward_hooks_with_kwargs",  # flags of hooks that are in _forward_hooks / _forward_pre_hooks
        "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs",
    }
)
"""nn.Module containers that never change what a forward computes (their contents are not compared)."""


def _same(a: tuple, b: tuple) -> bool:
    """``a == b`` for fingerprints; a changed tensor attribute (whose ``==`` is elementwise) counts as a change."""
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False


def _global_hooks() -> tuple:
    from torch.nn.modules import module

    return tuple(
        tuple(getattr(module, k, {}))
        for k in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
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


def _cached(model: Any, key: tuple, stamp: Callable[[], Fingerprint] | tuple, build: Callable[[], Traced]) -> Traced:
    """The cached trace under ``key`` while it is fresh, else a new one. ``stamp``: a tuple compared by value
    (a model_fn's parameter shapes) or a function taking the :class:`Fingerprint` of a module, whose
    :meth:`~Fingerprint.matches` decides. Inside ``torch.compile`` the trace that :func:`camfn.compiled`'s
    eager warm-up cached is read without re-taking the fingerprint (dynamo cannot compare arbitrary module
    attributes): a compiled function explains the model as it was when it was compiled."""
    per_model = _CACHE.get(model)
    if torch.compiler.is_compiling() and per_model is not None and key in per_model:
        return per_model[key][1]
    hit = per_model.get(key) if per_model is not None else None
    if hit is not None and _fresh(hit[0], stamp, model):
        return hit[1]
    with _lock(_CACHE_LOCK):
        per_model = _CACHE.setdefault(model, {})
        hit = per_model.get(key)
        if hit is not None and _fresh(hit[0], stamp, model):
            return hit[1]
        taken = stamp() if callable(stamp) else stamp
        traced = build()
        per_model[key] = (taken, traced)
        return traced


def _fresh(taken: Fingerprint | tuple, stamp: Callable[[], Fingerprint] | tuple, model: Any) -> bool:
    return taken.matches(model) if isinstance(taken, Fingerprint) else _same(taken, stamp)


# ---------------------------------------------------------------------------------------- torch.fx
_TRACED_THROUGH = {"Conv2dNormActivation", "Conv3dNormActivation", "SqueezeExcitation", "MLP", "Permute"}
"""torchvision.ops blocks that are plain containers: traced through (their layers can be picked and their
calls become functional, no private copy per call). The other torchvision.ops modules (RoI pooling, FPN,
stochastic depth, drop-block) stay leaves."""


def _leaf_ops() -> list[type]:
    return [
        obj
        for name, obj in vars(torchvision.ops).items()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj is not nn.Module and name not in _TRACED_THROUGH
    ]


def _tracer_kwargs(options: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(options or {})
    kwargs.pop("concrete_args", None)
    kwargs["autowrap_modules"] = tuple(set(kwargs.get("autowrap_modules", ())) | {math, torchvision.ops})
    kwargs["leaf_modules"] = list(set(kwargs.get("leaf_modules", [])) | set(_leaf_ops()))
    return kwargs


def _check_module(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model must be an nn.Module or a function model_fn(params, x), got {type(model).__name__}; "
            "pass one of these"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError("TorchScript modules cannot be traced; explain the original nn.Module instead.")
    if type(model).forward is nn.Module.forward:  # _forward_unimplemented: a wrapper that overrides __call__
        raise InputError(
            f"{type(model).__name__} has no forward() (it overrides __call__), so it cannot be traced as a module. "
            "Define forward, or explain it as a function: "
            "model_fn = lambda p, x: torch.func.functional_call(model, p, (x,))"
        )
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
    if tracer_options is not None and not isinstance(tracer_options, dict):
        raise OptionError(f"tracer_options must be a dict or None, got {type(tracer_options).__name__}")
    return _cached(
        model,
        ("fx", hooks, _freeze(tracer_options)),
        lambda: Fingerprint(model),
        lambda: _fx(model, hooks, tracer_options),
    )


def _fx(model: nn.Module, hooks: HookPolicy, tracer_options: dict[str, Any] | None) -> Traced:
    _check_once(model, hooks)
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
    key = _dict_key(graph)
    if key is not None:
        raise InputError(dict_input_message(model, key))
    module = fx.GraphModule(tracer.root, graph, type(model).__name__)
    qualname = _module_paths(
        {n: q for n, q in tracer.node_to_qualname.items() if n.op not in ("placeholder", "get_attr")}
    )
    return _traced(model, module, qualname, "fx")


def _check_once(model: nn.Module, hooks: HookPolicy) -> None:
    """Hooks and modes, checked when a trace is built: both are part of the fingerprint, so a cached trace
    stands for a model that passed them."""
    check_hooks(model, hooks)
    check_model(model)


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


def dict_input_message(model: nn.Module, key: str | None) -> str:
    """The error for a model whose forward takes a dict (or another container) instead of a tensor."""
    key = key or "<key>"
    name = type(model).__name__
    return (
        f"{name}.forward takes a dict (it reads x[{key!r}]), but camfn explains a function of one tensor x. "
        "Wrap it (3 lines) and explain the wrapper:\n"
        "    class ImageOnly(torch.nn.Module):\n"
        "        def __init__(self, model): super().__init__(); self.model = model\n"
        f"        def forward(self, x): return self.model({{{key!r}: x}})\n"
        "then camfn.gradcam(ImageOnly(model), camfn.params(ImageOnly(model)), x, ...) (layer names gain 'model.')"
    )


def _dict_key(graph: fx.Graph) -> str | None:
    """The key a traced forward reads from its first input as a dict (``x["image"]``), if any."""
    first = next((n for n in graph.nodes if n.op == "placeholder"), None)
    for user in first.users if first is not None else ():
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], str):
            return user.args[1]
        if user.op == "call_method" and user.target in ("get", "keys", "items", "values"):
            return user.args[1] if len(user.args) > 1 and isinstance(user.args[1], str) else None
    return None


def _export_message(err: BaseException, model: nn.Module, x: Tensor) -> str:
    """Why ``torch.export`` failed, from the exception and the line that raised it, and what to do."""
    import inspect
    import re

    text, where = f"{type(err).__name__}: {str(err)[:1500]}", _where(err)
    message = str(err).lower()
    accepted = inspect.signature(type(model).forward).parameters
    key = re.search(r"\[\s*['\"]([^'\"]+)['\"]\s*\]", where)
    if isinstance(err, IndexError | TypeError | KeyError) and key and ("indic" in message or "str" in message):
        return f"torch.export could not trace {type(model).__name__}: {text}{where}\n" + dict_input_message(
            model, key.group(1)
        )
    missing = [n for n in accepted if n not in ("self", "pixel_values") and re.search(rf"\b{n}\b", str(err))]
    if "data-dependent" in message or "guard" in message:
        why = (
            "data-dependent Python control flow (an `if` on tensor values) defeats both tracers: mark that "
            "submodule as a leaf (tracer_options={'leaf_modules': [TheirClass]}) or explain camfn.Cut(head, tail)"
        )
    elif isinstance(err, ValueError | TypeError) and missing:
        why = (
            f"{type(model).__name__} needs the input {missing[0]!r} besides the image: pass it with "
            f"model_kwargs={{{missing[0]!r}: ...}} (fixed for every call, e.g. CLIPModel's tokenized texts)"
        )
    elif isinstance(err, AttributeError | TypeError) and "nonetype" in message:
        extra = [n for n, p in accepted.items() if p.default is None and n != "pixel_values"][:4]
        inputs = f"{type(model).__name__}.forward also takes {', '.join(extra)}; " if extra else ""
        example = next((n for n in extra if n.endswith("input_ids")), extra[0] if extra else "name")
        why = (
            f"the forward read an input that was not given (None): {inputs}pass the ones it needs with "
            f"model_kwargs={{{example!r}: ...}} (fixed for every call), or wrap the model so it takes one tensor"
        )
    elif isinstance(err, ValueError | AssertionError) and "/torch/" not in where:
        interpolate = (
            "; or let it interpolate its position embeddings: model_kwargs={'interpolate_pos_encoding': True}"
            if "interpolate_pos_encoding" in accepted
            else ""
        )
        why = (
            f"the model itself refused the input of shape {tuple(x.shape)} (its message is above): pass an input "
            f"of the size and channels it was built for{interpolate}"
        )
    elif isinstance(err, RuntimeError) and ("shape" in message or "size" in message):
        why = (
            f"the model cannot run on an input of shape {tuple(x.shape)}: check the input size and channels it expects"
        )
    else:
        why = "see the original error above; camfn.Cut(head, tail) explains any model"
    return f"torch.export could not trace {type(model).__name__}: {text}{where}\nWhy and what to do: {why}."


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
    key = ("export", hooks, tuple(x.shape[1:]), x.dtype, x.device.type, _freeze(model_kwargs))

    def stamp() -> Fingerprint:
        return Fingerprint(model)

    result = _cached(model, key, stamp, lambda: _export(model, x, hooks, model_kwargs))
    if result.batch is not None and result.batch != x.shape[0]:  # traced at another fixed batch size
        b = x.shape[0]
        result = _cached(model, (*key, b), stamp, lambda: _export(model, x, hooks, model_kwargs, batch=b))
    return result


def _bind(copy: nn.Module, model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Make camfn's copy a function of ``x`` alone: ``model(x, **kwargs)``, or ``model(<main input>=x, **kwargs)``
    for Hugging Face models (CLIPModel's first argument is ``input_ids``, its image is ``pixel_values``).
    The extra inputs are fixed in the trace; the user's model is not touched (the copy gets an instance ``forward``)."""
    import inspect

    forward = type(model).forward
    accepted = inspect.signature(forward).parameters
    names = ("pixel_values", getattr(model, "main_input_name", None))  # HF image input, else its main input
    name = next((n for n in names if isinstance(n, str) and n in accepted and n not in kwargs), None)

    def bound(x: Tensor) -> Any:
        return forward(copy, **{name: x}, **kwargs) if isinstance(name, str) else forward(copy, x, **kwargs)

    object.__setattr__(copy, "forward", bound)


def _image_input(model: nn.Module) -> bool:
    """True when the forward takes the image as ``pixel_values`` but not as its first argument (CLIPModel)."""
    import inspect

    names = list(inspect.signature(type(model).forward).parameters)[1:]
    return "pixel_values" in names and names[0] != "pixel_values"


def _export(
    model: nn.Module, x: Tensor, hooks: HookPolicy, model_kwargs: dict | None, batch: int | None = None
) -> Traced:
    """Export with a dynamic batch; a model whose code fixes the batch size (a Python loop over samples, extra
    inputs tied to the batch such as attention masks) is exported again at ``x``'s batch and marked
    ``Traced.batch`` (its perturbed copies then run per batch). ``model_kwargs`` are bound into camfn's copy."""
    _check_once(model, hooks)
    copy = skeleton(model, hooks, {})
    kwargs = dict(model_kwargs or {})
    if kwargs or _image_input(model):
        _bind(copy, model, kwargs)
    dynamic = batch is None
    example = torch.zeros((_EXAMPLE_BATCH if dynamic else x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    exported = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exported = torch.export.export(
                    copy, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},) if dynamic else None
                )
            except Exception:
                if not (dynamic and kwargs):
                    raise
    except Exception as err:
        raise TraceError(_export_message(err, model, x)) from err
    if exported is None:  # the extra inputs fix the batch size
        return _export(model, x, hooks, model_kwargs, batch=x.shape[0])
    if dynamic and not _dynamic_batch(exported, _EXAMPLE_BATCH):
        return _export(model, x, hooks, model_kwargs, batch=x.shape[0])
    result = _from_exported(exported, model, _export_names)
    result.batch = None if dynamic else example.shape[0]
    return result


_EXAMPLE_BATCH = 5  # an unusual size: an output list of exactly this many items is a per-sample list


def _dynamic_batch(exported: Any, batch: int) -> bool:
    """Whether the exported program kept the batch dimension symbolic, in its input and in the structure of
    its output (a per-sample list such as ``[dict(...) for row in out]`` fixes the count of items)."""

    def per_sample(spec: Any) -> bool:
        children = spec.children() if hasattr(spec, "children") else getattr(spec, "children_specs", [])
        if spec.type in (list, tuple) and len(children) == batch:
            return True
        return any(per_sample(c) for c in children)

    if per_sample(exported.call_spec.out_spec):
        return False
    names = set(exported.graph_signature.user_inputs[:1])
    for node in exported.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta.get("val")
            return val is not None and isinstance(val.shape[0], torch.SymInt)
    return False


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
        raise InputError(
            f"model must be an nn.Module or a function model_fn(params, x), got {type(fn).__name__}; pass one of these"
        )
    if not isinstance(params, dict) or not all(isinstance(v, Tensor) for v in params.values()):
        raise InputError("a model_fn needs params as a dict of tensors (its own parameters): pass e.g. {'w': tensor}")
    stamp = tuple((k, v.shape, v.dtype, v.device) for k, v in params.items())
    key = ("function", tuple(x.shape[1:]), x.dtype, x.device.type)
    example = {k: v.detach() for k, v in params.items()}
    result = _cached(fn, key, stamp, lambda: _function(fn, example, x))
    if result.batch is not None and result.batch != x.shape[0]:  # traced at another fixed batch size
        b = x.shape[0]
        result = _cached(fn, (*key, b), stamp, lambda: _function(fn, example, x, batch=b))
    return result


def _function(fn: Callable[[Params, Tensor], Any], example: Params, x: Tensor, batch: int | None = None) -> Traced:
    wrapper = _Function(fn, example)
    dynamic = batch is None
    sample = torch.zeros((_EXAMPLE_BATCH if dynamic else batch, *x.shape[1:]), dtype=x.dtype, device=x.device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(
                wrapper, (sample,), dynamic_shapes=({0: torch.export.Dim.AUTO},) if dynamic else None
            )
    except Exception as err:
        raise TraceError(
            f"camfn could not trace the model_fn {getattr(fn, '__qualname__', fn)!r}: {type(err).__name__}: {err}"
            f"{_where(err)}\nA model_fn is called as model_fn(params, x) with params a dict of tensors and x a "
            "(B, C, H, W) batch; define it with that signature and make it traceable by torch.export (no "
            "data-dependent Python control flow)"
        ) from err
    if dynamic and not _dynamic_batch(exported, _EXAMPLE_BATCH):
        return _function(fn, example, x, batch=x.shape[0])
    traced = _from_exported(exported, wrapper, _node_names)
    traced.tracer, traced.batch = "function", batch

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
    """A model_fn's layer names: the op of each node, numbered when repeated (``relu``, ``relu_1``...)."""
    used: dict[str, int] = {}
    names = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            op = _op_name(n)
            k = used.get(op, 0)
            used[op] = k + 1
            names[n.name] = op if k == 0 else f"{op}_{k}"
    return names


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
