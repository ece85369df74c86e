r"""Perturbation metrics: the class score while the pixels a map ranks first are removed (or inserted).

A *feature* is a spatial position (all channels of a pixel, or of a voxel for ``(B, C, D, H, W)`` volumes).
Scores are the softmax probability of the class (``softmax=False``: the logit; a callable target: its
value), ``None`` meaning the clean input's top-1 class for every perturbed copy. Perturbed copies run
``chunk_size`` images per forward (``"auto"``: a budget of :data:`camfn.chunks.BUDGET` input
values). Quantus 0.6 orders features with an unstable ``argsort``; camfn breaks ties in raster order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError, OptionError
from ..hooks import HookPolicy
from ..noise import Seed, generator
from ..tracing import Params
from .common import (
    ChunkSize,
    Curve,
    Order,
    Scorer,
    check_chunk,
    check_fractions,
    check_images_2d,
    check_maps,
    check_model_input,
    check_positive,
    curve,
    pearson,
    ranks,
    run_copies,
    scorer,
    spearman,
)
from .common import (
    baseline as baseline_tensor,
)
from .registry import metric

__all__ = [
    "blurred",
    "deletion",
    "faithfulness_correlation",
    "infidelity",
    "insertion",
    "irof",
    "monotonicity_correlation",
    "pixel_flipping",
    "region_perturbation",
    "removed",
]


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
    fractions = check_fractions([fraction])
    rank = ranks(maps, order)
    return (rank < _counts(fractions, rank.shape[1]).to(rank.device)).reshape(maps.shape)


def _prepare(model: nn.Module, x: Tensor, maps: Tensor, chunk_size: ChunkSize) -> None:
    check_model_input(model, x)
    check_maps(maps, x)
    check_chunk(chunk_size)


def _moved(s: Scorer, x: Tensor, rank: Tensor, counts: Tensor, start: Tensor, end: Tensor, chunk: ChunkSize) -> Tensor:
    """Scores ``(B, n)``: features of ``rank`` ``(B, *S)`` below ``counts[i]`` taken from ``end``, else ``start``."""
    rank = rank.reshape(x.shape[0], 1, *x.shape[2:])
    counts = counts.to(x.device)

    def make(idx: Tensor) -> Tensor:
        moved = rank.unsqueeze(0) < counts[idx].reshape(-1, *[1] * x.ndim)
        return torch.where(moved, end, start)

    return run_copies(s.score, x, make, counts.numel(), chunk)


def _steps(steps: int, pixels: int) -> tuple[Tensor, Tensor]:
    check_positive("steps", steps, "the number of increments from 0 to all pixels; any count works")
    counts = torch.arange(steps + 1) * pixels // steps
    return counts, counts.double() / pixels


@metric(needs=("model", "maps"), higher_is_better=False, output="curve")
def deletion(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    steps: int = 32,
    baseline: float | str | Tensor = 0.0,
    softmax: bool = True,
    chunk_size: ChunkSize = "auto",
    hooks: HookPolicy = "error",
) -> Curve:
    r"""Deletion curve and AUC (Petsiuk et al., RISE): lower is better.

    Pixels (all channels of a spatial position) are ordered by decreasing saliency (ties in raster order);
    at step :math:`i = 0..\text{steps}` the first :math:`k_i = \lfloor i\,HW/\text{steps} \rfloor` are set to
    ``baseline`` (a number, a tensor broadcastable to ``x``, or ``"black"``/``"white"``/``"mean"`` per sample)
    and the score is recorded:

    .. math:: s_{b,i} = \mathrm{softmax}\big(f(x_b \odot (1 - m_i) + \text{baseline} \odot m_i)\big)_{c_b},
              \qquad \mathrm{AUC}_b = \mathrm{trapz}(s_b, k / HW)

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
    _prepare(model, x, maps, chunk_size)
    end = baseline_tensor(baseline, x, "baseline")
    s = scorer(model, params, x, target, softmax=softmax, hooks=hooks)
    counts, fractions = _steps(steps, maps[0].numel())
    return curve(fractions, _moved(s, x, ranks(maps, "most"), counts, x, end, chunk_size))


def blurred(x: Tensor, sigma: float) -> Tensor:
    r"""``x`` blurred by a Gaussian of std ``sigma`` px per spatial axis (radius ``ceil(3 sigma)``, edges replicated).

    .. math:: k(t) \propto e^{-t^2 / 2\sigma^2}, \quad |t| \le \lceil 3\sigma \rceil, \quad \textstyle\sum k = 1

    ``sigma = 0`` returns ``x``. A constant image stays constant. Works on ``(B, C, H, W)`` and volumes.

    Example:
        >>> import torch
        >>> from camfn.metrics import blurred
        >>> bool(torch.allclose(blurred(torch.full((1, 3, 8, 8), 0.5), 2.0), torch.tensor(0.5)))
        True
    """
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma >= 0:
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


@metric(needs=("model", "maps"), higher_is_better=True, output="curve")
def insertion(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    steps: int = 32,
    blur: float | Tensor = 5.0,
    softmax: bool = True,
    chunk_size: ChunkSize = "auto",
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
    _prepare(model, x, maps, chunk_size)
    start = baseline_tensor(blur, x, "blur") if isinstance(blur, Tensor) else blurred(x, blur)
    s = scorer(model, params, x, target, softmax=softmax, hooks=hooks)
    counts, fractions = _steps(steps, maps[0].numel())
    return curve(fractions, _moved(s, x, ranks(maps, "most"), counts, start, x, chunk_size))


@metric(needs=("model", "maps"), higher_is_better=False, output="curve")
def pixel_flipping(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    rule: str = "rise",
    steps: int = 32,
    features_in_step: int = 1,
    baseline: float | str | Tensor = 0.0,
    softmax: bool = True,
    chunk_size: ChunkSize = "auto",
    hooks: HookPolicy = "error",
) -> Curve:
    r"""Pixel flipping (Bach et al., 2015): the most relevant features set to ``baseline``, cumulatively.

    ``rule="rise"`` (default): :func:`deletion`'s steps and AUC (``steps`` increments from 0 to all pixels, the
    unperturbed point included, area over ``[0, 1]``). ``rule="quantus"``: Quantus 0.6 ``PixelFlipping``'s
    rule: step :math:`i = 1..\lceil N/k \rceil` flips the first :math:`\min(ik, N)` features
    (``k = features_in_step``, no unperturbed point) and ``auc`` is ``trapz(scores, dx=1)`` (its
    ``return_auc_per_sample``, unnormalised; Quantus itself calls ``np.trapz``, gone in numpy >= 2.4).
    ``fractions`` are the flipped shares. Quantus's ``"black"`` baseline is the per-image minimum
    (``baseline="black"`` here).

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, maps = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
        >>> c = camfn.metrics.pixel_flipping(model, camfn.params(model), x, maps, rule="quantus", features_in_step=3)
        >>> c.fractions.mul(16).tolist()
        [3.0, 6.0, 9.0, 12.0, 15.0, 16.0]
    """
    if rule not in ("rise", "quantus"):
        raise OptionError(f"rule={rule!r}: use 'rise' (steps from 0 to all pixels) or 'quantus' (features_in_step)")
    if rule == "rise":
        return deletion(model, params, x, maps, target, steps=steps, baseline=baseline, softmax=softmax,
                        chunk_size=chunk_size, hooks=hooks)  # fmt: skip
    _prepare(model, x, maps, chunk_size)
    k = check_positive("features_in_step", features_in_step, "features flipped per step")
    end = baseline_tensor(baseline, x, "baseline")
    n = maps[0].numel()
    counts = torch.clamp(torch.arange(1, math.ceil(n / k) + 1) * k, max=n)
    s = scorer(model, params, x, target, softmax=softmax, hooks=hooks)
    scores = _moved(s, x, ranks(maps, "most"), counts, x, end, chunk_size)
    auc = torch.trapezoid(scores, dx=1.0, dim=1) if scores.shape[1] > 1 else torch.zeros_like(scores[:, 0])
    return Curve(counts.to(scores.device, scores.dtype) / n, scores, auc)


def _patch_ids(shape: tuple[int, int], patch_size: int, device: torch.device) -> Tensor:
    """``(H, W)`` index of each pixel's ``patch_size`` square patch, grid from the top-left, raster order."""
    h, w = shape
    rows = torch.arange(h, device=device) // patch_size
    cols = torch.arange(w, device=device) // patch_size
    return rows[:, None] * math.ceil(w / patch_size) + cols[None, :]


def _segment_ranks(maps: Tensor, ids: Tensor, count: int, order: str, reduce: str) -> Tensor:
    """``(B, H, W)``: each pixel's segment's place in the removal order (segment sums or means of ``maps``)."""
    b = maps.shape[0]
    flat = ids.reshape(b, -1)
    sums = torch.zeros(b, count, dtype=maps.dtype, device=maps.device).scatter_add_(1, flat, maps.reshape(b, -1))
    if reduce == "mean":
        sizes = torch.zeros(b, count, dtype=maps.dtype, device=maps.device)
        sizes.scatter_add_(1, flat, torch.ones_like(maps.reshape(b, -1)))
        sums = sums / sizes.clamp_min(1)
    place = ranks(sums, order)
    return place.gather(1, flat).reshape(maps.shape)


@metric(needs=("model", "maps"), higher_is_better=True, output="curve")
def region_perturbation(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    patch_size: int = 8,
    order: str = "most",
    regions: int = 100,
    baseline: float | str | Tensor = 0.0,
    softmax: bool = True,
    chunk_size: ChunkSize = "auto",
    hooks: HookPolicy = "error",
) -> Curve:
    r"""Region perturbation (Samek et al., 2017): square patches removed in the map's order; the score's drop.

    The image is cut into ``patch_size`` squares from the top-left (the last row/column of patches may be
    smaller); patches are ordered by their map sum, largest first (``order="most"``, MoRF; ``"least"``: LeRF),
    and the first ``k = 1..regions`` are set to ``baseline``:

    .. math:: d_{b,k} = s_b(x) - s_b(x^{(k)}), \qquad
              \mathrm{AOPC}_b = \frac{1}{L + 1} \sum_{k=0}^{L} d_{b,k}

    ``scores`` holds :math:`d_{b,1..L}` (``L = min(regions, patches)``), ``fractions`` the removed pixel
    shares, ``auc`` the AOPC (higher is better for MoRF). Equal to Quantus 0.6 ``RegionPerturbation`` when
    ``patch_size`` divides the image; Quantus centres its padding otherwise.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        >>> x, maps = torch.rand(2, 1, 8, 8), torch.rand(2, 8, 8)
        >>> camfn.metrics.region_perturbation(model, camfn.params(model), x, maps, patch_size=4).scores.shape
        torch.Size([2, 4])
    """
    _prepare(model, x, maps, chunk_size)
    check_images_2d(x, "region_perturbation")
    p = check_positive("patch_size", patch_size, "the side of the square patches in pixels")
    check_positive("regions", regions, "the number of patches to remove")
    ids = _patch_ids(tuple(x.shape[2:]), p, x.device).expand(maps.shape)
    count = math.ceil(x.shape[2] / p) * math.ceil(x.shape[3] / p)
    place = _segment_ranks(maps, ids, count, order, "sum")
    end = baseline_tensor(baseline, x, "baseline")
    s = scorer(model, params, x, target, softmax=softmax, hooks=hooks)
    counts = torch.arange(1, min(regions, count) + 1)
    drops = s.clean[:, None] - _moved(s, x, place, counts, x, end, chunk_size)
    shares = torch.stack([(place < k).flatten(1).double().mean(1) for k in counts.tolist()]).mean(1)
    return Curve(shares.to(drops.dtype), drops, drops.sum(1) / (drops.shape[1] + 1))


@metric(needs=("model", "maps"), higher_is_better=True)
def irof(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    segments: Tensor | None = None,
    patch_size: int = 8,
    baseline: float | str | Tensor = "mean",
    softmax: bool = True,
    chunk_size: ChunkSize = "auto",
    hooks: HookPolicy = "error",
) -> Tensor:
    r"""IROF, iterative removal of features (Rieger & Hansen, 2020): area over the relative-score curve, ``(B,)``.

    Segments (``segments``: ``(B, H, W)`` integer labels ``0..S-1``, e.g. SLIC superpixels; default: ``patch_size``
    squares) are ordered by their mean map value, largest first, and removed cumulatively (set to
    ``baseline``; ``"mean"``: the image's own mean). With :math:`r_{b,k} = s_b(x^{(k)}) / s_b(x)`:

    .. math:: \mathrm{IROF}_b = S_b - \mathrm{trapz}(r_{b,1..S_b}, dx=1)

    (Quantus 0.6 ``IROF``'s "area over the curve"; higher is better). Deviations from Quantus, which only
    matches with a numeric baseline: its ``"mean"`` is the mean over the whole *batch* of the *current*
    perturbed images, and it calls ``np.trapz`` (gone in numpy >= 2.4). camfn needs no scikit-image: pass
    Quantus's or skimage's SLIC labels as ``segments`` for its default segmentation.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        >>> x, maps = torch.rand(2, 1, 8, 8), torch.rand(2, 8, 8)
        >>> camfn.metrics.irof(model, camfn.params(model), x, maps, patch_size=4).shape
        torch.Size([2])
    """
    _prepare(model, x, maps, chunk_size)
    check_images_2d(x, "irof")
    if segments is None:
        p = check_positive("patch_size", patch_size, "the side of the square segments in pixels")
        segments = _patch_ids(tuple(x.shape[2:]), p, x.device).expand(maps.shape)
    if not isinstance(segments, Tensor) or segments.shape != maps.shape or segments.is_floating_point():
        raise InputError(f"segments must be an integer tensor of the maps' shape {tuple(maps.shape)} (labels 0..S-1)")
    segments = segments.to(device=x.device, dtype=torch.long)
    if bool((segments < 0).any()):
        raise InputError("segments has negative labels; use labels 0..S-1")
    sizes = torch.stack([torch.bincount(s.flatten(), minlength=int(segments.max()) + 1) for s in segments])
    if bool(
        (
            (sizes == 0) & (torch.arange(sizes.shape[1], device=x.device) <= segments.flatten(1).amax(1, keepdim=True))
        ).any()
    ):
        raise InputError(
            "segments must use every label 0..S-1 of each sample (relabel them, e.g. torch.unique(return_inverse=True))"
        )
    count = sizes.shape[1]
    place = _segment_ranks(maps, segments, count, "most", "mean")
    end = baseline_tensor(baseline, x, "baseline")
    s = scorer(model, params, x, target, softmax=softmax, hooks=hooks)
    used = segments.flatten(1).amax(1) + 1  # S_b
    scores = _moved(s, x, place, torch.arange(1, count + 1), x, end, chunk_size)
    valid = torch.arange(count, device=x.device)[None] < used[:, None]
    ratio = torch.where(valid, scores / s.clean[:, None], torch.zeros_like(scores))
    return used.to(ratio.dtype) - torch.trapezoid(ratio, dx=1.0, dim=1)


def _uniform_draws(shape: tuple[int, ...], seed: Seed, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=generator(seed), dtype=torch.float64).to(device=like.device, dtype=like.dtype)


@metric(needs=("model", "maps"), higher_is_better=True)
def monotonicity_correlation(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    features_in_step: int = 1,
    samples: int = 100,
    baseline: float | str | Tensor = "uniform",
    eps: float = 1e-5,
    seed: Seed = 0,
    softmax: bool = True,
    chunk_size: ChunkSize = "auto",
    hooks: HookPolicy = "error",
) -> Tensor:
    r"""Monotonicity correlation (Nguyen & Martínez, 2020): Spearman of relevance and score change, ``(B,)``.

    Features are taken in increasing map order, ``k = features_in_step`` at a time; group ``j`` alone is set
    to the baseline (``"uniform"``: one seeded :math:`U(0, 1)` value per group, copy and sample, ``samples``
    copies; a fixed baseline needs ``samples=1``):

    .. math:: v_{b,j} = \frac{1}{n}\sum_{t=1}^{n} \frac{(s_b(x^{(j,t)}) - s_b(x))^2}{s_b(x)^2}, \quad
              \rho_b = \mathrm{spearman}_j\Big(\sum_{i \in G_j} L_{b,i},\ v_{b,j}\Big)

    (the division by :math:`s_b(x)^2` is skipped where :math:`|s_b(x)| < \varepsilon`). Equal to Quantus 0.6
    ``MonotonicityCorrelation`` on one-channel inputs (Quantus counts every channel of a pixel as a feature).

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, maps = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
        >>> camfn.metrics.monotonicity_correlation(model, camfn.params(model), x, maps, samples=2).shape
        torch.Size([2])
    """
    _prepare(model, x, maps, chunk_size)
    k = check_positive("features_in_step", features_in_step, "features perturbed per group")
    n = check_positive("samples", samples, "perturbed copies per group")
    s = scorer(model, params, x, target, softmax=softmax, hooks=hooks)
    b, features = maps.shape[0], maps[0].numel()
    place = ranks(maps, "least")  # (B, N)
    groups = math.ceil(features / k)
    group_of = (place // k).reshape(b, 1, *x.shape[2:])
    if isinstance(baseline, str) and baseline == "uniform":
        values = _uniform_draws((groups, n, b), seed, x).reshape(groups * n, b, *[1] * (x.ndim - 1))
    else:
        values = baseline_tensor(baseline, x, "baseline").unsqueeze(0).expand(groups * n, *x.shape)

    def make(idx: Tensor) -> Tensor:
        hit = group_of.unsqueeze(0) == (idx // n).reshape(-1, *[1] * x.ndim)
        return torch.where(hit, values[idx].expand(idx.shape[0], *x.shape), x)

    perturbed = run_copies(s.score, x, make, groups * n, chunk_size).reshape(b, groups, n)
    y = s.clean[:, None]
    inv = torch.where(y.abs() >= eps, 1 / y.abs().clamp_min(eps), torch.ones_like(y)) ** 2
    variance = (perturbed - y[..., None]).square().mean(2) * inv
    relevance = torch.zeros(b, groups, dtype=maps.dtype, device=maps.device)
    relevance.scatter_add_(1, place // k, maps.flatten(1))
    return spearman(relevance.to(variance.dtype), variance)


@metric(needs=("model", "maps"), higher_is_better=True)
def faithfulness_correlation(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    runs: int = 100,
    subset_size: int = 224,
    baseline: float | str | Tensor = 0.0,
    subsets: Tensor | None = None,
    seed: Seed = 0,
    softmax: bool = True,
    chunk_size: ChunkSize = "auto",
    hooks: HookPolicy = "error",
) -> Tensor:
    r"""Faithfulness correlation (Bhatt et al., IJCAI 2020): Pearson of subset relevance and score drop, ``(B,)``.

    ``runs`` random subsets :math:`S_t` of ``subset_size`` features (seeded; or ``subsets`` ``(B, runs, k)``
    feature indices) are each set to ``baseline``:

    .. math:: \rho_b = \mathrm{pearson}_t\Big(\sum_{i \in S_t} L_{b,i},\ s_b(x) - s_b(x^{(S_t)})\Big)

    Equal to Quantus 0.6 ``FaithfulnessCorrelation`` given its subsets (on one-channel inputs: Quantus draws
    channel-wise features).

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, maps = torch.rand(2, 1, 4, 4), torch.rand(2, 4, 4)
        >>> p = camfn.params(model)
        >>> camfn.metrics.faithfulness_correlation(model, p, x, maps, runs=5, subset_size=4).shape
        torch.Size([2])
    """
    _prepare(model, x, maps, chunk_size)
    b, features = maps.shape[0], maps[0].numel()
    if subsets is None:
        check_positive("runs", runs, "random subsets")
        check_positive("subset_size", subset_size, "features per subset")
        if subset_size > features:
            raise OptionError(f"subset_size={subset_size} exceeds the {features} features of a map; pass a smaller one")
        order = torch.rand(b, runs, features, generator=generator(seed), dtype=torch.float64).argsort(-1)
        subsets = order[..., :subset_size]
    if not isinstance(subsets, Tensor) or subsets.ndim != 3 or subsets.shape[0] != b or subsets.is_floating_point():
        raise InputError(f"subsets must be a ({b}, runs, k) long tensor of feature indices")
    subsets = subsets.to(x.device, torch.long)
    t = subsets.shape[1]
    hit = torch.zeros(t, b, features, dtype=torch.bool, device=x.device)
    hit.scatter_(2, subsets.transpose(0, 1), True)
    hit = hit.reshape(t, b, 1, *x.shape[2:])
    end = baseline_tensor(baseline, x, "baseline")
    s = scorer(model, params, x, target, softmax=softmax, hooks=hooks)
    perturbed = run_copies(s.score, x, lambda idx: torch.where(hit[idx], end, x), t, chunk_size)
    relevance = maps.flatten(1).gather(1, subsets.flatten(1)).reshape(b, t, -1).sum(2)
    return pearson(relevance.to(perturbed.dtype), s.clean[:, None] - perturbed)


@metric(needs=("model", "maps"), higher_is_better=False)
def infidelity(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    perturbation: str = "gaussian",
    samples: int = 10,
    std: float = 0.1,
    patch_sizes: tuple[int, ...] = (4,),
    baseline: float | str | Tensor = "black",
    seed: Seed = 0,
    softmax: bool = False,
    chunk_size: ChunkSize = "auto",
    hooks: HookPolicy = "error",
) -> Tensor:
    r"""Infidelity (Yeh et al., NeurIPS 2019): the squared error of the map's linear prediction, ``(B,)``.

    .. math:: \mathrm{INFD}_b = \mathbb{E}_I\Big[\Big(\sum_{c,i} I_{b,ci} L_{b,i}
              - \big(s_b(x) - s_b(x - I)\big)\Big)^2\Big]

    ``perturbation="gaussian"`` (the paper's noisy baseline): ``samples`` seeded draws
    :math:`I \sim N(0, \text{std}^2)`. ``"patches"`` (Quantus 0.6 ``Infidelity``'s scheme): for each size in
    ``patch_sizes``, square patches in raster order are set to ``baseline`` cumulatively, :math:`I = x - x^{(j)}`,
    the mean over patches and sizes (equal to Quantus when the sizes divide the image; its loop over
    ``n_perturb_samples`` repeats the same deterministic perturbations). Scores default to logits
    (``softmax=False``): the map explains a logit. Lower is better.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
        >>> x, p = torch.rand(1, 1, 2, 2), camfn.params(model)
        >>> maps = p["1.weight"][1].reshape(1, 2, 2)  # a linear model's exact attribution
        >>> float(camfn.metrics.infidelity(model, p, x, maps, 1)) < 1e-12
        True
    """
    _prepare(model, x, maps, chunk_size)
    if perturbation == "gaussian":
        n = check_positive("samples", samples, "noise draws")
        if isinstance(std, bool) or not isinstance(std, int | float) or not std > 0:
            raise OptionError(f"std={std!r}: use a noise standard deviation > 0")
        g = generator(seed)
        noise = torch.randn((n, *x.shape), generator=g, dtype=torch.float64).mul(std).to(x.device, x.dtype)
    elif perturbation == "patches":
        check_images_2d(x, "infidelity(perturbation='patches')")
        end = baseline_tensor(baseline, x, "baseline")
        noise = []
        for size in patch_sizes:
            ids = _patch_ids(tuple(x.shape[2:]), check_positive("patch_sizes", size, "patch side"), x.device)
            for j in range(int(ids.max()) + 1):
                noise.append(torch.where((ids <= j).expand(x.shape), x - end, torch.zeros_like(x)))
        noise = torch.stack(noise)
    else:
        raise OptionError(f"perturbation={perturbation!r}: use 'gaussian' (the paper) or 'patches' (Quantus 0.6)")
    s = scorer(model, params, x, target, softmax=softmax, hooks=hooks)
    perturbed = run_copies(s.score, x, lambda idx: x - noise[idx], noise.shape[0], chunk_size)  # (B, n)
    linear = (noise * maps.unsqueeze(1).to(noise.dtype)).flatten(2).sum(2).T
    errors = (linear.to(perturbed.dtype) - (s.clean[:, None] - perturbed)).square()
    if perturbation == "patches":  # the mean per patch size, then over sizes (Quantus)
        sizes = [int(_patch_ids(tuple(x.shape[2:]), p, x.device).max()) + 1 for p in patch_sizes]
        return torch.stack([part.mean(1) for part in errors.split(sizes, dim=1)]).mean(0)
    return errors.mean(1)
