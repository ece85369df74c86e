r"""Methods built on a base method: Finer-CAM, RefineCAM and SESS.

Each takes a ``base`` option (a name in :data:`camfn.METHODS`, or the method itself) and calls that
method's public function, so every base works, with its own options passed through: the public function
is ``method(model, params, x, layer=None, target=None, *, base=..., <own options>, **base_options)``.
The shared options ``relu``, ``size`` and ``normalize`` apply to the composite's final map.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import defaults
from ..driver import REGISTRY, Maps, Spec, augmented, signature, trace_of
from ..errors import InputError, OptionError, TargetError
from ..options import Option, boolean, choice, finite, nonnegative, positive_int, validate
from ..postprocess import finish, largest, resize
from ..targets import Target, _logits, classes, contrastive, is_callable, pick, resolve, scores
from ..tracing import Model, Params

__all__ = ["finercam", "refinecam", "sess"]

Own = dict[str, Any]
FINISH = ("relu", "size", "normalize")


def _base(value: Any, name: str) -> Callable[..., Maps]:
    """Validator of ``base``: a method name in ``camfn.METHODS`` or a registered method."""
    if isinstance(value, str) and value in REGISTRY and value not in COMPOSITE:
        return REGISTRY[value]
    if callable(value) and any(value is m for m in REGISTRY.values()) and value.__name__ not in COMPOSITE:
        return value
    names = [n for n in REGISTRY if n not in COMPOSITE]
    raise OptionError(f"{name}={value!r}: use the name of a map method in camfn.METHODS, one of {names}")


def _optional_int(value: Any, name: str) -> int | None:
    return None if value is None else positive_int(value, name)


def _optional_alpha(value: Any, name: str) -> float | None:
    return None if value is None else finite(value, name)


def _ratio(value: Any, name: str) -> float:
    value = nonnegative(value, name)
    if value >= 1:
        raise OptionError(f"{name}={value!r}: use a fraction in [0, 1) of the lowest-scoring patches to drop")
    return value


def _scales(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (
        isinstance(value, Sequence)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value)
    ):
        return tuple(value)
    raise OptionError(f"{name}={value!r}: use None (the default scales) or a list of positive ints")


COMPOSITE: dict[str, Mapping[str, Option]] = {}


def composite(
    options: Mapping[str, Option], requires: str | None = None
) -> Callable[[Callable[..., Maps]], Callable[..., Maps]]:
    """Register ``fn(model, params, x, layer, target, own, rest) -> maps`` as a method in ``camfn.METHODS``.

    ``own`` holds the validated options of ``options`` (defaults filled in), ``rest`` the other keyword
    options, passed on to the base method (which validates them).
    """

    def register(fn: Callable[..., Maps]) -> Callable[..., Maps]:
        COMPOSITE[fn.__name__] = options

        def public(
            model: Model, params: Params, x: Tensor, layer: Any = None, target: Target = None, **opts: Any
        ) -> Maps:
            own = {k: options[k].check(opts.pop(k), k) if k in opts else options[k].default for k in options}
            if isinstance(own.get("base"), str):
                own["base"] = _base(own["base"], "base")
            if opts.get("aug_smooth"):  # around the whole method, as for every other method
                inner = {**opts, "aug_smooth": False}
                trace, shared = trace_with(model, params, x, {k: v for k, v in inner.items() if k in TRACING})

                def top1() -> Target:
                    return resolve(None, trace.program()(params, x), shared["output"])

                run = lambda xs, t: fn(model, params, xs, layer, t, own, dict(inner))  # noqa: E731
                return augmented(run, x, target, top1, inner.get("normalize", True))
            return fn(model, params, x, layer, target, own, opts)

        public.__name__ = public.__qualname__ = fn.__name__
        public.__module__, public.__doc__ = fn.__module__, fn.__doc__
        public.spec = Spec(fn.__name__, fn, "composite", dict(options), requires=requires)  # type: ignore[attr-defined]
        public.__signature__ = signature(public, public.spec)  # type: ignore[attr-defined]
        REGISTRY[fn.__name__] = public
        return public

    return register


def _finish_options(rest: dict[str, Any]) -> dict[str, Any]:
    """The validated ``relu``/``size``/``normalize`` of ``rest`` (removed from it): they apply to the final map."""
    given = {k: rest.pop(k) for k in FINISH if k in rest}
    checked = validate(given, {})
    return {k: checked[k] for k in FINISH}


TRACING = ("tracer", "hooks", "tracer_options", "model_kwargs", "output")


def trace_with(model: Model, params: Params, x: Tensor, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The model traced with the (validated) shared ``options``, and those options with defaults filled in."""
    shared = validate(options, {})
    trace = trace_of(model, params, x, shared)
    if shared["output"] is None and isinstance(model, nn.Module):  # the model family's output= (HF: logits)
        shared["output"] = defaults(model, params, trace, x).output
    return trace, shared


# ----------------------------------------------------------------------------------------- Finer-CAM
def _check_finer_target(target: Target) -> None:
    if callable(target) and not isinstance(target, Tensor):
        raise TargetError(
            "finercam contrasts a class with its nearest classes: pass target=None, an int or a (B,) / (B, T) "
            "tensor of class indices, not a callable (for a custom contrast use camfn.targets.contrastive)"
        )


def finer_classes(target: Target, clean: Tensor, k: int) -> tuple[Tensor, Tensor, bool]:
    """Finer-CAM's classes on the clean logits ``(B, C)``: the main classes ``(B, T)``, the ``k`` classes
    with the closest logits to each ``(B, T, k)`` (the main class excluded, ``k`` capped at ``C - 1``), and
    whether the target gives one map per sample."""
    _check_finer_target(target)
    batch, n = clean.shape
    if n < 2:
        raise TargetError("finercam needs a model with at least 2 classes to compare with")
    index, squeeze = classes(target, batch, n)
    main = index(clean)  # (B, T)
    y = clean.detach()
    distance = (y.unsqueeze(1) - y.gather(1, main).unsqueeze(2)).abs()  # (B, T, C)
    distance = distance.scatter(2, main.unsqueeze(2), torch.inf)  # never compare a class with itself
    return main, distance.topk(min(k, n - 1), 2, largest=False).indices, squeeze


def finer_score(main: Tensor, refs: Tensor, squeeze: bool, mode: str, alpha: float) -> Callable[[Tensor], Tensor]:
    """The Finer-CAM score ``output -> (B,)`` or ``(B, T)`` for fixed classes (see :func:`finercam`).

    An output batch that is a multiple of the classes' batch (``aug_smooth``'s six views) repeats them."""

    def score(output: Tensor) -> Tensor:
        logits = _logits(output, "finercam")
        reps = logits.shape[0] // main.shape[0]
        m, r = (main, refs) if reps == 1 else (main.repeat(reps, 1), refs.repeat(reps, 1, 1))
        if mode == "torchcam":
            s = torch.stack([contrastive(m[:, t], r[:, t], gamma=alpha)(logits) for t in range(m.shape[1])], 1)
        else:
            y_main = logits.gather(1, m).unsqueeze(2)
            y_refs = logits.unsqueeze(1).expand(-1, m.shape[1], -1).gather(2, r)
            w = logits.softmax(1).unsqueeze(1).expand(-1, m.shape[1], -1).gather(2, r)
            s = (w * (y_main - alpha * y_refs)).sum(2) / (w.sum(2) + 1e-9)
        return s.squeeze(1) if squeeze else s

    return score


@composite(
    {
        "base": Option("gradcam", _base),
        "mode": Option("gradcam", choice("gradcam", "torchcam")),
        "alpha": Option(None, _optional_alpha),
        "k": Option(3, positive_int),
    }
)
def finercam(model: Model, params: Params, x: Tensor, layer: Any, target: Target, own: Own, rest: Own) -> Maps:
    r"""Finer-CAM (Zhang et al., CVPR 2025): the base method on the target minus alpha x the closest classes.

    Paper: arXiv 2501.11309.

    With :math:`c` the target class (``None``: top-1), :math:`D` the ``k`` classes whose logits are closest
    to :math:`y_c` (:math:`|y_d - y_c|` smallest, :math:`c` excluded, capped at ``C - 1``; chosen on the
    clean logits, no gradient through the choice), the base method explains the score

    .. math:: \text{mode="gradcam"}: \quad S = \frac{\sum_{d \in D} p_d\,(y_c - \alpha\, y_d)}
              {\sum_{d \in D} p_d + 10^{-9}}, \quad p = \mathrm{softmax}(y), \quad \alpha = 1

    (pytorch-grad-cam's ``FinerCAM`` with ``FinerWeightedTarget``: the 2nd-4th closest logits, weighted by
    their softmax probabilities, the weights differentiated too), or

    .. math:: \text{mode="torchcam"}: \quad S = y_c - \alpha\, \frac{1}{|D|} \sum_{d \in D} y_d, \quad \alpha = 0.6

    (torchcam's ``FinerCAM``: an unweighted mean, :func:`camfn.targets.contrastive`). ``alpha=None`` is the
    mode's default. The classes are chosen on the clean logits: for gradient bases from the logits of the
    base's own forward (one forward in all), for the others from one clean forward first, so perturbation
    bases (``scorecam``...) score every perturbed copy against the same classes. Options: ``base`` (default
    ``"gradcam"``), ``mode``, ``alpha``, ``k`` (default 3); the other options go to the base method.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> x = torch.randn(2, 3, 64, 64)
        >>> camfn.finercam(model, camfn.params(model), x, "layer4", torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2, 2, 64, 64])
    """
    alpha = own["alpha"] if own["alpha"] is not None else (1.0 if own["mode"] == "gradcam" else 0.6)
    base, mode, k = own["base"], own["mode"], own["k"]
    if base.spec.needs == "gradients" and not rest.get("aug_smooth"):  # one forward: classes from its logits

        def score(output: Tensor) -> Tensor:
            logits = _logits(output, "finercam")
            main, refs, squeeze = finer_classes(target, logits.detach(), k)
            return finer_score(main, refs, squeeze, mode, alpha)(logits)

        _check_finer_target(target)
        return base(model, params, x, layer, score, **rest)
    trace, shared = trace_with(model, params, x, {k: v for k, v in rest.items() if k in TRACING})
    clean = _logits(pick(trace.program()(params, x), shared["output"]), "finercam")
    main, refs, squeeze = finer_classes(target, clean, k)
    return base(model, params, x, layer, finer_score(main, refs, squeeze, mode, alpha), **rest)


# ----------------------------------------------------------------------------------------- RefineCAM
@composite(
    {
        "base": Option("gradcampp", _base),
        "mode": Option("gradcam", choice("gradcam", "torchcam")),
    }
)
def refinecam(model: Model, params: Params, x: Tensor, layer: Any, target: Target, own: Own, rest: Own) -> Maps:
    r"""RefineCAM (arXiv 2605.14641): the element-wise product of the base method's per-layer maps.

    .. math:: R = \operatorname{normalize}\Big(\prod_{l} \operatorname{resize}_s\big(
              \operatorname{normalize}(\max(L_l, 0))\big)\Big)

    A list of layers in, one map out (one layer gives the base map). ``mode="gradcam"`` (pytorch-grad-cam,
    default): the product is taken at the input resolution ``s``; ``mode="torchcam"``: at the largest layer's
    resolution, then resized (torchcam's ``RefineCAM.fuse_cams``; ``size=None`` then keeps that
    resolution). Options: ``base`` (default ``"gradcampp"``, as both references), ``mode``; the other options
    go to the base method.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> camfn.refinecam(model, camfn.params(model), x, ["layer2", "layer3", "layer4"], 5).shape
        torch.Size([1, 64, 64])
    """
    final = _finish_options(rest)
    maps = own["base"](model, params, x, layer, target, size=None, **rest)
    maps = [maps] if isinstance(maps, Tensor) else list(maps)
    ndim = x.ndim - 2
    if own["mode"] == "gradcam":
        size = tuple(x.shape[2:])
    else:
        size = largest(maps, ndim)
    product = torch.stack([resize(m, size) for m in maps]).prod(0)
    return finish(product, x, **final)


# ---------------------------------------------------------------------------------------------- SESS
def window_starts(length: int, step: int, window: int) -> list[int]:
    """Starts of the windows along one axis; the last window is shifted back inside the image."""
    starts = []
    for start in range(0, length, step):
        if start + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(start)
    return starts


def _gaussian_blur(maps: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """OpenCV's ``GaussianBlur(maps, (size, size), sigma)`` with its default reflect-101 border."""
    r = size // 2
    t = torch.arange(size, dtype=maps.dtype, device=maps.device) - r
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    mode = "reflect" if min(flat.shape[-2:]) > r else "replicate"
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode=mode), kernel.reshape(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode=mode), kernel.reshape(1, 1, -1, 1))
    return flat.reshape(maps.shape)


def _patch(out: Any, p: int, n: int) -> Any:
    """Patch ``p`` of every image in the output of ``(B n)`` patches ordered image-major (``out[p::n]``)."""
    return torch.utils._pytree.tree_map(lambda t: t[p::n] if isinstance(t, Tensor) and t.ndim else t, out)


def _bt(s: Tensor) -> Tensor:
    return s.unsqueeze(1) if s.ndim == 1 else s


def _per_patch(score: Callable[[Any], Tensor]) -> Callable[[int], Callable[[Any], Tensor]]:
    """The target of the base method on ``(B n)`` patches: ``score`` applied to each patch position's batch."""

    def on(n: int) -> Callable[[Any], Tensor]:
        return lambda out: torch.stack([score(_patch(out, p, n)) for p in range(n)], 1).flatten(0, 1)

    return on


@composite(
    {
        "base": Option("gradcam", _base),
        "scales": Option(None, _scales),
        "num_scales": Option(12, positive_int),
        "scale_step_ratio": Option(2.0 / 7.0, nonnegative),
        "window_size": Option(None, _optional_int),
        "step_size": Option(None, _optional_int),
        "pre_filter_ratio": Option(0.0, _ratio),
        "theta": Option(0.0, finite),
        "pool": Option("mean", choice("mean", "max")),
        "smooth": Option(True, boolean),
        "use_softmax_scores": Option(True, boolean),
    }
)
def sess(model: Model, params: Params, x: Tensor, layer: Any, target: Target, own: Own, rest: Own) -> Maps:
    r"""SESS, saliency enhancing with scaling and sliding (Tyagi et al., ECCV 2022, arXiv 2207.01769).

    The image is resized so its shorter side is each scale :math:`s` (default ``num_scales=12`` scales
    :math:`w + i \cdot \mathrm{round}(w \cdot 2/7)`, ``w = window_size``, default the shorter side); a
    ``w x w`` window slides over each (``step_size``, default ``w``; border windows shifted back inside).
    Each patch :math:`P` gets the score :math:`s_P = \max(0, \mathrm{softmax}(f(P))_c)` (raw logits with
    ``use_softmax_scores=False``); the lowest ``pre_filter_ratio`` of the patches are dropped; each kept
    patch's base map :math:`L_P` (min-max normalised) is weighted by :math:`s_P / \max_Q s_Q`, pasted at its
    place in the scaled image and resized back, :math:`\tilde L_P`. Fusion (``pool="mean"``):

    .. math:: F = \frac{\sum_P \tilde L_P\,[\tilde L_P > \theta]}{\sum_P [\tilde L_P > \theta]}

    (0 where no patch counts), or ``pool="max"``: :math:`F = \max_P \tilde L_P`; then an OpenCV-style
    11 x 11 Gaussian blur (:math:`\sigma = 5`, ``smooth=True``) and min-max. Defaults as pytorch-grad-cam's
    ``SESS``; all patches of a scale go to the base method as one batch (grad-cam: 32 at a time), and the
    dropped patches' maps are computed and masked rather than skipped. Targets: every form the methods take
    (:mod:`camfn.targets`): class indices (``None``: the clean image's top-1 class for every patch; ``(B, T)``
    gives ``T`` maps), a callable ``output -> (B,)`` or ``(B, T)``, or ``B`` per-sample callables. A callable
    scores the patches at one window position of all ``B`` images as one batch, so it sees ``B`` samples as on
    ``x`` (``s_P`` is the callable on the softmax of the logits; with ``use_softmax_scores=False`` on the raw
    output, e.g. a segmentation target). Images are scored independently: a batch equals its samples one
    by one. 2-D images only (an :class:`~camfn.errors.InputError` otherwise).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> camfn.sess(model, camfn.params(model), x, "layer4", 3, num_scales=2).shape
        torch.Size([1, 64, 64])
    """
    if x.ndim != 4:
        raise InputError(
            f"sess slides 2-D windows: x must be (B, C, H, W) images, got shape {tuple(x.shape)}; for volumes or "
            "1-d signals use the base method directly"
        )
    final = _finish_options(rest)
    trace, shared = trace_with(model, params, x, {k: v for k, v in rest.items() if k in TRACING})
    run = trace.program()
    batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    clean = pick(run(params, x), shared["output"])
    if is_callable(target):  # the callable scores each patch position's batch of B patches, as it scores x
        score = scores(target, batch, None)
        base_target = _per_patch(score)
        squeeze = score(clean).ndim == 1
    else:
        index, squeeze = classes(resolve(target, clean, None), batch, _logits(clean, "sess").shape[1])
        idx = index(clean)  # (B, T)
        score, base_target = (lambda out: _logits(out, "sess").gather(1, idx)), None

    def patch_scores(inputs: Tensor, n: int) -> Tensor:
        """``(B, n, T)`` scores of the ``n`` patches of each image (``inputs``: ``(B n, C, w, w)``)."""
        out = pick(run(params, inputs), shared["output"])
        if own["use_softmax_scores"]:
            if not isinstance(out, Tensor) or out.ndim != 2:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise OptionError(
                    f"sess scores patches on the softmax of (B, num_classes) logits, but the output is {got}; pass "
                    "use_softmax_scores=False (raw target scores, clipped at 0) or select the logits with output="
                )
            out = out.softmax(-1)
        return torch.stack([_bt(score(_patch(out, p, n))) for p in range(n)], 1)

    window = own["window_size"] or min(height, width)
    step = own["step_size"] or window
    if own["scales"] is not None:
        scales = own["scales"]
    else:
        grow = round(window * own["scale_step_ratio"])
        scales = tuple(window + grow * i for i in range(own["num_scales"]))
    if window > min(height, width):
        raise OptionError(
            f"window_size={window}: the window must fit the {height}x{width} input; use <= {min(height, width)}"
        )
    if min(scales) < window:
        raise OptionError(f"scales={scales}: every scale must be at least the window size {window}")

    layouts, all_scores = [], []
    for s in scales:
        short, long = min(height, width), max(height, width)
        size = (s, int(s * long / short)) if height <= width else (int(s * long / short), s)
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()  # antialiasing has no half kernel on CPU
        scaled = F.interpolate(wide, size=size, mode="bilinear", align_corners=False, antialias=True).to(x.dtype)
        corners = [
            (x1, y1) for y1 in window_starts(size[0], step, window) for x1 in window_starts(size[1], step, window)
        ]
        patches = torch.stack([scaled[:, :, y : y + window, c : c + window] for c, y in corners], 1)  # (B, P, C, w, w)
        all_scores.append(F.relu(patch_scores(patches.flatten(0, 1), len(corners))))  # (B, P, T)
        layouts.append((size, corners, patches))
    scores_all = torch.cat(all_scores, 1)  # (B, N, T)
    n_patches = scores_all.shape[1]
    drop = int(n_patches * own["pre_filter_ratio"])
    keep = torch.ones_like(scores_all, dtype=torch.bool)
    if drop:
        keep = keep.scatter(1, scores_all.argsort(1)[:, :drop], False)
    top = scores_all.amax(1, keepdim=True)
    weights = torch.where(
        top > 0, scores_all / torch.where(top > 0, top, torch.ones_like(top)), torch.ones_like(scores_all)
    )

    total = x.new_zeros(batch, scores_all.shape[2], height, width)
    counts = torch.zeros_like(total)
    offset = 0
    for size, corners, patches in layouts:
        n = len(corners)
        patch_target = idx.repeat_interleave(n, 0) if base_target is None else base_target(n)
        cams = own["base"](model, params, patches.flatten(0, 1), layer, patch_target, **rest)
        cams = (cams if cams.ndim == 4 else cams.unsqueeze(1)).unflatten(0, (batch, n))  # (B, P, T, w, w)
        w_here, keep_here = weights[:, offset : offset + n], keep[:, offset : offset + n]
        for p, (c, y) in enumerate(corners):
            cam = cams[:, p] * w_here[:, p, :, None, None]
            pasted = F.pad(cam, (c, size[1] - c - cam.shape[-1], y, size[0] - y - cam.shape[-2]))
            back = resize(pasted, (height, width))
            ok = keep_here[:, p, :, None, None]
            if own["pool"] == "max":
                total = torch.maximum(total, torch.where(ok, back, torch.zeros_like(back)))
            else:
                mask = (back > own["theta"]) & ok
                total = total + torch.where(mask, back, torch.zeros_like(back))
                counts = counts + mask.to(total.dtype)
        offset += n
    if own["pool"] == "mean":
        total = torch.where(counts > 0, total / torch.where(counts > 0, counts, torch.ones_like(counts)), total * 0)
    if own["smooth"]:
        total = _gaussian_blur(total)
    maps = finish(total, x, **final)
    return maps.squeeze(1) if squeeze else maps
