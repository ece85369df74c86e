r"""Compile a method once per model and layer: ``camfn.compiled(method, model, layer, **options)``.

A method call has an impure, cached part (trace the model, rewrite the graph, find the layer, propagate
shapes, draw noise) and a pure part (``torch.func`` on the rewritten graph). :func:`compiled` runs the
method once eagerly for each new input signature (shape, dtype, device), which fills every cache, then
calls ``torch.compile(fullgraph=True)`` of

.. math:: (\theta, x, t) \mapsto \mathrm{method}(\mathrm{model}, \theta, x, \mathrm{layer}, t, \ldots)

in which dynamo only *reads* those caches: one graph, no graph breaks, for every method in
:data:`camfn.METHODS`. Shapes are static (``dynamic=False``): a new input shape compiles again.
Noise (``smooth_gradcampp``, ``sscam``) is drawn eagerly from the int ``seed`` and replayed as constants
(see :func:`camfn.noise.pinned`), so compiled maps equal eager ones.

Example:
    >>> import torch, camfn
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    >>> fast = camfn.compiled(camfn.gradcam, net, "1", backend="eager")
    >>> x = torch.randn(2, 3, 8, 8)
    >>> maps = fast(camfn.params(net), x, 1)
    >>> bool(torch.allclose(maps, camfn.gradcam(net, camfn.params(net), x, "1", 1), atol=1e-6))
    True
"""

from __future__ import annotations

import contextlib
import gc
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .driver import Maps
from .errors import InputError, OptionError, TargetError
from .layer_names import Layer
from .noise import pinned
from .runtime import FORWARD_AD
from .targets import Target
from .tracing import Params

__all__ = ["Compiled", "compiled", "graph_breaks"]

Method = Callable[..., Maps]


def _fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own: dynamo keeps graphs (and its recompile limit) per code object."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


@contextlib.contextmanager
def _steady() -> Iterator[None]:
    """No garbage collection while dynamo traces and builds guards.

    Dynamo guards on the trace cache (a ``WeakKeyDictionary``) by position; a collection in the middle of
    a compile can drop a dead model's entry and leave a guard pointing past the end (``IndexError``).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _takes_target(method: Method) -> bool:
    """Whether ``method`` takes a ``target`` (every map method does; :func:`camfn.methods.factorization.dff` not)."""
    import inspect

    try:
        return "target" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return True


def _signature(x: Tensor, target: Target) -> tuple:
    shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
    return tuple(x.shape), x.dtype, x.device, shape


class Compiled:
    """``method`` bound to ``model``, ``layer`` and ``options``, compiled: call it as ``(params, x, target)``.

    Attributes: ``method``, ``model``, ``layer``, ``options``, ``function`` (the ``torch.compile``-d
    function of ``(params, x, target)``).
    """

    def __init__(
        self,
        method: Method,
        model: nn.Module,
        layer: Layer | Sequence[Layer] | None,
        options: dict[str, Any],
        compile_options: dict[str, Any],
    ) -> None:
        if options.get("aug_smooth"):
            raise OptionError("aug_smooth is not supported by camfn.compiled; average compiled maps yourself")
        self.method, self.model, self.layer, self.options = method, model, layer, options
        self._warm: set[tuple] = set()
        self._noise: dict[tuple, Tensor] = {}

        takes_target = _takes_target(method)

        def call(params: Params, x: Tensor, target: Target) -> Maps:
            if takes_target:
                return method(model, params, x, layer, target, **options)
            if target is not None:
                raise TargetError(f"{method.__name__} takes no target: call the compiled function as f(params, x)")
            return method(model, params, x, layer, **options)  # e.g. dff: concepts, not one map per target

        self.eager = call
        self.function = torch.compile(_fresh(call), fullgraph=True, dynamic=False, **compile_options)

    def warm(self, params: Params, x: Tensor, target: Target = None) -> None:
        """Fill the trace, shape and noise caches for inputs like ``x`` (one eager call; no-op when done)."""
        key = _signature(x, target)
        if key in self._warm:
            return
        with pinned(self._noise), torch.no_grad():
            self.eager(params, x, target)
        self._warm.add(key)

    def __call__(self, params: Params, x: Tensor, target: Target = None) -> Maps:
        """The compiled method's maps for ``(params, x, target)``; equal to the eager method's."""
        self.warm(params, x, target)
        spec = getattr(self.method, "spec", None)
        serial = FORWARD_AD if getattr(spec, "forward_ad", False) else contextlib.nullcontext()
        with serial, pinned(self._noise), _steady():
            return self.function(params, x, target)


def compiled(
    method: Method,
    model: nn.Module,
    layer: Layer | Sequence[Layer] | None = None,
    *,
    backend: str = "inductor",
    mode: str | None = None,
    **options: Any,
) -> Compiled:
    """``method`` compiled for ``model`` and ``layer``: a callable ``(params, x, target=None) -> maps``.

    ``backend`` and ``mode`` go to ``torch.compile`` (``"eager"`` / ``"aot_eager"`` compile in seconds and
    check the graph; ``"inductor"`` generates fused kernels, minutes for a ResNet on a CPU). ``options``
    are the method's own keyword options (``relu``, ``size``, ``chunk_size``, ``n``, ``seed`` ...).
    Gradients flow through the compiled call to ``params`` (differentiable maps) as through the eager one.
    See the module docstring for how the impure steps stay outside the compiled graph.
    """
    if not callable(method) or isinstance(method, nn.Module):
        raise InputError(f"method must be a camfn method such as camfn.gradcam, got {type(method).__name__}; pass one")
    return Compiled(method, model, layer, options, {"backend": backend, "mode": mode})


def graph_breaks(
    method: Method,
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Layer | Sequence[Layer] | None = None,
    target: Target = None,
    **options: Any,
) -> int:
    """Number of graph breaks dynamo finds in ``method`` (after the eager warm-up), by ``torch._dynamo.explain``.

    Example:
        >>> import torch, camfn
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
        >>> camfn.graph_breaks(camfn.gradcam, net, camfn.params(net), torch.randn(1, 3, 8, 8), "1", 0)
        0
    """
    fast = compiled(method, model, layer, backend="eager", **options)
    fast.warm(params, x, target)
    with pinned(fast._noise), _steady():
        report = torch._dynamo.explain(_fresh(fast.eager))(params, x, target)
    return int(report.graph_break_count)
