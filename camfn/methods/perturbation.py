r"""The perturbation family: channel weights from forward passes only.

``ablationcam`` runs the network *before* the layer once and the part *after* it once per ablated channel;
``scorecam``, ``sscam`` and ``iscam`` score the input masked by each (upsampled, normalised) channel. All of
them evaluate channels in chunks: one forward sees about ``chunk_size`` perturbed copies (``"auto"``: sized
by a work budget, :mod:`camfn.chunks`), so memory is bounded by one forward of a chunk, never
``B x K x C x H x W`` at once, and the result does not depend on ``chunk_size``. The default target
(``None``) is the top-1 class of the clean input, fixed for every perturbed copy. Notation as in
:mod:`camfn.methods.gradient`; ``S`` the target score, ``y = S(x)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..driver import Layer, method, weighted
from ..errors import TargetError
from ..noise import gaussians
from ..options import Option, boolean, choice, chunk, nonnegative, positive_int, seed
from ..runtime import concrete

__all__ = ["ablationcam", "iscam", "masks_normalize_first", "masks_upsample_first", "scorecam", "sscam"]

NEAR_ZERO = 1e-6
CHUNK = Option("auto", chunk)


# ---------------------------------------------------------------------------------------- ablation
def _ablation_weights(y: Tensor, yk: Tensor, relative: bool) -> Tensor:
    """``w_k = (y - y_k) / y`` (or ``y - y_k``) for ``y`` ``(B, T)`` and ``y_k`` ``(K, B, T)`` -> ``(B, T, K)``."""
    drop = (y.unsqueeze(0) - yk).permute(1, 2, 0)
    if not relative:
        return drop
    small = y.abs() < NEAR_ZERO
    if concrete(y) and bool(small.any()):
        b, t = (int(i) for i in small.nonzero()[0])
        raise TargetError(
            f"ablationcam weights (y - y_k) / y are undefined: the score of sample {b} (target {t}) is "
            f"{float(y[b, t]):.3g}, within {NEAR_ZERO:g} of 0. Explain a target whose score is not ~0, or pass "
            "relative=False for w_k = y - y_k (the same map up to the sign of y)"
        )
    safe = torch.where(small, torch.full_like(y, NEAR_ZERO).copysign(y), y)
    return drop / safe.unsqueeze(-1)


@method(
    needs="cut",
    options={"chunk_size": CHUNK, "ablation": Option("zero", choice("zero", "min")), "relative": Option(True, boolean)},
)
def ablationcam(at: Layer) -> Tensor:
    r"""Ablation-CAM (Desai & Ramaswamy, WACV 2020).

    .. math:: w_k = \frac{y - y_k}{y}, \qquad y_k = S\big(\mathrm{tail}(A^{(k)})\big), \qquad L = \sum_k w_k A_k

    where :math:`A^{(k)}` is :math:`A` with channel :math:`k` set to 0 (``ablation="zero"``) or, for layers
    with negative activations, to :math:`\min A - 10^7` (``ablation="min"``, per sample; grad-cam's
    choice, without its compounding across a batch). The network up to the layer runs once; only the
    tail runs per channel, ``chunk_size`` ablated copies at a time. A score :math:`y` within ``1e-6`` of 0
    raises :class:`~camfn.errors.TargetError` (``relative=False`` uses :math:`w_k = y - y_k`).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.ablationcam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 3).shape
        torch.Size([1, 64, 64])
    """
    a = at.a.squeeze(1)  # (B, K, *spatial)
    k, spatial = a.shape[1], [1] * (a.ndim - 2)
    fill = torch.zeros((), dtype=a.dtype, device=a.device)
    if at.options["ablation"] == "min":
        fill = (a.amin(tuple(range(1, a.ndim))) - 1e7).reshape(-1, 1, *spatial)
    channels = torch.arange(k, device=a.device).reshape(1, 1, k, *spatial)

    def ablate(idx: Tensor) -> Tensor:
        hit = channels == idx.reshape(-1, 1, 1, *spatial)  # (c, 1, K, 1, ...)
        return at.score_ablated(torch.where(hit, fill, a.unsqueeze(0)))  # (c, B, T)

    per = at.copies(a.shape[1:])
    yk = at.chunks(ablate, k, None if per is None else max(1, per // a.shape[0]), "ablationcam")
    return weighted(_ablation_weights(at.y, yk, at.options["relative"]), at.a)


# ------------------------------------------------------------------------------------------- score
def _minmax(t: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    low = t.amin(dims, keepdim=True)
    return (t - low) / (t.amax(dims, keepdim=True) - low + eps)


def _mode(a: Tensor) -> str:
    return "bilinear" if a.ndim == 4 else "trilinear"


def masks_upsample_first(a: Tensor, size: Sequence[int]) -> Tensor:
    """grad-cam's ScoreCAM masks: bilinear upsampling with ``align_corners=True``, then per-channel
    min-max ``(M - min) / (max - min + 1e-8)`` at input resolution."""
    up = F.interpolate(a, size=tuple(size), mode=_mode(a), align_corners=True)
    return _minmax(up, tuple(range(2, a.ndim)), 1e-8)


def masks_normalize_first(a: Tensor, size: Sequence[int]) -> Tensor:
    """torchcam's masks: per-channel min-max ``(A - min) / (max - min + 1e-8)`` at feature resolution,
    then bilinear upsampling with ``align_corners=False``."""
    norm = _minmax(a, tuple(range(2, a.ndim)), 1e-8)
    return F.interpolate(norm, size=tuple(size), mode=_mode(a), align_corners=False)


def _masked_scores(
    at: Layer,
    masks: Callable[[Tensor, Sequence[int]], Tensor],
    desc: str,
    scale: float = 1.0,
    noise: Tensor | None = None,
) -> Tensor:
    """``S(scale * x * (M_k + noise_k))`` for every channel ``k``: ``(K, B, T)``.

    ``masks(a_chunk, size)`` builds the masks of a chunk of channels at input resolution, so at most one
    chunk of masks and masked inputs exists at once. Without noise (and outside transforms), channels whose
    min-max normalised maps are equal in every sample have the same mask (up to rounding), so each distinct
    one is scored once: all constant channels (zero after a ReLU, typically: mask 0), and at small maps the
    many channels that are positive at one position only.
    """
    x, a = at.x, at.a.squeeze(1)
    k = a.shape[1]

    def score_chunk(idx: Tensor) -> Tensor:
        m = masks(a.index_select(1, idx), x.shape[2:])
        if noise is not None:
            m = m + noise.index_select(0, idx).unsqueeze(0)
        return at.score_inputs((scale * x.unsqueeze(1) * m.unsqueeze(2)).movedim(1, 0))  # (c, B, C, *spatial)

    copies = at.copies(x.shape[1:])
    per = None if copies is None else max(1, copies // x.shape[0])
    if noise is None and concrete(a):
        rows = _minmax(a, tuple(range(2, a.ndim)), 1e-8).movedim(1, 0).flatten(1)  # (K, B * spatial)
        distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
        if distinct.shape[0] < k:
            first = torch.full((distinct.shape[0],), k, dtype=inverse.dtype, device=inverse.device)
            first = first.scatter_reduce(0, inverse, torch.arange(k, device=inverse.device), "amin")
            return at.chunks(lambda i: score_chunk(first[i]), first.numel(), per, desc)[inverse]
    return at.chunks(score_chunk, k, per, desc)


@method(needs="forward", options={"chunk_size": CHUNK})
def scorecam(at: Layer) -> Tensor:
    r"""Score-CAM (Wang et al., CVPRW 2020).

    .. math:: M_k = \operatorname{minmax}(\operatorname{up}(A_k)), \quad s_k = S(x \odot M_k), \quad
              w = \operatorname{softmax}_k(s), \quad L = \sum_k w_k A_k

    Masks follow grad-cam exactly (:func:`masks_upsample_first`: ``align_corners=True`` upsampling, then
    min-max with ``+1e-8``). Channels with the same mask (all-zero ones, typically) are scored once.
    ``K`` forward passes of the whole network, ``chunk_size`` masked inputs per forward (``"auto"``: by a work budget).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.scorecam(model, camfn.params(model), torch.randn(1, 3, 32, 32), "layer2", 3).shape
        torch.Size([1, 32, 32])
    """
    s = _masked_scores(at, masks_upsample_first, "scorecam")
    return weighted(s.permute(1, 2, 0).softmax(-1), at.a)


@method(
    needs="forward",
    options={
        "n": Option(35, positive_int),
        "std": Option(2.0, nonnegative),
        "seed": Option(0, seed),
        "chunk_size": CHUNK,
    },
)
def sscam(at: Layer) -> Tensor:
    r"""SS-CAM (Wang et al., 2020): Score-CAM with noisy masks.

    .. math:: w = \operatorname{softmax}_k\Big(\frac{1}{n}\sum_{i=1}^{n}
              S\big(x \odot (M_k + \epsilon_{ik})\big) - y\Big),
              \quad \epsilon_{ik} \sim \mathcal N(0, \mathrm{std}^2) \text{ at input resolution}

    Masks follow torchcam (:func:`masks_normalize_first`). Noise: for each sample ``i``, one ``(K, H, W)``
    draw from ``seed``, shared by the batch (drawn in the order torchcam draws it for one image, so with
    ``torch.manual_seed(s)`` torchcam and ``seed=s`` agree).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> x = torch.randn(1, 3, 32, 32)
        >>> camfn.sscam(model, camfn.params(model), x, "layer2", 3, n=2, seed=1).shape
        torch.Size([1, 32, 32])
    """
    x, opts, n = at.x, at.options, at.options["n"]
    k = at.a.shape[2]
    total = torch.zeros(k, x.shape[0], 1, dtype=x.dtype, device=x.device)
    draws = gaussians((k, *x.shape[2:]), opts["std"], opts["seed"], n, dtype=x.dtype, device=x.device)
    for i, noise in enumerate(draws):
        total = total + _masked_scores(at, masks_normalize_first, f"sscam {i + 1}/{n}", noise=noise)
    return weighted((total / n - at.y.unsqueeze(0)).permute(1, 2, 0).softmax(-1), at.a)


@method(needs="forward", options={"n": Option(10, positive_int), "chunk_size": CHUNK})
def iscam(at: Layer) -> Tensor:
    r"""IS-CAM (Naidu et al., 2020): Score-CAM integrated along the mask's scale.

    .. math:: w = \operatorname{softmax}_k\Big(\frac{1}{n}\sum_{i=1}^{n} S(c_i\, x \odot M_k) - y\Big),
              \quad c_i = \sum_{j \le i} \frac{j}{n}

    Masks follow torchcam (:func:`masks_normalize_first`); deterministic.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.iscam(model, camfn.params(model), torch.randn(1, 3, 32, 32), "layer2", 3, n=2).shape
        torch.Size([1, 32, 32])
    """
    n = at.options["n"]
    total: Tensor | int = 0
    coeff = 0.0
    for i in range(n):
        coeff += (i + 1) / n
        total = total + _masked_scores(at, masks_normalize_first, f"iscam {i + 1}/{n}", scale=coeff)
    return weighted((total / n - at.y.unsqueeze(0)).permute(1, 2, 0).softmax(-1), at.a)
