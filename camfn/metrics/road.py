r"""ROAD, RemOve And Debias (Rong et al., ICML 2022): the score after removing pixels and imputing them.

Removed pixels are filled by noisy linear imputation (:func:`camfn.metrics.impute`). Quantus 0.6 ``ROAD``
crashes on RGB ``(B, H, W)`` maps and averages only its first batch; camfn's imputation equals Quantus's
``noisy_linear_imputation`` and grad-cam's ``NoisyLinearImputer`` (noise 0) to 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..hooks import HookPolicy
from ..noise import Seed
from ..tracing import Params
from .common import (
    ChunkSize,
    Curve,
    Order,
    check_chunk,
    check_fractions,
    check_images_2d,
    check_maps,
    check_model_input,
    curve,
    ranks,
    run_copies,
    scorer,
)
from .imputation import Solver, impute
from .registry import metric

__all__ = ["road", "road_masks"]

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def road_masks(maps: Tensor, fractions: Tensor, order: Order | str) -> Tensor:
    """``(F, B, H, W)`` bool: at each fraction, the ``round(f * H * W)`` first pixels in ``order`` (raster ties)."""
    rank = ranks(maps, order).reshape(maps.shape)
    counts = torch.floor(fractions * rank[0].numel() + 0.5).long().to(maps.device)
    return rank.unsqueeze(0) < counts.reshape(-1, 1, 1, 1)


def imputed_scores(
    model: nn.Module,
    params: Params,
    x: Tensor,
    masks: Tensor,
    target: Any,
    *,
    noise: float,
    seed: Seed,
    solver: Solver,
    softmax: bool,
    chunk_size: ChunkSize,
    hooks: HookPolicy,
) -> tuple[Tensor, Tensor]:
    """Scores ``(B, F)`` of ``x`` with each of ``masks`` ``(F, B, H, W)`` imputed, and the clean scores ``(B,)``."""
    s = scorer(model, params, x, target, softmax=softmax, hooks=hooks)

    def make(idx: Tensor) -> Tensor:
        m = masks[idx]
        return impute(x.expand(m.shape[0], *x.shape), m, noise=noise, seed=seed, solver=solver)

    return run_copies(s.score, x, make, masks.shape[0], chunk_size), s.clean


@metric(needs=("model", "maps"), higher_is_better=False, output="curve")
def road(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    fractions: Sequence[float] | Tensor = DEFAULT_FRACTIONS,
    order: Order = "most",
    noise: float = 0.01,
    seed: Seed = 0,
    solver: Solver = "auto",
    softmax: bool = True,
    chunk_size: ChunkSize = "auto",
    hooks: HookPolicy = "error",
) -> Curve:
    r"""ROAD: class score after removing a fraction of pixels and imputing them from their neighbours.

    For each ``f`` in ``fractions`` (the fraction of pixels **removed**), the ``round(f * H * W)`` most
    (``order="most"``, MoRF: lower is better) or least (``order="least"``, LeRF: higher is better) salient
    pixels of each map (ties in raster order) are replaced by noisy linear imputation (:func:`impute`, noise
    std ``noise``, seeded by ``seed``; the same draw for every fraction; ``solver`` as there) and

    .. math:: s_{b,f} = \mathrm{softmax}\big(f(\mathrm{impute}(x_b, R_{b,f}))\big)_{c_b}

    ``auc`` is the trapezoid over ``fractions`` divided by their span (the curve's mean height). Images only
    (``(B, C, H, W)``): volumes are refused.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        >>> x, maps = torch.rand(2, 1, 8, 8), torch.rand(2, 8, 8)
        >>> curve = camfn.metrics.road(model, camfn.params(model), x, maps, fractions=(0.25, 0.5), seed=1)
        >>> curve.fractions, curve.scores.shape
        (tensor([0.2500, 0.5000]), torch.Size([2, 2]))
    """
    check_model_input(model, x)
    check_maps(maps, x)
    check_chunk(chunk_size)
    check_images_2d(x, "road")
    values = check_fractions(fractions)
    masks = road_masks(maps, values, order)
    scores, _ = imputed_scores(model, params, x, masks, target, noise=noise, seed=seed, solver=solver,
                               softmax=softmax, chunk_size=chunk_size, hooks=hooks)  # fmt: skip
    return curve(values, scores)
