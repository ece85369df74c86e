r"""The one method driver and the method registry.

A method is one small function on a :class:`Layer` view, declared with :func:`method`:

.. code-block:: python

    @method(needs="gradients")
    def gradcam(at: Layer) -> Tensor:
        return at.g.mean(at.space, keepdim=True) * at.a  # w_k A_k

It returns the per-channel contributions ``C`` ``(B, T, K, *spatial)`` of one layer; the driver does the
rest, the same way for every method:

1. validate the options (:func:`camfn.options.validate`: the shared ones and the method's extras);
2. check ``x`` and the model; trace it (cached, never stale: :func:`camfn.tracing.traced`);
3. resolve the layers and check they give spatial maps (after the ``layout``);
4. resolve the target through :mod:`camfn.targets` (one policy);
5. one forward: activations ``A``, and when the method needs them the gradients ``G = dS/dA``
   (``needs="gradients"``), the clean scores (``"forward"``), or the graph cut after the layer (``"cut"``);
6. the method's function, per layer;
7. reduce ``sum_k C_k`` (or the first principal component with ``eigen_smooth``);
8. post-process: ReLU, resize, min-max (:func:`camfn.postprocess.finish`).

``aug_smooth`` wraps the whole call. The decorator builds the public function
``method(model, params, x, layer=None, target=None, **options) -> maps`` and registers it in
:data:`REGISTRY` (``camfn.METHODS``).

Example:
    >>> import torch, camfn
    >>> from camfn.driver import REGISTRY
    >>> "gradcam" in REGISTRY and REGISTRY["gradcam"] is camfn.gradcam
    True
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vmap

from .adapters import Defaults, defaults
from .checks import check_input, check_params
from .chunks import chunked, copies_per_forward
from .errors import InputError, LayerError, OptionError, TargetError
from .inference import bind
from .layer_names import Layer as LayerName
from .layer_names import layer_names, resolve_layers, spatial, token_layer
from .layout import layout_fn, patch_gradient_vanishes, prefix_of, pull_back
from .options import Option, validate
from .postprocess import finish, first_component, normalize
from .pullback import activations, channels_last, gradients
from .rewrite import HeadTail, cut_after, inject
from .runtime import concrete, in_transform
from .targets import Anchored, Output, Target, fixed, is_callable, is_per_sample, pick, resolve, scores
from .targets import classes as target_classes
from .tracing import Model, Params, Traced, traced

__all__ = ["REGISTRY", "Layer", "Maps", "Spec", "explain", "method", "weighted"]

Maps = Tensor | list[Tensor]
Layers = LayerName | Sequence[LayerName] | None
Needs = Literal["activations", "forward", "gradients", "cut", "composite"]

REGISTRY: dict[str, Callable[..., Maps]] = {}
"""Every registered method by name (``camfn.METHODS``), in registration order."""


@dataclass(frozen=True)
class Spec:
    """A method: its name, its function on a :class:`Layer`, what it needs, its extra options."""

    name: str
    fn: Callable[[Layer], Tensor]
    needs: Needs
    options: Mapping[str, Option]
    eigen: bool = False  # always reduce by the first principal component (eigencam, eigengradcam)
    fixed_target: bool = True  # target=None is the clean top-1 class (False: the method ignores targets)
    requires: str | None = None  # what the model must have beyond a spatial layer ("attention": a transformer)
    forward_ad: bool = False  # uses torch.func.jvp: calls are serialised by camfn.runtime.FORWARD_AD


# ---------------------------------------------------------------------------------------- per call
@dataclass
class _Call:
    """What one call shares across its layers."""

    spec: Spec
    model: Model
    params: Params
    x: Tensor
    trace: Traced
    opts: dict[str, Any]
    target: Target = None
    score: Callable[[Any], Tensor] | None = None
    output: Any = None
    network: Callable[[Tensor], Any] | None = None

    @property
    def target_is_callable(self) -> bool:
        return is_callable(self.target)

    def classes(self) -> Tensor:
        """The target as class indices ``(B, T)`` (``None``: the clean top-1 class), via :mod:`camfn.targets`."""
        logits = pick(self.output, self.opts["output"])
        resolved = resolve(self.target, self.output, self.opts["output"])
        index, _ = target_classes(resolved, self.x.shape[0], num_classes(self.trace, self.x, self.opts["output"]))
        return index(logits)

    def forward_network(self) -> Callable[[Tensor], Any]:
        """The whole network on perturbed inputs (BatchNorm folded, fused and packed on the CPU)."""
        if self.network is None:
            self.network = bind(self.trace, self.params, self.x)
        return self.network


@dataclass
class Layer:
    """One layer of one call, as a method sees it.

    ``a``: the activation ``(B, 1, K, *spatial)`` (channels first, after the ``layout``); ``g``: the
    gradients ``(B, T, K, *spatial)`` (``needs="gradients"``); ``y``: the clean scores ``(B, T)``
    (``"forward"`` and ``"cut"``); ``x`` the input; ``options`` the validated options.
    """

    a: Tensor
    g: Tensor | None
    y: Tensor | None
    x: Tensor
    options: dict[str, Any]
    node: str
    call: _Call
    raw: Tensor  # the activation in the layer's own frame
    to_maps: Callable[[Tensor], Tensor]
    cut: HeadTail | None = None
    extras: tuple = ()
    _fast: Params | None = field(default=None, repr=False)

    @property
    def space(self) -> tuple[int, ...]:
        """Spatial axes of ``(B, T, K, *spatial)`` tensors."""
        return tuple(range(3, self.a.ndim))

    @property
    def name(self) -> str:
        return self.call.trace.qualname[self.node]

    def copies(self, item_shape: Sequence[int]) -> int | None:
        """Perturbed copies per forward for items of ``item_shape`` (the ``chunk_size`` option)."""
        return copies_per_forward(self.options.get("chunk_size", "auto"), item_shape)

    def chunks(self, fn: Callable[[Tensor], Any], n: int, per_forward: int | None, desc: str, **kw: Any) -> Any:
        """``fn`` over ``n`` items, ``per_forward`` of them per call (:func:`camfn.chunks.chunked`)."""
        return chunked(fn, n, per_forward, device=self.x.device, progress=self.options["progress"], desc=desc, **kw)

    def score_inputs(self, inputs: Tensor) -> Tensor:
        """Scores ``(c, B, T)`` of a chunk of perturbed inputs ``(c, B, C, *spatial)`` (the whole network)."""
        return _score_chunk(self.call.forward_network(), self.call.score, inputs, flat=self.call.trace.batch is None)

    def score_ablated(self, maps: Tensor) -> Tensor:
        """Scores ``(c, B, T)`` with the layer's activation replaced by ``maps`` ``(c, B, K, *spatial)``
        (in the map frame); only the part of the network after the layer runs."""
        if self.cut is None:
            raise OptionError(f"{self.call.spec.name}: score_ablated needs needs='cut'")
        if self._fast is None:
            self._fast = channels_last(self.call.params)
        if self.options["layout"] is not None:
            like = self.raw.unsqueeze(0).expand(maps.shape[0], *self.raw.shape).flatten(0, 1)
            base = self.a.squeeze(1).unsqueeze(0)
            back = pull_back(self.to_maps, like, (maps - base).flatten(0, 1)).unflatten(0, maps.shape[:2])
            maps = self.raw.unsqueeze(0) + back
        fast, tail = self._fast, self.cut.tail
        flat = self.call.trace.batch is None
        return _score_chunk(lambda *args: tail(fast, *args), self.call.score, maps, *self.extras, flat=flat)

    def gradients_at(self, inputs: Tensor) -> Tensor:
        """``dS/dA`` at this layer for a chunk of inputs ``(c, B, C, *spatial)`` with the call's target:
        ``(c, B, T, K, *spatial)`` in the map frame (one batched pass for tensor outputs)."""
        call, b = self.call, self.x.shape[0]
        injected = inject(call.trace, [self.node])
        info = call.trace.node_shapes(self.x)["output"]
        plain = isinstance(info, tuple) and len(info) == 2 and isinstance(info[0], torch.Size)  # a tensor output
        if plain and call.trace.batch is None:  # one batched pass (a graph fixed to B samples runs per copy)

            def flat_score(out: Tensor) -> Tensor:
                return vmap(call.score)(out.unflatten(0, (-1, b))).flatten(0, 1)

            (g,) = gradients(injected, call.params, inputs.flatten(0, 1), flat_score).grads
            g = g.unflatten(0, inputs.shape[:2])
        else:
            g = vmap(lambda i: gradients(injected, call.params, i, call.score).grads[0])(inputs)
        return _per_target(self.to_maps, g.flatten(0, 1)).unflatten(0, g.shape[:2])


def _as_bt(s: Tensor, batch: int) -> Tensor:
    return s.reshape(batch, -1)


def _score_chunk(run: Callable[..., Any], score: Any, inputs: Tensor, *extras: Any, flat: bool = True) -> Tensor:
    """Scores ``(c, B, T)`` of a chunk of perturbed inputs ``(c, B, ...)``.

    The network runs once on the flattened ``c * B`` batch (``vmap`` over the chunk costs ~60% more on
    CPU); tensor ``extras`` are repeated along. Non-tensor extras (sizes read before a cut) pin the batch
    size, so those chunks run under ``vmap`` instead (as do graphs fixed to one batch size: ``flat=False``).
    Only the cheap score selection is ``vmap``-ed.
    """
    c, b = inputs.shape[:2]
    if flat and all(isinstance(e, Tensor) and e.ndim and e.shape[0] == b for e in extras):
        flat = [e.unsqueeze(0).expand(c, *e.shape).flatten(0, 1) for e in extras]
        batch = inputs.flatten(0, 1)
        if batch.ndim == 4 and not in_transform():  # see channels_last
            batch = batch.contiguous(memory_format=torch.channels_last)
        out = run(batch, *flat)
        if isinstance(out, Tensor):
            return vmap(lambda o: _as_bt(score(o), b))(out.unflatten(0, (c, b)))
        return torch.stack([_as_bt(score(o), b) for o in _split_output(out, c, b)])
    return vmap(lambda i: _as_bt(score(run(i, *extras)), b))(inputs)


def _split_output(out: Any, c: int, b: int) -> list[Any]:
    """A flattened ``c * B`` batch's output (tensors, tuples, dicts, lists of per-sample dicts) as ``c`` outputs."""
    if isinstance(out, list | tuple) and len(out) == c * b and not all(isinstance(o, Tensor) for o in out):
        return [out[i * b : (i + 1) * b] for i in range(c)]  # per-sample items (detection outputs)

    def part(i: int) -> Callable[[Any], Any]:
        return lambda t: t.unflatten(0, (c, b))[i] if isinstance(t, Tensor) and t.ndim and t.shape[0] == c * b else t

    return [torch.utils._pytree.tree_map(part(i), out) for i in range(c)]


def weighted(w: Tensor, a: Tensor) -> Tensor:
    """Contributions ``w_k A_k`` for weights ``(B, T, K)`` (or already broadcastable) and ``a`` ``(B, 1, K, ...)``."""
    if w.ndim == 3:
        w = w.reshape(*w.shape, *([1] * (a.ndim - 3)))
    return w * a


# ------------------------------------------------------------------------------------------ layout
def _identity(t: Tensor) -> Tensor:
    return t


def _layout(trace: Traced, node: str, x: Tensor, opts: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    info = trace.node_shapes(x)[node]
    if opts["layout"] is None or info is None:
        return _identity
    return layout_fn(opts["layout"], tuple(info[0]), tuple(x.shape), trace.prefix_tokens) or _identity


def _per_target(fn: Callable[[Tensor], Tensor], g: Tensor) -> Tensor:
    """Apply a layout ``fn`` to gradients ``(B, T, ...)`` (``T`` folded into the batch and unfolded again)."""
    if fn is _identity:
        return g
    return fn(g.flatten(0, 1)).unflatten(0, g.shape[:2])


def _check_spatial(trace: Traced, node: str, x: Tensor, opts: dict[str, Any]) -> None:
    info = trace.node_shapes(x)[node]
    shape = None if info is None else tuple(info[0])
    name = trace.qualname[node]
    if shape is not None and opts["layout"] is not None:
        shape = tuple(_layout(trace, node, x, opts)(torch.empty(shape, device="meta")).shape)
    if shape is None or len(shape) != x.ndim or not spatial(shape):
        hint = ""
        if shape is not None and len(shape) == 3 and x.ndim == 4 and opts["layout"] is None:
            hint = "; for (B, N, D) tokens of a transformer pass layout='tokens' (or 'vit', 'deit', an einops pattern)"
        elif shape is not None and len(shape) == x.ndim and not spatial(shape):
            last = _last_spatial(trace, x, node)
            hint = f"; its spatial extent is 1 x 1 at this input size: pick {last!r}, or a larger input" if last else ""
        raise LayerError(
            f"layer {name!r} outputs {shape}, not a (B, K, *spatial) map with spatial size above 1 for an input "
            f"of shape {tuple(x.shape)}{hint}; otherwise pick an earlier layer "
            "(camfn.layers(model, x) lists the shapes)"
        )


def _last_spatial(trace: Traced, x: Tensor, before: str) -> str | None:
    shapes, order = trace.node_shapes(x), list(trace.qualname)
    for node in reversed(order[: order.index(before)] if before in order else order):
        info = shapes.get(node)
        if info is not None and len(info[0]) == x.ndim and spatial(tuple(info[0])):
            return trace.qualname[node]
    return None


def _check_patch_gradients(call: _Call, node: str, g: Tensor, fn: Callable[[Tensor], Tensor]) -> None:
    """Raise when a token layer's gradient is zero on every patch token (see :func:`patch_gradient_vanishes`)."""
    shape = tuple(call.trace.node_shapes(call.x)[node][0])
    prefix = prefix_of(fn, shape)
    if not patch_gradient_vanishes(g, prefix):
        return
    better = _token_mixing_layer(call, node, shape, prefix)
    raise LayerError(
        f"layer {call.trace.qualname[node]!r}: the gradient is exactly zero on every patch token (only the "
        f"{prefix} prefix token(s) reach the output), so every map would be flat. Nothing after this layer mixes "
        "tokens: pick a layer before the last attention, "
        + (f"e.g. layer={better!r}" if better else "e.g. the last block's first norm (ln_1 / norm1)")
    )


def _token_mixing_layer(call: _Call, node: str, shape: tuple[int, ...], prefix: int) -> str | None:
    """The latest norm layer before ``node`` with the same token shape whose patch gradient is nonzero."""
    trace = call.trace
    shapes, order = trace.node_shapes(call.x), list(trace.qualname)
    graph_nodes = {n.name: n for n in trace.module.graph.nodes}
    candidates = []
    for name in reversed(order[: order.index(node)]):
        n, info = graph_nodes[name], shapes.get(name)
        if info is None or tuple(info[0]) != shape:
            continue
        kind = type(trace.module.get_submodule(n.target)).__name__ if n.op == "call_module" else str(n.target)
        if "norm" in kind.lower() or "norm" in trace.qualname[name].lower():
            candidates.append(name)
        if len(candidates) == 4:
            break
    if not candidates:
        return None
    result = gradients(inject(trace, candidates), call.params, call.x, call.score)
    for name, g in zip(candidates, result.grads, strict=True):
        if not bool((g[:, :, prefix:] == 0).all()):
            return trace.qualname[name]
    return None


def num_classes(trace: Traced, x: Tensor, output: Output = None) -> int | None:
    """Number of outputs when the model (or the ``output`` part of it) is ``(B, C)`` logits, else ``None``."""
    info = trace.node_shapes(x)["output"]
    if output is not None:
        try:
            info = pick(info, output) if isinstance(output, str | int) else None
        except Exception:  # an attribute of an object shape propagation did not keep: checked at run time
            return None
    if isinstance(info, tuple) and len(info) == 2 and isinstance(info[0], torch.Size) and len(info[0]) == 2:
        return int(info[0][1])
    return None


# ------------------------------------------------------------------------------------------ driver
def explain(spec: Spec, model: Model, params: Params, x: Tensor, layer: Layers, target: Target, options: dict) -> Maps:
    """Run method ``spec``: the eight steps of the module docstring."""
    opts = validate(options, spec.options)
    x = check_input(x)
    bad_input = _nonfinite_samples(x)
    if bad_input and opts["nonfinite"] == "raise":
        raise InputError(
            f"x has NaN or Inf values in sample(s) {bad_input[:10]}; a map of them would be meaningless. Clean the "
            "input (torch.nan_to_num, or drop those samples), or pass nonfinite='nan' to get NaN maps for them"
        )
    if not isinstance(model, nn.Module) and not callable(model):
        raise_model(model)
    trace = trace_of(model, params, x, opts)
    check_params(params, trace, x)
    layer, target, hint = _adapted(model, params, trace, x, layer, target, opts, spec)
    if opts["aug_smooth"]:
        return _augmented(spec, model, params, x, layer, target, opts, trace)
    if layer is None and opts["layout"] is not None:
        tokens = token_layer(trace, x)
        raise LayerError(
            f"layout={opts['layout']!r} needs an explicit layer (the default layer is chosen for (B, K, h, w) "
            "maps); for a ViT pass the last block's first norm, "
            + (f"here layer={tokens!r}" if tokens else "e.g. layer='encoder.layers.encoder_layer_<L-1>.ln_1'")
        )
    trace, nodes, single = _resolve(trace, model, params, layer, x, opts)
    hinted = hint.layer is not None and layer == hint.layer  # the adapter's own layer: its layout (NHWC) fits
    all_tokens = all(_tokens_layer(trace, n, x) for n in nodes)
    if opts["layout"] is None and hint.layout is not None and (hinted or all_tokens):
        opts["layout"] = hint.layout
    for node in nodes:
        _check_spatial(trace, node, x, opts)
    size = opts["size"]
    if isinstance(size, tuple) and len(size) != x.ndim - 2:
        raise OptionError(
            f"size={size}: the maps have {x.ndim - 2} spatial dimension(s); pass {x.ndim - 2} sizes, 'input' or None"
        )
    call = _Call(spec, model, params, x, trace, opts, target)
    fns = [_layout(trace, n, x, opts) for n in nodes]
    n_classes = num_classes(trace, x, opts["output"])
    views: list[Layer] = []
    squeeze = True
    if spec.needs == "gradients":
        call.score = scores(target, x.shape[0], n_classes, opts["output"])
        result = gradients(inject(trace, nodes), params, x, call.score)
        squeeze, call.output = result.squeeze, result.output
        if isinstance(target, Anchored):  # later scores of other inputs (noisy copies) use the clean anchor
            call.score = fixed(target, call.output, x.shape[0], n_classes, opts["output"])
        _check_scores(call, result.scores, bad_input, opts)
        if call.target_is_callable and concrete(x):
            _check_dependence(call, result.grads)
        for node, fn, a, g in zip(nodes, fns, result.acts, result.grads, strict=True):
            if opts["layout"] is not None and concrete(x):
                _check_patch_gradients(call, node, g, fn)
            views.append(Layer(fn(a).unsqueeze(1), _per_target(fn, g), result.scores, x, opts, node, call, a, fn))
    elif spec.needs == "activations":
        _, acts = activations(inject(trace, nodes, with_output=False), params, x)
        views = [
            Layer(fn(a).unsqueeze(1), None, None, x, opts, n, call, a, fn)
            for n, fn, a in zip(nodes, fns, acts, strict=True)
        ]
    else:
        if spec.needs == "cut":
            cuts = [cut_after(trace, n) for n in nodes]
            heads = [c.head(params, x) for c in cuts]
            call.output = cuts[0].tail(params, heads[0][0], *heads[0][1])
            acts = [h[0] for h in heads]
        else:
            call.output, acts = activations(inject(trace, nodes), params, x)
        call.score = fixed(target, call.output, x.shape[0], n_classes, opts["output"])
        y = call.score(call.output)
        squeeze = y.ndim == 1
        y = _as_bt(y, x.shape[0])
        _check_scores(call, y, bad_input, opts)
        for i, (node, fn, a) in enumerate(zip(nodes, fns, acts, strict=True)):
            view = Layer(fn(a).unsqueeze(1), None, y, x, opts, node, call, a, fn)
            if spec.needs == "cut":
                view.cut, view.extras = cuts[i], heads[i][1]
            views.append(view)
    raw = [_reduce(spec.fn(view), spec.eigen or opts["eigen_smooth"]) for view in views]
    maps = [finish(m, x, relu=opts["relu"], size=opts["size"], normalize=opts["normalize"]) for m in raw]
    maps = [_check_maps(call, m, bad_input, opts) for m in maps]
    if squeeze:
        maps = [m.squeeze(1) for m in maps]
    return maps[0] if single else maps


def _adapted(
    model: Model, params: Params, trace: Traced, x: Tensor, layer: Layers, target: Target, opts: dict, spec: Spec
) -> tuple[Layers, Target, Defaults]:
    """``layer``, ``target`` and ``opts["output"]`` filled from the model family's adapter where unset."""
    hint = defaults(model, params, trace, x) if isinstance(model, nn.Module) else Defaults()
    if opts["output"] is None and hint.output is not None:
        opts["output"] = hint.output
    if target is None and hint.target is not None and spec.fixed_target:
        target = hint.target
    elif hint.classes is not None and spec.fixed_target and _class_target(target):
        target = hint.classes(target)  # a detector's class c: class c's best query
    if layer is None and hint.layer is not None:
        layer = hint.layer
    return layer, target, hint


def _class_target(target: Target) -> bool:
    """An int or an integer tensor of class indices."""
    if isinstance(target, Tensor):
        return not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
    return isinstance(target, int) and not isinstance(target, bool)


def _tokens_layer(trace: Traced, node: str, x: Tensor) -> bool:
    info = trace.node_shapes(x)[node]
    return info is not None and len(info[0]) == 3 and x.ndim == 4


def trace_of(model: Model, params: Params, x: Tensor, opts: Mapping[str, Any]) -> Traced:
    """The trace a call runs on, chosen by the validated shared options (``tracer``, ``hooks``, ...)."""
    return traced(
        model,
        params,
        x,
        tracer=opts["tracer"],
        hooks=opts["hooks"],
        tracer_options=opts["tracer_options"],
        model_kwargs=opts["model_kwargs"],
    )


def _resolve(
    trace: Traced, model: Model, params: Params, layer: Layers, x: Tensor, opts: dict
) -> tuple[Traced, list[str], bool]:
    """Layer names to nodes; under ``tracer="auto"`` a module path that torch.fx keeps inside a leaf module
    (torchvision.ops blocks) is reached by tracing with torch.export instead."""
    try:
        nodes, single = resolve_layers(trace, model, layer, x)
    except LayerError:
        names = layer_names(model, layer) or []
        paths = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
        if opts["tracer"] != "auto" or trace.tracer != "fx" or not names or not all(n in paths for n in names):
            raise
        trace = trace_of(model, params, x, {**opts, "tracer": "export"})
        nodes, single = resolve_layers(trace, model, layer, x)
    return trace, nodes, single


# ---------------------------------------------------------------------------------------- non-finite
def _nonfinite_samples(t: Tensor) -> list[int]:
    """Indices of the samples of ``t`` with a NaN or Inf (empty where values cannot be read)."""
    if not concrete(t) or not (t.is_floating_point() or t.is_complex()):
        return []
    if t.is_floating_point() and math.isfinite(float(t.detach().sum())):  # a NaN or Inf makes the sum one
        return []
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
    return bad.nonzero().flatten().tolist() if bool(bad.any()) else []


def _diagnosis(call: _Call) -> str:
    """Why a model gives non-finite values: non-finite parameters, negative BatchNorm variances."""
    found = []
    for key, value in call.params.items():
        if isinstance(value, Tensor) and value.is_floating_point() and concrete(value):
            if not bool(torch.isfinite(value).all()):
                found.append(f"params[{key!r}] has NaN or Inf")
            elif key.endswith("running_var") and bool((value < 0).any()):
                found.append(f"params[{key!r}] has negative variances")
        if len(found) == 3:
            break
    if found:
        return "; ".join(found) + ". Fix or reload those parameters"
    return "the model's own computation overflows or divides by zero for them; check the input's scale and the model"


def _check_scores(call: _Call, y: Tensor, bad_input: list[int], opts: dict) -> None:
    bad = [i for i in _nonfinite_samples(y) if i not in bad_input]
    if bad and opts["nonfinite"] == "raise":
        raise InputError(
            f"the target scores are NaN or Inf for sample(s) {bad[:10]} (x itself is finite): {_diagnosis(call)}. "
            "Or pass nonfinite='nan' to get NaN maps for such samples"
        )


def _check_maps(call: _Call, maps: Tensor, bad_input: list[int], opts: dict) -> Tensor:
    bad = _nonfinite_samples(maps)
    if bad and opts["nonfinite"] == "raise":
        raise InputError(
            f"the maps of sample(s) {bad[:10]} are NaN or Inf although the scores are finite: {_diagnosis(call)}. "
            "Or pass nonfinite='nan' to get NaN maps for such samples"
        )
    rows = sorted(set(bad) | set(bad_input))
    if rows and opts["nonfinite"] == "nan":
        maps = maps.clone()
        maps[rows] = float("nan")
    return maps


def _check_dependence(call: _Call, grads: tuple[Tensor, ...]) -> None:
    """A callable target whose score does not depend on the layer (detached, or computed from a copy)."""
    for g in grads:
        if not concrete(g):
            return
        flat = (g.reshape(g.shape[0], -1) == 0).all(1)
        if bool(flat.all()):
            raise TargetError(
                "the target callable's score does not depend on the layer: every gradient is exactly zero. Is it "
                "detached (.detach(), .item(), numpy) or built from a copy of the output? Return a tensor "
                "computed from the output, e.g. lambda out: out[:, c]"
            )


def raise_model(model: object) -> None:
    raise InputError(
        f"model must be an nn.Module or a function model_fn(params, x), got {type(model).__name__}; pass one of these"
    )


def _reduce(contributions: Tensor, eigen: bool) -> Tensor:
    """Raw maps from contributions ``(B, T, K, *spatial)``: ``sum_k C_k``, or the first principal component."""
    if eigen:
        return first_component(contributions, ndim=contributions.ndim - 3)
    return contributions.sum(2)


# -------------------------------------------------------------------------------------- aug_smooth
FACTORS = (1.0, 1.1, 0.9)
VARIANTS = tuple((flip, factor) for flip in (False, True) for factor in FACTORS)


def _augmented(
    spec: Spec, model: Model, params: Params, x: Tensor, layer: Layers, target: Target, opts: dict, trace: Traced
) -> Maps:
    """``aug_smooth`` on a driver method (see :func:`augmented`)."""
    top1 = (lambda: resolve(None, trace.program()(params, x), opts["output"])) if spec.fixed_target else None
    if isinstance(target, Anchored):  # every view is scored against the clean input's anchor
        with torch.no_grad():
            target = resolve(target, trace.program()(params, x), opts["output"])
    inner = {**opts, "aug_smooth": False}
    return augmented(
        lambda xs, t: explain(spec, model, params, xs, layer, t, inner), x, target, top1, opts["normalize"]
    )


def augmented(
    run: Callable[[Tensor, Target], Maps],
    x: Tensor,
    target: Target,
    top1: Callable[[], Target] | None,
    normalize_maps: bool = True,
) -> Maps:
    r"""``aug_smooth``: the maps averaged over horizontal flips x input multipliers {1.0, 1.1, 0.9}.

    .. math:: \bar L = \operatorname{normalize}\Big(\frac{1}{6} \sum_{f} \sum_{h \in \{\mathrm{id},
              \mathrm{flip}\}} h^{-1}\big(L(h(f\,x))\big)\Big)

    ``run(xs, target)`` explains all six variants as one batch of ``6B``; the default target is the clean
    input's top-1 class (``top1()``; ``None`` for methods that ignore targets).
    """
    batch, n = x.shape[0], len(VARIANTS)
    if target is None and top1 is not None:
        target = top1()
    if isinstance(target, Tensor):
        target = target.repeat(n, *([1] * (target.ndim - 1)))
    elif is_per_sample(target) and isinstance(target, list | tuple):
        target = list(target) * n  # one list per variant, as grad-cam calls its targets on each
    xs = torch.cat([(x.flip(-1) if flip else x) * factor for flip, factor in VARIANTS])
    maps = run(xs, target)

    def back(m: Tensor) -> Tensor:
        m = m.reshape(n, batch, *m.shape[1:])
        m = torch.stack([m[i].flip(-1) if flip else m[i] for i, (flip, _) in enumerate(VARIANTS)]).mean(0)
        return normalize(m, x.ndim - 2) if normalize_maps else m

    return [back(m) for m in maps] if isinstance(maps, list) else back(maps)


# ---------------------------------------------------------------------------------------- registry
def signature(public: Callable[..., Maps], spec: Spec) -> inspect.Signature:
    """The public signature, with the method's extra options as keyword-only parameters and defaults."""
    base = inspect.signature(public)
    params = [p for p in base.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extras = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=o.default) for k, o in spec.options.items()]
    return base.replace(parameters=[*params, *extras, base.parameters["opts"].replace(name="options")])


def method(
    *,
    needs: Needs,
    options: Mapping[str, Option] | None = None,
    eigen: bool = False,
    fixed_target: bool = True,
    name: str | None = None,
    forward_ad: bool = False,
) -> Callable[[Callable[[Layer], Tensor]], Callable[..., Maps]]:
    """Declare a method: ``fn(layer: Layer) -> contributions (B, T, K, *spatial)``, registered by name.

    ``needs``: ``"activations"`` (only the network up to the layer runs), ``"forward"`` (one clean forward:
    activations and scores), ``"gradients"`` (plus ``G = dS/dA`` by one vjp) or ``"cut"`` (the graph cut
    after the layer, for tail-only reruns). ``options``: the method's extra keyword options with defaults
    and validators. Returns the public function ``(model, params, x, layer=None, target=None, **options)``.
    """

    def register(fn: Callable[[Layer], Tensor]) -> Callable[..., Maps]:
        spec = Spec(name or fn.__name__, fn, needs, dict(options or {}), eigen, fixed_target, forward_ad=forward_ad)

        def public(
            model: Model, params: Params, x: Tensor, layer: Layers = None, target: Target = None, **opts: Any
        ) -> Maps:
            return explain(spec, model, params, x, layer, target, opts)

        public.__name__ = public.__qualname__ = spec.name
        public.__module__, public.__doc__ = fn.__module__, fn.__doc__
        public.spec = spec  # type: ignore[attr-defined]
        public.__signature__ = signature(public, spec)  # type: ignore[attr-defined]
        REGISTRY[spec.name] = public
        return public

    return register
