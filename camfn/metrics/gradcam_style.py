r"""pytorch-grad-cam's metrics: confidence change on ``x * map``, ROAD averaged over percentiles, and ARCC.

Conventions of grad-cam 1.5.7 (and master for ARCC), kept so the numbers compare: scores are the raw logit
(``ClassifierOutputTarget``; ``softmax=True`` for its ``ClassifierOutputSoftmaxTarget``), results are the
score *after* minus *before*, and ROAD at percentile ``p`` removes the pixels whose map value is at or above
the ``p``-th percentile of the map (MoRF: the top ``100 - p`` %) or, for LeRF, at or above the ``p``-th
percentile of ``1 - map`` (the bottom ``100 - p`` %). grad-cam draws the imputation noise from the global
torch RNG per image; camfn from ``seed`` (:func:`camfn.metrics.impute`), so they agree at ``noise=0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import OptionError
from ..hooks import HookPolicy
from ..noise import Seed
from ..tracing import Params
from .common import ChunkSize, check_chunk, check_images_2d, check_maps, check_model_input
from .confidence import multiplied_scores
from .imputation import Solver
from .registry import metric
from .road import imputed_scores

__all__ = [
    "arcc",
    "cam_mult_image_confidence_change",
    "road_combined",
    "road_least_relevant_first_average",
    "road_most_relevant_first_average",
]

PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


@metric(needs=("model", "maps"), higher_is_better=True)
def cam_mult_image_confidence_change(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    softmax: bool = False,
    hooks: HookPolicy = "error",
) -> Tensor:
    r"""grad-cam's ``CamMultImageConfidenceChange``: :math:`s_b(x \odot L_b) - s_b(x)`, ``(B,)``.

    Scores are logits by default (grad-cam's ``ClassifierOutputTarget``). Maps must lie in ``[0, 1]``.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x = torch.rand(2, 1, 2, 2)
        >>> camfn.metrics.cam_mult_image_confidence_change(model, camfn.params(model), x, torch.ones(2, 2, 2))
        tensor([0., 0.])
    """
    y, o = multiplied_scores(model, params, x, maps, target, softmax, hooks, "the confidence change")
    return o - y


def _percentile_masks(maps: Tensor, percentiles: Sequence[float], order: str) -> Tensor:
    """``(P, B, H, W)`` removed pixels at each percentile, grad-cam's threshold rule (linear interpolation)."""
    values = torch.as_tensor(percentiles, dtype=torch.float64).flatten()
    if values.numel() == 0 or not bool(((values >= 0) & (values <= 100)).all()):
        raise OptionError(f"percentiles {values.tolist()} must be a non-empty list of numbers in [0, 100]")
    ranked = maps if order == "most" else 1 - maps
    flat = ranked.flatten(1).double()
    threshold = torch.quantile(flat, values.to(flat.device) / 100, dim=1)  # (P, B)
    return ~(flat.unsqueeze(0) < threshold.unsqueeze(-1)).reshape(values.numel(), *maps.shape)


def _road_average(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any,
    order: str,
    percentiles: Sequence[float],
    noise: float,
    seed: Seed,
    solver: Solver,
    softmax: bool,
    chunk_size: ChunkSize,
    hooks: HookPolicy,
) -> Tensor:
    check_model_input(model, x)
    check_maps(maps, x)
    check_chunk(chunk_size)
    check_images_2d(x, "ROAD")
    masks = _percentile_masks(maps, percentiles, order)
    scores, clean = imputed_scores(model, params, x, masks, target, noise=noise, seed=seed, solver=solver,
                                   softmax=softmax, chunk_size=chunk_size, hooks=hooks)  # fmt: skip
    return (scores - clean[:, None]).mean(1)


def _road_metric(order: str, name: str, higher: bool) -> Callable[..., Tensor]:
    def road_average(
        model: nn.Module,
        params: Params,
        x: Tensor,
        maps: Tensor,
        target: Any = None,
        *,
        percentiles: Sequence[float] = PERCENTILES,
        noise: float = 0.01,
        seed: Seed = 0,
        solver: Solver = "auto",
        softmax: bool = False,
        chunk_size: ChunkSize = "auto",
        hooks: HookPolicy = "error",
    ) -> Tensor:
        return _road_average(model, params, x, maps, target, order, percentiles, noise, seed, solver, softmax,
                             chunk_size, hooks)  # fmt: skip

    road_average.__name__ = road_average.__qualname__ = name
    return metric(needs=("model", "maps"), higher_is_better=higher)(road_average)


road_most_relevant_first_average = _road_metric("most", "road_most_relevant_first_average", False)
road_most_relevant_first_average.__doc__ = r"""grad-cam's ``ROADMostRelevantFirstAverage``, ``(B,)``: lower is better.

    The mean over ``percentiles`` ``p`` of :math:`s_b(\mathrm{impute}(x_b, L_b \ge q_p(L_b))) - s_b(x_b)`, the
    pixels at or above the map's ``p``-th percentile removed (the top ``100 - p`` %).

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        >>> x, maps = torch.rand(2, 1, 8, 8), torch.rand(2, 8, 8)
        >>> camfn.metrics.road_most_relevant_first_average(model, camfn.params(model), x, maps).shape
        torch.Size([2])
    """
road_least_relevant_first_average = _road_metric("least", "road_least_relevant_first_average", True)
road_least_relevant_first_average.__doc__ = r"""grad-cam's ``ROADLeastRelevantFirstAverage``, ``(B,)``, higher better.

    As :func:`road_most_relevant_first_average` on ``1 - map``: the bottom ``100 - p`` % of pixels removed.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        >>> x, maps = torch.rand(2, 1, 8, 8), torch.rand(2, 8, 8)
        >>> camfn.metrics.road_least_relevant_first_average(model, camfn.params(model), x, maps).shape
        torch.Size([2])
    """


@metric(needs=("model", "maps"), higher_is_better=True)
def road_combined(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    percentiles: Sequence[float] = PERCENTILES,
    noise: float = 0.01,
    seed: Seed = 0,
    solver: Solver = "auto",
    softmax: bool = False,
    chunk_size: ChunkSize = "auto",
    hooks: HookPolicy = "error",
) -> Tensor:
    r"""grad-cam's ``ROADCombined``: ``(LeRF average - MoRF average) / 2``, ``(B,)``; higher is better.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        >>> x, maps = torch.rand(2, 1, 8, 8), torch.rand(2, 8, 8)
        >>> camfn.metrics.road_combined(model, camfn.params(model), x, maps, percentiles=(50,)).shape
        torch.Size([2])
    """
    args = (model, params, x, maps, target)
    rest = (percentiles, noise, seed, solver, softmax, chunk_size, hooks)
    return (_road_average(*args, "least", *rest) - _road_average(*args, "most", *rest)) / 2


@metric(needs=("model", "maps", "method"), higher_is_better=True)
def arcc(
    method: Callable[..., Tensor],
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Any = None,
    target: Any = None,
    *,
    maps: Tensor | None = None,
    percentiles: Sequence[float] = (20, 40, 60, 80),
    noise: float = 0.01,
    seed: Seed = 0,
    solver: Solver = "auto",
    softmax: bool = False,
    chunk_size: ChunkSize = "auto",
    hooks: HookPolicy = "error",
    **options: Any,
) -> Tensor:
    r"""ARCC (grad-cam master, arXiv 2605.14641): the harmonic mean of coherency, 1 - complexity and ROAD, ``(B,)``.

    .. math:: \mathrm{coh}_b = \tfrac12\big(1 + \rho(M(x_b \odot L_b), L_b)\big), \quad
              \mathrm{cx}_b = \tfrac{1}{HW}\textstyle\sum |L_b|, \quad
              r_b = \mathrm{clip}(2\,\mathrm{ROADCombined}_b, 0, 1)

    .. math:: \mathrm{ARCC}_b = 3\Big/\Big(\frac{1}{\mathrm{coh}_b + \epsilon} + \frac{1}{1 - \mathrm{cx}_b + \epsilon}
              + \frac{1}{r_b + \epsilon}\Big), \quad \epsilon = 10^{-8}

    ``rho`` is grad-cam's Pearson (``n - 1`` normalisation, ``1e-8`` added to the product of the stds);
    ``M`` is ``method`` with ``options`` (explaining ``target``), ``maps`` its maps of ``x`` (computed when
    ``None``), in ``[0, 1]``. grad-cam's docstring calls this a geometric mean; its code (followed here) is
    the harmonic mean.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x = torch.rand(2, 1, 16, 16)
        >>> camfn.metrics.arcc(camfn.gradcam, model, camfn.params(model), x, "0", 1, percentiles=(50,)).shape
        torch.Size([2])
    """
    check_model_input(model, x)
    if maps is None:
        maps = method(model, params, x, layer, target, **options)
    check_maps(maps, x)
    complexity = maps.abs().flatten(1).mean(1)
    mixed = method(model, params, x * maps.unsqueeze(1).to(x.dtype), layer, target, **options)
    a = mixed.flatten(1).double()
    b = maps.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    n = a.shape[1] - 1
    rho = (a * b).sum(1) / n / ((a.square().sum(1) / n).sqrt() * (b.square().sum(1) / n).sqrt() + 1e-8)
    coherency = (rho + 1) / 2
    road = road_combined(model, params, x, maps, target, percentiles=percentiles, noise=noise, seed=seed,
                         solver=solver, softmax=softmax, chunk_size=chunk_size, hooks=hooks)  # fmt: skip
    road = (2 * road.double()).clamp(0, 1)
    eps = 1e-8
    return 3 / (1 / (coherency + eps) + 1 / (1 - complexity.double() + eps) + 1 / (road + eps))
