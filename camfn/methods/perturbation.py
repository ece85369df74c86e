r"""The perturbation family: channel weights from forward passes only.

``ablationcam`` runs the network *before* the layer once and the part *after* it once per ablated channel;
``scorecam``, ``sscam`` and ``iscam`` score the input masked by each (upsampled, normalised) channel. All of
them evaluate channels in chunks: one batched forward sees about ``chunk_size`` perturbed copies
(``max(1, chunk_size // B)`` channels x ``B`` samples), so memory is bounded by one forward of
``chunk_size`` images, never ``B x K x C x H x W`` at once, and the result does not depend on ``chunk_size``.
The default target (``None``) is the top-1 class of the clean input, fixed for every perturbed copy.
Notation as in :mod:`camfn.methods.gradient`; ``S`` the target score, ``y = S(x)``.

Extra keyword options: ``chunk_size`` (perturbed copies per forward), ``progress`` (a tqdm bar), and for the noisy
methods ``n``, ``std``, ``seed`` (an int or a ``torch.Generator``: same seed, same map).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Unpack

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from ..errors import OptionError, TargetError
from ..forward import Params, activations, channels_last, chunked
from ..graph import Layer, Split, engine, split
from ..inference import bind
from ..layout import pull_back
from ..noise import Seed, gaussians
from ..smoothing import smoothable
from ..targets import Output, Target, concrete, fixed
from .core import Maps, Options, _options, finalize, num_classes, prepare, reduce, to_maps

__all__ = ["ablationcam", "iscam", "scorecam", "sscam"]

Layers = Layer | Sequence[Layer] | None
ScoreFn = Callable[[Tensor], Tensor]

NEAR_ZERO = 1e-6


def _as_bt(s: Tensor, batch: int) -> Tensor:
    return s.reshape(batch, -1)


def _score_chunk(run: Callable[..., Any], score: ScoreFn, inputs: Tensor, *extras: Any) -> Tensor:
    """Scores ``(c, B, T)`` of a chunk of perturbed inputs ``(c, B, ...)``.

    The network runs once on the flattened ``c * B`` batch (``vmap`` over the chunk costs ~60% more on
    CPU); tensor ``extras`` are repeated along. Non-tensor extras (sizes read before a cut) pin the batch
    size, so those chunks run under ``vmap`` instead. Only the cheap score selection is ``vmap``-ed.
    """
    c, b = inputs.shape[:2]
    if all(isinstance(e, Tensor) and e.ndim and e.shape[0] == b for e in extras):
        flat = [e.unsqueeze(0).expand(c, *e.shape).flatten(0, 1) for e in extras]
        batch = inputs.flatten(0, 1)
        if batch.ndim == 4 and torch._C._functorch.peek_interpreter_stack() is None:  # see channels_last
            batch = batch.contiguous(memory_format=torch.channels_last)
        out = torch.utils._pytree.tree_map(
            lambda o: o.unflatten(0, (c, b)) if isinstance(o, Tensor) else o, run(batch, *flat)
        )
        return vmap(lambda o: _as_bt(score(o), b))(out)
    return vmap(lambda i: _as_bt(score(run(i, *extras)), b))(inputs)


def _contributions(weights: Tensor, a: Tensor) -> Tensor:
    """``w_k A_k`` for weights ``(B, T, K)`` and activation ``(B, K, *spatial)`` -> ``(B, T, K, *spatial)``."""
    return weights.reshape(*weights.shape, *([1] * (a.ndim - 2))) * a.unsqueeze(1)


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


@smoothable
def ablationcam(
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Layers = None,
    target: Target = None,
    *,
    chunk_size: int | None = 64,
    ablation: Literal["zero", "min"] = "zero",
    relative: bool = True,
    progress: bool = False,
    **options: Unpack[Options],
) -> Maps:
    r"""Ablation-CAM (Desai & Ramaswamy, WACV 2020).

    .. math:: w_k = \frac{y - y_k}{y}, \qquad y_k = S\big(\mathrm{tail}(A^{(k)})\big), \qquad L = \sum_k w_k A_k

    where :math:`A^{(k)}` is :math:`A` with channel :math:`k` set to 0 (``ablation="zero"``) or, for layers
    with negative activations, to :math:`\min A - 10^7` (``ablation="min"``, per sample; grad-cam's
    choice, without its compounding across a batch). The network up to the layer runs once; only the
    tail runs per channel, on about ``chunk_size`` ablated copies at a time. A score :math:`y` within ``1e-6`` of 0
    raises :class:`~camfn.errors.TargetError` (``relative=False`` uses :math:`w_k = y - y_k`).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.ablationcam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 3).shape
        torch.Size([1, 64, 64])
    """
    if ablation not in ("zero", "min"):
        raise OptionError(f"ablation={ablation!r}: use 'zero' or 'min'")
    opts = _options(options)
    traced, nodes, single = prepare(model, x, layer, opts)
    raw, squeeze = [], True
    for node in nodes:
        weights, a, squeeze = _ablation(
            split(traced, node),
            params,
            x,
            target,
            num_classes(traced, x, opts["output"]),
            ablation,
            relative,
            chunk_size,
            progress,
            opts["output"],
            layout=to_maps(traced, model, node, x, opts) if opts["layout"] is not None else None,
        )
        raw.append(reduce(_contributions(weights, a), opts["eigen_smooth"]))
    return finalize(raw, x, opts, squeeze, single)


def _ablation(
    cut: Split,
    params: Params,
    x: Tensor,
    target: Target,
    n_classes: int | None,
    ablation: str,
    relative: bool,
    chunk_size: int | None,
    progress: bool,
    selector: Output = None,
    layout: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """Ablation weights ``(B, T, K)`` at one cut, the activation, and whether ``T`` is squeezed.

    With a ``layout`` the channels are ablated in the layout's ``(B, K, *spatial)`` frame and carried
    back to the layer's frame (:func:`camfn.layout.pull_back`) before the tail runs.
    """
    layer_a, extras = cut.head(params, x)
    output = cut.tail(params, layer_a, *extras)
    a = layer_a if layout is None else layout(layer_a)

    def to_layer(maps: Tensor) -> Tensor:  # (c, B, K, ...) in the map frame -> the layer's frame
        if layout is None:
            return maps
        like = layer_a.unsqueeze(0).expand(maps.shape[0], *layer_a.shape).flatten(0, 1)
        back = pull_back(layout, like, (maps - a.unsqueeze(0)).flatten(0, 1)).unflatten(0, maps.shape[:2])
        return layer_a.unsqueeze(0) + back

    fast = channels_last(params)
    score = fixed(target, output, x.shape[0], n_classes, selector)
    y = score(output)
    squeeze = y.ndim == 1
    k, spatial = a.shape[1], [1] * (a.ndim - 2)
    fill = torch.zeros((), dtype=a.dtype, device=a.device)
    if ablation == "min":
        fill = (a.amin(tuple(range(1, a.ndim))) - 1e7).reshape(-1, 1, *spatial)
    channels = torch.arange(k, device=a.device).reshape(1, 1, k, *spatial)

    def ablate(idx: Tensor) -> Tensor:
        hit = channels == idx.reshape(-1, 1, 1, *spatial)  # (c, 1, K, 1, ...)
        ablated = torch.where(hit, fill, a.unsqueeze(0))  # (c, B, K, ...)
        return _score_chunk(lambda *args: cut.tail(fast, *args), score, to_layer(ablated), *extras)

    yk = chunked(ablate, k, _channels(chunk_size, x.shape[0]), device=a.device, progress=progress, desc="ablationcam")
    return _ablation_weights(_as_bt(y, x.shape[0]), yk, relative), a, squeeze


# ------------------------------------------------------------------------------------------- score
def _minmax(t: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    low = t.amin(dims, keepdim=True)
    return (t - low) / (t.amax(dims, keepdim=True) - low + eps)


def masks_upsample_first(a: Tensor, size: Sequence[int]) -> Tensor:
    """grad-cam's ScoreCAM masks: bilinear upsampling with ``align_corners=True``, then per-channel
    min-max ``(M - min) / (max - min + 1e-8)`` at input resolution."""
    up = F.interpolate(a, size=tuple(size), mode="bilinear" if a.ndim == 4 else "trilinear", align_corners=True)
    return _minmax(up, tuple(range(2, a.ndim)), 1e-8)


def masks_normalize_first(a: Tensor, size: Sequence[int]) -> Tensor:
    """torchcam's masks: per-channel min-max ``(A - min) / (max - min + 1e-8)`` at feature resolution,
    then bilinear upsampling with ``align_corners=False``."""
    norm = _minmax(a, tuple(range(2, a.ndim)), 1e-8)
    return F.interpolate(norm, size=tuple(size), mode="bilinear" if a.ndim == 4 else "trilinear", align_corners=False)


def _channels(chunk_size: int | None, batch: int) -> int | None:
    """Channels per chunk so that one forward sees about ``chunk_size`` perturbed copies (``B`` per channel)."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: use a positive int, or None for one chunk")
    return max(1, chunk_size // batch)


def _masked_scores(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    a: Tensor,
    masks: Callable[[Tensor, Sequence[int]], Tensor],
    chunk_size: int | None,
    progress: bool,
    desc: str,
    scale: float = 1.0,
    noise: Tensor | None = None,
) -> Tensor:
    """``S(scale * x * (M_k + noise_k))`` for every channel ``k``: ``(K, B, T)``.

    ``masks(a_chunk, size)`` builds the masks of a chunk of channels at input resolution, so at most
    ``chunk_size`` masks and masked inputs exist at once; ``forward`` scores a chunk ``(c, B, C, *spatial)``.
    A constant channel (all zero after a ReLU, typically) gives the mask 0 and the masked input 0: when
    that holds for the whole batch and there is no noise, it is scored once (outside transforms).
    """
    k = a.shape[1]

    def score_chunk(idx: Tensor) -> Tensor:
        m = masks(a.index_select(1, idx), x.shape[2:])
        if noise is not None:
            m = m + noise.index_select(0, idx).unsqueeze(0)
        return forward((scale * x.unsqueeze(1) * m.unsqueeze(2)).movedim(1, 0))  # (c, B, C, *spatial)

    per = _channels(chunk_size, x.shape[0])
    if noise is None and concrete(a):
        span = a.flatten(2).amax(-1) - a.flatten(2).amin(-1)
        flat = span.eq(0).all(0)  # (K,): constant channel in every sample -> zero mask
        if bool(flat.any()):
            live = (~flat).nonzero().flatten()
            zero = forward(torch.zeros_like(x).unsqueeze(0))[0]
            out = zero.unsqueeze(0).expand(k, *zero.shape).clone()
            if live.numel():
                pick = lambda i: score_chunk(live[i])  # noqa: E731
                out[live] = chunked(pick, live.numel(), per, device=live.device, progress=progress, desc=desc)
            return out
    return chunked(score_chunk, k, per, device=a.device, progress=progress, desc=desc)


def _score_family(
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Layers,
    target: Target,
    options: dict[str, Any],
    weights: Callable[[Callable[[Tensor], Tensor], Tensor, Tensor, Tensor], Tensor],
) -> Maps:
    """Shared driver: ``A`` from the head, the clean scores ``y`` ``(B, T)``, then
    ``weights(forward, x, A, y) -> (B, T, K)`` with ``forward`` scoring chunks ``(c, B, ...)``."""
    opts = _options(options)
    traced, nodes, single = prepare(model, x, layer, opts)
    program = traced.program()
    output = program(params, x)
    score = fixed(target, output, x.shape[0], num_classes(traced, x, opts["output"]), opts["output"])
    y = score(output)
    squeeze = y.ndim == 1

    network = bind(traced, channels_last(params), x)  # folded, fused, packed on the CPU

    def forward(inputs: Tensor) -> Tensor:
        return _score_chunk(network, score, inputs)

    _, acts = activations(engine(traced, nodes, with_output=False), params, x)
    acts = tuple(to_maps(traced, model, n, x, opts)(a) for n, a in zip(nodes, acts, strict=True))
    y = _as_bt(y, x.shape[0])
    raw = [reduce(_contributions(weights(forward, x, a, y), a), opts["eigen_smooth"]) for a in acts]
    return finalize(raw, x, opts, squeeze, single)


@smoothable
def scorecam(
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Layers = None,
    target: Target = None,
    *,
    chunk_size: int | None = 8,
    progress: bool = False,
    **options: Unpack[Options],
) -> Maps:
    r"""Score-CAM (Wang et al., CVPRW 2020).

    .. math:: M_k = \operatorname{minmax}(\operatorname{up}(A_k)), \quad s_k = S(x \odot M_k), \quad
              w = \operatorname{softmax}_k(s), \quad L = \sum_k w_k A_k

    Masks follow grad-cam exactly (:func:`masks_upsample_first`: ``align_corners=True`` upsampling, then
    min-max with ``+1e-8``). Channels with an all-zero mask are scored once. ``K`` forward passes of
    the whole network, about ``chunk_size`` masked inputs per forward.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.scorecam(model, camfn.params(model), torch.randn(1, 3, 32, 32), "layer2", 3).shape
        torch.Size([1, 32, 32])
    """

    def weights(forward: Callable[[Tensor], Tensor], x: Tensor, a: Tensor, y: Tensor) -> Tensor:
        s = _masked_scores(forward, x, a, masks_upsample_first, chunk_size, progress, "scorecam")
        return s.permute(1, 2, 0).softmax(-1)

    return _score_family(model, params, x, layer, target, options, weights)


def _check_samples(n: int, std: float | None = None) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise OptionError(f"n={n!r}: the number of samples must be a positive int")
    if std is not None and not std >= 0:
        raise OptionError(f"std={std!r}: the noise standard deviation must be >= 0")


@smoothable
def sscam(
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Layers = None,
    target: Target = None,
    *,
    n: int = 35,
    std: float = 2.0,
    seed: Seed = 0,
    chunk_size: int | None = 8,
    progress: bool = False,
    **options: Unpack[Options],
) -> Maps:
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
    _check_samples(n, std)

    def weights(forward: Callable[[Tensor], Tensor], x: Tensor, a: Tensor, y: Tensor) -> Tensor:
        total = torch.zeros(a.shape[1], x.shape[0], 1, dtype=x.dtype, device=x.device)
        draws = gaussians((a.shape[1], *x.shape[2:]), std, seed, n, dtype=x.dtype, device=x.device)
        for i, noise in enumerate(draws):
            total = total + _masked_scores(
                forward, x, a, masks_normalize_first, chunk_size, progress, f"sscam {i + 1}/{n}", noise=noise
            )
        return (total / n - y.unsqueeze(0)).permute(1, 2, 0).softmax(-1)

    return _score_family(model, params, x, layer, target, options, weights)


@smoothable
def iscam(
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Layers = None,
    target: Target = None,
    *,
    n: int = 10,
    chunk_size: int | None = 8,
    progress: bool = False,
    **options: Unpack[Options],
) -> Maps:
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
    _check_samples(n)

    def weights(forward: Callable[[Tensor], Tensor], x: Tensor, a: Tensor, y: Tensor) -> Tensor:
        total, coeff = 0, 0.0
        for i in range(n):
            coeff += (i + 1) / n
            total = total + _masked_scores(
                forward, x, a, masks_normalize_first, chunk_size, progress, f"iscam {i + 1}/{n}", scale=coeff
            )
        return (total / n - y.unsqueeze(0)).permute(1, 2, 0).softmax(-1)

    return _score_family(model, params, x, layer, target, options, weights)
