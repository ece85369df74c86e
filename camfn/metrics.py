r"""Metrics for saliency maps: pure, batched torch functions of ``(model, params, x, maps, target)``.

Every metric returns one value per sample, ``(B,)`` (or a :class:`Curve` of per-sample scores), never a
batch mean, so results of several shards can be concatenated or summed. ``maps`` are ``(B, H, W)`` at the
input's size (camfn's default output); ``Y_b`` is the softmax probability of sample ``b``'s class on
``x`` and ``O_b`` on a perturbed copy. The class is ``target`` (an int or a ``(B,)`` long tensor), or with
``target=None`` the top-1 class of the *clean* input, fixed for every perturbed copy.

==========================  ========================================================================
function                    definition
==========================  ========================================================================
:func:`confidence`          ``Y = softmax(f(x))[c]``
:func:`average_drop`        ``max(0, Y - O) / Y`` with ``O`` on ``x * map`` (the paper's number is the mean)
:func:`increase_in_confidence`  ``O > Y`` as 0/1 float
:func:`deletion`            probability while the most salient pixels are set to a baseline (RISE)
:func:`insertion`           probability while the most salient pixels are copied onto a blurred image
:func:`road`                probability while pixels are removed and imputed from their neighbours (ROAD)
:func:`pointing_game`       hit when the map's maximum lies in the box grown by ``tolerance`` px
:func:`energy_pointing_game`  share of the map's mass inside the box
:func:`rank_correlation`    Spearman correlation over the spatial axes
:func:`sanity_check`        rank correlation of maps under cascading model randomisation, one ``vmap``
==========================  ========================================================================

Example:
    >>> import torch, camfn
    >>> from camfn import metrics
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
    ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> p, x = camfn.params(model), torch.rand(2, 3, 16, 16)
    >>> maps = camfn.gradcam(model, p, x, "0")
    >>> metrics.deletion(model, p, x, maps, steps=8).auc.shape
    torch.Size([2])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import maps_over_params
from .checks import check_input, check_model
from .chunks import chunked
from .driver import num_classes
from .errors import InputError, OptionError, TargetError
from .hooks import HookPolicy
from .noise import Seed, gaussian
from .targets import classes
from .tracing import Params, apply, trace

__all__ = [
    "Curve",
    "Sanity",
    "average_drop",
    "blurred",
    "confidence",
    "deletion",
    "energy_pointing_game",
    "impute",
    "increase_in_confidence",
    "insertion",
    "pointing_game",
    "randomized",
    "rank_correlation",
    "removed",
    "road",
    "sanity_check",
]

Order = Literal["most", "least"]


class Curve(NamedTuple):
    """A perturbation curve: ``scores[b, s]`` is sample ``b``'s class probability at ``fractions[s]``.

    ``auc[b]`` is the trapezoid area under the curve divided by the span of ``fractions``
    (``fractions[-1] - fractions[0]``; it is 1 for deletion and insertion, whose axis is ``[0, 1]``), i.e. the
    curve's mean height. A single fraction gives its score.
    """

    fractions: Tensor
    scores: Tensor
    auc: Tensor


class Sanity(NamedTuple):
    """Model-randomisation sanity check.

    ``layers[i]``: the layer randomised at cascade step ``i`` (steps go top layer first; step ``i`` has
    ``layers[0..i]`` randomised). ``correlations``: ``(L, B)`` (``(L, B, T)`` for multi-target maps) Spearman
    correlation between the trained model's map and step ``i``'s map. ``maps``: the randomised maps
    ``(L, B, H, W)``.
    """

    layers: list[str]
    correlations: Tensor
    maps: Tensor


# ------------------------------------------------------------------------------------------ checks
def _check_maps(maps: object, x: Tensor, what: str = "maps") -> Tensor:
    expected = (x.shape[0], *x.shape[2:])
    if not isinstance(maps, Tensor):
        raise InputError(f"{what} must be a tensor of shape {expected}, got {type(maps).__name__}")
    if not maps.is_floating_point():
        raise InputError(f"{what} has dtype {maps.dtype}; pass float maps (camfn's methods return them)")
    if tuple(maps.shape) != expected:
        hint = ""
        if maps.ndim == x.ndim and maps.shape[1] == 1:
            hint = " (a channel axis of 1: pass maps.squeeze(1))"
        elif maps.ndim == x.ndim:
            hint = " (several maps per sample: pass maps[:, t], one target at a time)"
        elif tuple(maps.shape[1:]) != tuple(x.shape[2:]):
            hint = " (maps at layer resolution: compute them with size='input', camfn's default)"
        raise InputError(
            f"{what} has shape {tuple(maps.shape)} but x has shape {tuple(x.shape)}: expected one map per sample "
            f"at the input's size, {expected}{hint}"
        )
    return maps


def _check_model(model: nn.Module, x: Tensor) -> None:
    check_input(x)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_model(model)


def _check_fractions(fractions: Sequence[float] | Tensor) -> Tensor:
    values = torch.as_tensor(fractions, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise OptionError("fractions is empty; pass at least one fraction in [0, 1], e.g. (0.1, 0.5, 0.9)")
    if not bool(((values >= 0) & (values <= 1)).all()):
        raise OptionError(f"fractions {values.tolist()} must lie in [0, 1] (the fraction of pixels removed)")
    return values


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise OptionError(f"chunk_size={chunk_size!r}: use a positive int (images per forward), or None")


# ------------------------------------------------------------------------------------- confidence
def _classes(model: nn.Module, params: Params, x: Tensor, target: int | Tensor | None, hooks: HookPolicy) -> Tensor:
    """``(B,)`` class indices: ``target`` validated, or the top-1 class of ``x`` for ``None``."""
    if callable(target) and not isinstance(target, Tensor):
        raise TargetError(
            "metrics measure the softmax probability of a class, so target must be None, an int or a (B,) long "
            "tensor of class indices, not a callable"
        )
    if isinstance(target, Tensor) and target.ndim == 2:
        raise TargetError(
            f"target has shape {tuple(target.shape)}; metrics score one class per sample: pass target[:, t] "
            "(a (B,) tensor) for each t"
        )
    traced = trace(model, hooks=hooks)
    index, _ = classes(target, x.shape[0], num_classes(traced, x))
    if target is None:
        return index(apply(model, params, x, hooks=hooks)).squeeze(1)
    return index(torch.empty(x.shape[0], 0, device=x.device)).squeeze(1)


def _probability(model: nn.Module, params: Params, inputs: Tensor, cls: Tensor, hooks: HookPolicy) -> Tensor:
    """Softmax probability of ``cls`` ``(B,)`` for inputs ``(..., B, C, H, W)`` -> ``(..., B)``."""
    lead = inputs.shape[:-4]
    flat = inputs.reshape(-1, *inputs.shape[-4:]).flatten(0, 1) if lead else inputs
    out = apply(model, params, flat, hooks=hooks)
    if not isinstance(out, Tensor) or out.ndim != 2:
        raise TargetError("metrics need a model that returns (B, num_classes) logits")
    prob = out.softmax(1).gather(1, cls.to(out.device).repeat(flat.shape[0] // cls.shape[0]).unsqueeze(1))
    return prob.reshape(*lead, cls.shape[0])


def confidence(
    model: nn.Module,
    params: Params,
    x: Tensor,
    target: int | Tensor | None = None,
    *,
    hooks: HookPolicy = "error",
) -> Tensor:
    r"""Softmax probability of each sample's class, ``(B,)``.

    .. math:: Y_b = \mathrm{softmax}(f(x_b))_{c_b}

    ``target``: an int, a ``(B,)`` long tensor, or ``None`` for the top-1 class of each sample.
    ``hooks``: as in :func:`camfn.tracing.trace`.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = model[1].weight.zero_(), model[1].bias.copy_(torch.tensor([1.0, 3.0]).log())
        >>> camfn.metrics.confidence(model, camfn.params(model), torch.rand(1, 1, 2, 2))
        tensor([0.7500])
    """
    _check_model(model, x)
    cls = _classes(model, params, x, target, hooks)
    return _probability(model, params, x, cls, hooks)


def _drop_and_gain(
    model: nn.Module, params: Params, x: Tensor, maps: Tensor, target: int | Tensor | None, hooks: HookPolicy
) -> tuple[Tensor, Tensor]:
    _check_model(model, x)
    _check_maps(maps, x)
    if not bool(((maps >= 0) & (maps <= 1)).all()):
        raise InputError(
            f"maps hold values in [{float(maps.min()):.3g}, {float(maps.max()):.3g}]; average drop multiplies "
            "the input by the map, which must lie in [0, 1] (camfn's default normalize=True)"
        )
    cls = _classes(model, params, x, target, hooks)
    both = torch.stack([x, x * maps.unsqueeze(1).to(x.dtype)])
    y, o = _probability(model, params, both, cls, hooks)
    return y, o


def average_drop(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: int | Tensor | None = None,
    *,
    hooks: HookPolicy = "error",
) -> Tensor:
    r"""Average drop (Chattopadhyay et al., Grad-CAM++), per sample ``(B,)``; its mean is the paper's number.

    .. math:: \mathrm{drop}_b = \frac{\max(0, Y_b - O_b)}{Y_b}

    with ``Y`` the class probability on ``x`` and ``O`` on ``x * map`` (maps ``(B, H, W)`` in ``[0, 1]``).
    A probability that underflows to 0 gives a drop of 0.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x = torch.rand(2, 1, 2, 2)
        >>> camfn.metrics.average_drop(model, camfn.params(model), x, torch.ones(2, 2, 2))
        tensor([0., 0.])
    """
    y, o = _drop_and_gain(model, params, x, maps, target, hooks)
    safe = torch.where(y > 0, y, torch.ones_like(y))
    return torch.where(y > 0, (y - o).clamp_min(0) / safe, torch.zeros_like(y))


def increase_in_confidence(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: int | Tensor | None = None,
    *,
    hooks: HookPolicy = "error",
) -> Tensor:
    r"""Increase in confidence (Chattopadhyay et al.): ``1.0`` where :math:`O_b > Y_b`, else ``0.0``; ``(B,)``.

    Same ``Y`` and ``O`` as :func:`average_drop`; the mean over a data set is the paper's percentage / 100.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x = torch.rand(2, 1, 2, 2)
        >>> camfn.metrics.increase_in_confidence(model, camfn.params(model), x, torch.ones(2, 2, 2))
        tensor([0., 0.])
    """
    y, o = _drop_and_gain(model, params, x, maps, target, hooks)
    return (o > y).to(y.dtype)


# ------------------------------------------------------------------------------------ pixel order
def _ranks(maps: Tensor, order: Order) -> Tensor:
    """``(B, H*W)`` rank of each pixel: 0 for the first removed (most salient for ``"most"``).

    Ties keep raster order (a stable sort), so the result is deterministic.
    """
    if order not in ("most", "least"):
        raise OptionError(f"order={order!r}: use 'most' (most relevant first) or 'least' (least relevant first)")
    flat = maps.flatten(1)
    idx = torch.sort(flat, dim=1, descending=order == "most", stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(idx)
    return torch.empty_like(idx).scatter_(1, idx, positions)


def _counts(fractions: Tensor, pixels: int) -> Tensor:
    """Number of pixels removed at each fraction: ``floor(f * pixels + 1/2)``."""
    return torch.floor(fractions * pixels + 0.5).long()


def removed(maps: Tensor, fraction: float, order: Order = "most") -> Tensor:
    """Boolean ``(B, H, W)``: the ``round(fraction * H * W)`` most (or least) salient pixels of each map.

    Ties are broken in raster order (row-major, first pixel first).

    Example:
        >>> import torch
        >>> from camfn.metrics import removed
        >>> removed(torch.tensor([[[0.1, 0.9], [0.5, 0.3]]]), 0.5).int()
        tensor([[[0, 1],
                 [1, 0]]], dtype=torch.int32)
    """
    fractions = _check_fractions([fraction])
    rank = _ranks(maps, order)
    return (rank < _counts(fractions, rank.shape[1]).to(rank.device)).reshape(maps.shape)


# -------------------------------------------------------------------------------------- curves
def _curve(fractions: Tensor, scores: Tensor) -> Curve:
    fr = fractions.to(scores.dtype)
    if fr.numel() == 1:
        return Curve(fr, scores, scores[:, 0])
    span = fr[-1] - fr[0]
    area = torch.trapezoid(scores, fr, dim=1)
    return Curve(fr, scores, area / span if float(span) != 0 else scores.mean(1))


def _run_curve(
    model: nn.Module,
    params: Params,
    x: Tensor,
    cls: Tensor,
    make: Callable[[Tensor], Tensor],
    n: int,
    chunk_size: int | None,
    hooks: HookPolicy,
) -> Tensor:
    """Scores ``(B, n)`` for ``n`` perturbed copies; ``make(steps (c,)) -> (c, B, C, H, W)`` per chunk."""
    per_chunk = None if chunk_size is None else max(1, chunk_size // x.shape[0])
    scores = chunked(lambda idx: _probability(model, params, make(idx), cls, hooks), n, per_chunk, device=x.device)
    return scores.T


def _baseline(value: float | Tensor, x: Tensor, what: str) -> Tensor:
    if isinstance(value, Tensor):
        try:
            return torch.broadcast_to(value.to(device=x.device, dtype=x.dtype), x.shape)
        except RuntimeError as err:
            raise InputError(
                f"{what} has shape {tuple(value.shape)}, which does not broadcast to x's {tuple(x.shape)}"
            ) from err
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(f"{what}={value!r}: use a number or a tensor broadcastable to x")
    return torch.full_like(x, float(value))


def _steps_fractions(steps: int, pixels: int) -> tuple[Tensor, Tensor]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise OptionError(f"steps={steps!r}: use a positive int (the number of increments from 0 to all pixels)")
    counts = torch.arange(steps + 1) * pixels // steps
    return counts, counts.double() / pixels


def _pixel_curve(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: int | Tensor | None,
    start: Tensor,
    end: Tensor,
    steps: int,
    chunk_size: int | None,
    hooks: HookPolicy,
) -> Curve:
    """Move the most salient pixels from ``start`` to ``end``, ``steps`` equal increments of pixels."""
    rank = _ranks(maps, "most").reshape(x.shape[0], 1, *x.shape[2:])
    counts, fractions = _steps_fractions(steps, rank[0].numel())
    counts = counts.to(x.device)
    cls = _classes(model, params, x, target, hooks)

    def make(idx: Tensor) -> Tensor:
        moved = rank.unsqueeze(0) < counts[idx].reshape(-1, 1, 1, *([1] * (x.ndim - 2)))
        return torch.where(moved, end, start)

    return _curve(fractions, _run_curve(model, params, x, cls, make, steps + 1, chunk_size, hooks))


def deletion(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: int | Tensor | None = None,
    *,
    steps: int = 32,
    baseline: float | Tensor = 0.0,
    chunk_size: int | None = 64,
    hooks: HookPolicy = "error",
) -> Curve:
    r"""Deletion curve and AUC (Petsiuk et al., RISE): lower is better.

    Pixels (all channels of a spatial position) are ordered by decreasing saliency (ties in raster order);
    at step :math:`i = 0..\text{steps}` the first :math:`k_i = \lfloor i\,HW/\text{steps} \rfloor` are set to
    ``baseline`` (a number or a tensor broadcastable to ``x``, e.g. a blurred copy) and the class probability
    is recorded:

    .. math:: s_{b,i} = \mathrm{softmax}\big(f(x_b \odot (1 - m_i) + \text{baseline} \odot m_i)\big)_{c_b},
              \qquad \mathrm{AUC}_b = \mathrm{trapz}(s_b, k / HW)

    ``chunk_size`` bounds the perturbed images per forward (``None``: all at once).

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, maps = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
        >>> curve = camfn.metrics.deletion(model, camfn.params(model), x, maps, steps=4)
        >>> curve.fractions
        tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000])
        >>> curve.scores.shape, curve.auc.shape
        (torch.Size([2, 5]), torch.Size([2]))
    """
    _check_model(model, x)
    _check_maps(maps, x)
    _check_chunk(chunk_size)
    return _pixel_curve(model, params, x, maps, target, x, _baseline(baseline, x, "baseline"), steps, chunk_size, hooks)


def blurred(x: Tensor, sigma: float) -> Tensor:
    r"""``x`` blurred by a Gaussian of std ``sigma`` px per spatial axis (radius ``ceil(3 sigma)``, edges replicated).

    .. math:: k(t) \propto e^{-t^2 / 2\sigma^2}, \quad |t| \le \lceil 3\sigma \rceil, \quad \textstyle\sum k = 1

    ``sigma = 0`` returns ``x``. A constant image stays constant.

    Example:
        >>> import torch
        >>> from camfn.metrics import blurred
        >>> bool(torch.allclose(blurred(torch.full((1, 3, 8, 8), 0.5), 2.0), torch.tensor(0.5)))
        True
    """
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or sigma < 0:
        raise OptionError(f"blur={sigma!r}: use a Gaussian std in pixels >= 0, or a start image tensor")
    if sigma == 0:
        return x
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = x.reshape(-1, 1, *x.shape[2:])
    for axis in range(2, x.ndim):
        shape = [1, 1] + [1] * (x.ndim - 2)
        shape[axis] = kernel.numel()
        pad = [0, 0] * (x.ndim - 2)
        pad[2 * (x.ndim - 1 - axis)] = pad[2 * (x.ndim - 1 - axis) + 1] = radius
        conv = F.conv2d if x.ndim == 4 else F.conv3d
        out = conv(F.pad(out, pad, mode="replicate"), kernel.reshape(shape))
    return out.reshape(x.shape)


def insertion(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: int | Tensor | None = None,
    *,
    steps: int = 32,
    blur: float | Tensor = 5.0,
    chunk_size: int | None = 64,
    hooks: HookPolicy = "error",
) -> Curve:
    r"""Insertion curve and AUC (Petsiuk et al., RISE): higher is better.

    Starts from ``x`` blurred by a Gaussian of std ``blur`` px (:func:`blurred`), or from ``blur`` itself when
    it is a tensor broadcastable to ``x`` (e.g. zeros), and copies the most salient pixels of ``x`` onto it,
    ``k_i = floor(i HW / steps)`` at step ``i``; otherwise as :func:`deletion`:

    .. math:: s_{b,i} = \mathrm{softmax}\big(f(\tilde x_b \odot (1 - m_i) + x_b \odot m_i)\big)_{c_b}

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, maps = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
        >>> p = camfn.params(model)
        >>> curve = camfn.metrics.insertion(model, p, x, maps, steps=4, blur=1.0)
        >>> bool(torch.allclose(curve.scores[:, -1], camfn.metrics.confidence(model, p, x)))
        True
    """
    _check_model(model, x)
    _check_maps(maps, x)
    _check_chunk(chunk_size)
    start = _baseline(blur, x, "blur") if isinstance(blur, Tensor) else blurred(x, blur)
    return _pixel_curve(model, params, x, maps, target, start, x, steps, chunk_size, hooks)


# ------------------------------------------------------------------------------------------- ROAD
COARSE_TOL = 1e-3  # the half-resolution solve is only a starting point
_NEIGHBOURS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


def _solver_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


def _conjugate_gradient(known: Tensor, u: Tensor, v: Tensor, tol: float, max_iter: int | None) -> Tensor:
    """Solve the imputation system for the removed pixels ``u`` (``(N, 1, H, W)``) by CG, starting at ``v``."""
    h, w = u.shape[-2:]
    kernel = torch.tensor(_NEIGHBOURS, dtype=u.dtype, device=u.device).reshape(1, 1, 3, 3)

    def neighbours(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, padding=1)

    weight = neighbours(torch.ones(1, 1, h, w, dtype=u.dtype, device=u.device))

    def system(t: Tensor) -> Tensor:
        return u * (weight * t - neighbours(u * t))

    b = u * neighbours(known)
    v = u * v
    r = b - system(v)
    direction = r.clone()
    rs = (r * r).sum((1, 2, 3), keepdim=True)
    stop = (tol**2) * (b * b).sum((1, 2, 3), keepdim=True)
    for _ in range(h * w if max_iter is None else max_iter):
        if bool((rs <= stop).all()):
            break
        step = system(direction)
        curvature = (direction * step).sum((1, 2, 3), keepdim=True)
        alpha = torch.where(curvature > 0, rs / torch.where(curvature > 0, curvature, 1.0), 0.0)
        v = v + alpha * direction
        r = r - alpha * step
        new = (r * r).sum((1, 2, 3), keepdim=True)
        direction = r + torch.where(rs > 0, new / torch.where(rs > 0, rs, 1.0), 0.0) * direction
        rs = new
    return v


def _harmonic_fill(known: Tensor, u: Tensor, tol: float, max_iter: int | None) -> Tensor:
    """Values of the removed pixels: CG started from the (recursively solved) half-resolution problem.

    The coarse problem keeps a 2x2 block's known pixels as their mean and removes blocks with none known;
    its upsampled solution is only the starting point, so the result is the fine system's solution.
    """
    h, w = u.shape[-2:]
    start = torch.zeros_like(u)
    if min(h, w) >= 16 and bool((u > 0).any()) and bool((u < 1).any()):
        kept = 1 - u
        count = F.avg_pool2d(kept, 2, ceil_mode=True, divisor_override=1)
        total = F.avg_pool2d(known, 2, ceil_mode=True, divisor_override=1)
        coarse_u = (count == 0).to(u.dtype)
        coarse_known = torch.where(count > 0, total / count.clamp_min(1), 0.0)
        coarse = coarse_known + coarse_u * _harmonic_fill(coarse_known, coarse_u, max(tol, COARSE_TOL), max_iter)
        start = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return _conjugate_gradient(known, u, start, tol, max_iter)


def impute(
    x: Tensor,
    mask: Tensor,
    *,
    noise: float = 0.01,
    seed: Seed = 0,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> Tensor:
    r"""Noisy linear imputation (Rong et al., ROAD, 2022) of the pixels where ``mask`` is True.

    Each removed pixel equals the weighted mean of its in-image 8 neighbours (weight 1/6 for the 4 direct,
    1/12 for the 4 diagonal ones, renormalised at the border), removed neighbours being unknowns too:

    .. math:: \Big(\sum_{j \in N(i)} w_{ij}\Big) v_i - \sum_{j \in N(i) \cap R} w_{ij} v_j
              = \sum_{j \in N(i) \setminus R} w_{ij} x_j, \quad i \in R; \qquad
              \hat x_i = v_i + \varepsilon_i, \ \varepsilon_i \sim N(0, \text{noise}^2)

    The system is symmetric positive definite (a Dirichlet graph Laplacian); it is solved matrix-free by
    conjugate gradients with 3x3 convolutions, started from the solution of the same problem at half
    resolution (recursively, to a relative residual of 1e-3), in float64 (float32 on MPS), per sample and channel, to a
    relative residual ``tol`` (at most ``max_iter`` iterations, default ``H * W``). When every pixel is
    removed there is nothing to interpolate from and the values are 0 (plus noise). Noise comes from
    ``seed`` (an int or a ``torch.Generator``) via :func:`camfn.noise.gaussian`, one draw of shape
    ``x.shape[1:]`` shared by the batch, so a sample's result does not depend on the rest of the batch.
    Kept pixels are returned unchanged.

    Args:
        x: images ``(B, C, H, W)``, or ``(..., B, C, H, W)``.
        mask: removed pixels, ``(B, H, W)`` or ``(..., B, H, W)`` bool.

    Example:
        >>> import torch
        >>> from camfn.metrics import impute
        >>> ramp = torch.arange(5.0).expand(1, 1, 5, 5)  # x_ij = j is harmonic: reproduced exactly
        >>> mask = torch.zeros(1, 5, 5, dtype=torch.bool)
        >>> mask[:, 1:4, 1:4] = True
        >>> bool(torch.allclose(impute(ramp, mask, noise=0.0), ramp))
        True
    """
    if x.ndim < 4 or mask.shape != (*x.shape[:-3], *x.shape[-2:]):
        raise InputError(
            f"impute needs images (..., B, C, H, W) and a mask (..., B, H, W); got {tuple(x.shape)} and "
            f"{tuple(mask.shape)}"
        )
    if noise < 0:
        raise OptionError(f"noise={noise!r}: use a standard deviation >= 0")
    h, w = x.shape[-2:]
    dtype = _solver_dtype(x)
    u = mask.unsqueeze(-3).expand(x.shape).reshape(-1, 1, h, w).to(dtype)
    known = x.reshape(-1, 1, h, w).to(dtype) * (1 - u)
    v = _harmonic_fill(known, u, tol, max_iter)
    filled = (known + u * v).reshape(x.shape).to(x.dtype)
    if noise > 0:
        eps = gaussian(x.shape[-3:], std=noise, seed=seed, dtype=x.dtype, device=x.device)
        filled = filled + mask.unsqueeze(-3).to(x.dtype) * eps
    return torch.where(mask.unsqueeze(-3), filled, x)


def road(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: int | Tensor | None = None,
    *,
    fractions: Sequence[float] | Tensor = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    order: Order = "most",
    noise: float = 0.01,
    seed: Seed = 0,
    chunk_size: int | None = 64,
    hooks: HookPolicy = "error",
) -> Curve:
    r"""ROAD, RemOve And Debias (Rong et al., ICML 2022): class probability after removing and imputing pixels.

    For each ``f`` in ``fractions`` (the fraction of pixels **removed**), the ``round(f * H * W)`` most
    (``order="most"``, MoRF: lower is better) or least (``order="least"``, LeRF: higher is better) salient
    pixels of each map (ties in raster order, :func:`removed`) are replaced by noisy linear imputation
    (:func:`impute`, noise std ``noise``, seeded by ``seed``; the same draw for every fraction) and

    .. math:: s_{b,f} = \mathrm{softmax}\big(f(\mathrm{impute}(x_b, R_{b,f}))\big)_{c_b}

    ``auc`` is the trapezoid over ``fractions`` divided by their span (the curve's mean height).

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        >>> x, maps = torch.rand(2, 1, 8, 8), torch.rand(2, 8, 8)
        >>> curve = camfn.metrics.road(model, camfn.params(model), x, maps, fractions=(0.25, 0.5), seed=1)
        >>> curve.fractions, curve.scores.shape
        (tensor([0.2500, 0.5000]), torch.Size([2, 2]))
    """
    _check_model(model, x)
    _check_maps(maps, x)
    _check_chunk(chunk_size)
    if x.ndim != 4:
        raise InputError(f"road imputes 2-d images (B, C, H, W); x has shape {tuple(x.shape)}")
    values = _check_fractions(fractions)
    rank = _ranks(maps, order).reshape(maps.shape)
    counts = _counts(values, rank[0].numel()).to(x.device)
    cls = _classes(model, params, x, target, hooks)

    def make(idx: Tensor) -> Tensor:
        mask = rank.unsqueeze(0) < counts[idx].reshape(-1, 1, 1, 1)
        return impute(x.expand(idx.shape[0], *x.shape), mask, noise=noise, seed=seed)

    return _curve(values, _run_curve(model, params, x, cls, make, values.numel(), chunk_size, hooks))


# -------------------------------------------------------------------------------------- pointing
def _check_boxes(boxes: object, maps: Tensor) -> Tensor:
    if not isinstance(maps, Tensor) or maps.ndim < 2:
        raise InputError(f"maps must be a (B, H, W) tensor, got {getattr(maps, 'shape', type(maps).__name__)}")
    b = maps.shape[0]
    if not isinstance(boxes, Tensor):
        boxes = torch.as_tensor(boxes)
    if boxes.ndim == 2:
        boxes = boxes.unsqueeze(1)
    if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
        raise InputError(
            f"boxes has shape {tuple(boxes.shape)}; expected ({b}, 4) boxes (x0, y0, x1, y1), one per map, "
            f"or ({b}, N, 4) for N boxes per map"
        )
    if bool(((boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])).any()):
        raise InputError("boxes must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1 (torchvision's xyxy format)")
    return boxes.to(device=maps.device)


def _inside(boxes: Tensor, h: int, w: int, grow: float = 0) -> Tensor:
    """``(B, H, W)`` bool: pixel ``(r, c)`` lies in some box, ``x0 - g <= c < x1 + g`` and same for rows."""
    rows = torch.arange(h, device=boxes.device).reshape(1, 1, h, 1)
    cols = torch.arange(w, device=boxes.device).reshape(1, 1, 1, w)
    x0, y0, x1, y1 = (boxes[..., i].reshape(*boxes.shape[:2], 1, 1) for i in range(4))
    inside = (cols >= x0 - grow) & (cols < x1 + grow) & (rows >= y0 - grow) & (rows < y1 + grow)
    return inside.any(1)


def pointing_game(maps: Tensor, boxes: Tensor, tolerance: float = 15) -> Tensor:
    r"""Pointing game (Zhang et al., 2016): ``(B,)`` bool, True when the map's maximum hits the box.

    The maximum is the first maximal pixel in raster order, ``(r, c)``; a box ``(x0, y0, x1, y1)`` in pixel
    coordinates, inclusive-exclusive as in torchvision, grown by ``tolerance`` px on every side:

    .. math:: \mathrm{hit}_b = [x_0 - t \le c < x_1 + t] \wedge [y_0 - t \le r < y_1 + t]

    ``boxes``: ``(B, 4)``, or ``(B, N, 4)`` for several boxes (a hit on any counts).

    Example:
        >>> import torch
        >>> from camfn.metrics import pointing_game
        >>> maps = torch.zeros(2, 32, 32)
        >>> maps[0, 5, 20] = maps[1, 5, 30] = 1.0  # row 5; columns 20 and 30
        >>> pointing_game(maps, torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10]]), tolerance=15)
        tensor([ True, False])
    """
    boxes = _check_boxes(boxes, maps)
    if maps.ndim != 3:
        raise InputError(f"maps has shape {tuple(maps.shape)}; expected (B, H, W)")
    h, w = maps.shape[1:]
    peak = maps.flatten(1).argmax(1)
    hit = _inside(boxes, h, w, tolerance).flatten(1)
    return hit.gather(1, peak.unsqueeze(1)).squeeze(1)


def energy_pointing_game(maps: Tensor, boxes: Tensor) -> Tensor:
    r"""Energy-based pointing game (Wang et al., Score-CAM, 2020): share of each map's mass inside the box.

    .. math:: E_b = \frac{\sum_{(r,c) \in \mathrm{box}} L_{b,rc}}{\sum_{r,c} L_{b,rc}}

    ``maps`` ``(B, H, W)``, non-negative; boxes as in :func:`pointing_game` (no tolerance; several boxes:
    their union). A map with zero mass gives 0.

    Example:
        >>> import torch
        >>> from camfn.metrics import energy_pointing_game
        >>> maps = torch.zeros(1, 4, 4)
        >>> maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0
        >>> energy_pointing_game(maps, torch.tensor([[0, 0, 2, 2]]))
        tensor([0.7500])
    """
    boxes = _check_boxes(boxes, maps)
    if maps.ndim != 3:
        raise InputError(f"maps has shape {tuple(maps.shape)}; expected (B, H, W)")
    if bool((maps < 0).any()):
        raise InputError("maps has negative values; the energy pointing game needs non-negative maps (relu=True)")
    inside = _inside(boxes, *maps.shape[1:]).to(maps.dtype)
    total = maps.sum((1, 2))
    part = (maps * inside).sum((1, 2))
    return torch.where(total > 0, part / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


# ------------------------------------------------------------------------------- rank correlation
def _average_ranks(v: Tensor) -> Tensor:
    """1-based ranks along the last axis, ties sharing their average rank."""
    ordered = v.sort(-1).values
    low = torch.searchsorted(ordered, v, right=False)
    high = torch.searchsorted(ordered, v, right=True)
    return (low + high + 1).to(v.dtype if v.is_floating_point() else torch.float64) / 2


def rank_correlation(a: Tensor, b: Tensor, ndim: int = 2) -> Tensor:
    r"""Spearman rank correlation over the last ``ndim`` axes, batched over the leading ones (broadcast).

    .. math:: \rho = \mathrm{corr}\big(\mathrm{rank}(a), \mathrm{rank}(b)\big)

    with tied values sharing their average rank (as ``scipy.stats.spearmanr``). A constant input has no
    ranking: its correlation is 0 (scipy gives NaN).

    Example:
        >>> import torch
        >>> from camfn.metrics import rank_correlation
        >>> a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
        >>> rank_correlation(a, a**3), rank_correlation(a, -a)
        (tensor([1.]), tensor([-1.]))
    """
    if a.ndim < ndim or b.ndim < ndim or a.shape[a.ndim - ndim :] != b.shape[b.ndim - ndim :]:
        raise InputError(
            f"rank_correlation compares maps of the same spatial size; got {tuple(a.shape)} and {tuple(b.shape)} "
            f"with ndim={ndim}"
        )
    a, b = torch.broadcast_tensors(a, b)
    ra = _average_ranks(a.flatten(a.ndim - ndim).contiguous())
    rb = _average_ranks(b.flatten(b.ndim - ndim).contiguous())
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    norm = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    cov = (ra * rb).sum(-1)
    return torch.where(norm > 0, cov / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))


# --------------------------------------------------------------------------------- randomisation
def _layers_in_order(model: nn.Module, params: Params) -> list[tuple[str, list[str]]]:
    """Modules owning parameters, in the order the traced forward first uses them, with their param keys.

    A *layer* is a module with parameters of its own (``recurse=False``): a conv, a linear, a norm layer,
    or a module holding a bare ``nn.Parameter`` (a class token). Keys are those of ``params``.
    """
    owners: dict[str, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        keys = [f"{path}.{n}" if path else n for n, _ in module.named_parameters(recurse=False)]
        if keys:
            owners.setdefault(path, keys)
    traced = trace(model, hooks="ignore")
    order: list[str] = []
    for node in traced.module.graph.nodes:
        if node.op == "get_attr":
            used = [str(node.target).rpartition(".")[0]]
        elif node.op == "call_module":  # a leaf module, and any parametrised modules inside it
            path = str(node.target)
            used = [o for o in owners if o == path or o.startswith(f"{path}.")]
        else:
            continue
        order += [o for o in used if o in owners and o not in order]
    return [(o, [k for k in owners[o] if k in params]) for o in order if any(k in params for k in owners[o])]


def randomized(
    model: nn.Module,
    params: Params,
    seed: Seed = 0,
    *,
    depth: int | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    r"""Stacked parameter sets for the cascading model-randomisation test (Adebayo et al., 2018).

    Layers are the modules with parameters of their own, in the order the traced forward uses them. Set
    ``i`` (``i = 0..L-1``) has the last ``i + 1`` layers re-initialised, top layer first; ``L`` is the number of
    layers, or ``depth`` to stop early. Each parameter tensor ``t`` of a randomised layer is redrawn from
    :math:`N(\mathrm{mean}(t), \mathrm{std}(t)^2)` (its own scale; a 1-element tensor keeps its value as
    mean and gets std 0), from ``seed`` (int or ``torch.Generator``): the same draw is used in every set
    that randomises that layer, so consecutive sets differ in one layer only. Buffers (BatchNorm
    statistics) are kept. The model and ``params`` are only read.

    Returns:
        ``(stacked, names)``: ``stacked[k]`` is ``(L, *params[k].shape)`` (unchanged tensors are expanded,
        not copied), ``names[i]`` the module path randomised at step ``i``.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2, 3))
        >>> stacked, names = camfn.metrics.randomized(model, camfn.params(model), seed=0)
        >>> names, stacked["0.weight"].shape
        (['2', '0'], torch.Size([2, 2, 1, 3, 3]))
    """
    if not isinstance(params, dict):
        raise InputError(f"params must be a dict of tensors (camfn.params(model)), got {type(params).__name__}")
    layers = _layers_in_order(model, params)[::-1]
    if depth is not None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise OptionError(f"depth={depth!r}: use a positive number of layers to randomise, or None for all")
        layers = layers[:depth]
    if not layers:
        raise InputError("the model has no parameters to randomise")
    gen = torch.Generator().manual_seed(seed) if isinstance(seed, int) and not isinstance(seed, bool) else seed
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    n = len(layers)
    stacked = {k: v.expand(n, *v.shape) for k, v in params.items()}
    for step, (_, keys) in enumerate(layers):
        for key in keys:
            t = params[key]
            if not t.is_floating_point():
                continue
            ref = t.detach().double().cpu()
            mean, std = ref.mean(), ref.std(unbiased=False)
            draw = torch.randn(t.shape, generator=gen, dtype=torch.float64) * std + mean
            fresh = draw.to(dtype=t.dtype, device=t.device)
            stacked[key] = torch.cat([t.expand(step, *t.shape), fresh.expand(n - step, *t.shape)])
    return stacked, [name for name, _ in layers]


def _fixed_target(
    model: nn.Module, params: Params, x: Tensor, target: Any, options: dict[str, Any]
) -> int | Tensor | Callable[[Tensor], Tensor]:
    """Resolve ``target=None`` to the trained model's top-1 class, so every set explains the same class."""
    if target is not None:
        return target
    out = apply(model, params, x, hooks=options.get("hooks", "error"), tracer_options=options.get("tracer_options"))
    if not isinstance(out, Tensor) or out.ndim != 2:
        raise TargetError("target=None needs (B, num_classes) logits; pass a target for this model")
    return out.argmax(1)


def sanity_check(
    method: Callable[..., Tensor],
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Any = None,
    target: Any = None,
    *,
    seed: Seed = 0,
    depth: int | None = None,
    chunk_size: int | None = None,
    **options: Any,
) -> Sanity:
    r"""Model-randomisation sanity check (Adebayo et al., NeurIPS 2018), cascading from the top layer.

    .. math:: \rho_{i,b} = \mathrm{spearman}\big(M(\theta)_b,\; M(\theta^{(i)})_b\big)

    with :math:`\theta^{(i)}` the parameters with the top ``i + 1`` layers randomised (:func:`randomized`).
    The maps of all randomised sets come from one ``torch.func.vmap`` over the stacked parameters
    (:func:`camfn.maps_over_params`; ``chunk_size`` sets at a time, ``None``: all at once; memory grows with
    ``L`` copies of the parameters). ``target=None`` is the trained model's top-1 class, explained by every set.
    ``options`` go to ``method``.
    A method that passes has correlations falling towards 0 as more layers are randomised.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> result = camfn.metrics.sanity_check(camfn.gradcam, model, camfn.params(model), torch.rand(2, 3, 8, 8), "0")
        >>> result.layers, result.correlations.shape
        (['4', '0'], torch.Size([2, 2]))
    """
    _check_model(model, x)
    target = _fixed_target(model, params, x, target, options)
    trained = method(model, params, x, layer, target, **options)
    stacked, names = randomized(model, params, seed, depth=depth)
    maps = maps_over_params(method, model, stacked, x, layer, target, chunk_size=chunk_size, **options)
    return Sanity(names, rank_correlation(trained.unsqueeze(0), maps, ndim=x.ndim - 2), maps)
