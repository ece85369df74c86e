r"""Metrics for saliency maps: pure, batched torch functions, one family per module, all in :data:`METRICS`.

Every metric returns one value per sample, ``(B,)`` (or a :class:`Curve` / :class:`Sanity` of per-sample
values), never a batch mean, so results of several shards can be concatenated. ``maps`` are ``(B, H, W)`` at
the input's size (camfn's default output; ``(B, D, H, W)`` for volumes where the metric allows). Scores are the
softmax probability of the class (``softmax=False``: the raw logit), the class being ``target`` (an int, a
``(B,)`` long tensor, a callable ``output -> (B,)``), or with ``None`` the top-1 class of the *clean* input,
fixed for every perturbed copy. Non-finite maps, inputs or scores raise :class:`~camfn.errors.InputError`
naming the samples; ``skip_nonfinite=True`` gives NaN for them instead (and a warning).

=============================  ==================  =============================================================
family (module)                metrics             reference
=============================  ==================  =============================================================
:mod:`.confidence`             confidence, average_drop, increase_in_confidence (Grad-CAM++)
:mod:`.perturbation`           deletion, insertion (RISE), pixel_flipping, region_perturbation, irof,
                               monotonicity_correlation, faithfulness_correlation, infidelity (Quantus 0.6)
:mod:`.road`                   road (ROAD; imputation in :mod:`.imputation`)
:mod:`.gradcam_style`          cam_mult_image_confidence_change, road_most/least_relevant_first_average,
                               road_combined, arcc (pytorch-grad-cam 1.5.7 / master)
:mod:`.localisation`           pointing_game, energy_pointing_game, top_k_intersection,
                               relevance_rank_accuracy, auc (Quantus 0.6)
:mod:`.complexity`             sparseness (Gini), complexity (entropy)
:mod:`.robustness`             max_sensitivity, avg_sensitivity
:mod:`.randomisation`          sanity_check (redrawn tensors, vmap), mprt (reset_parameters, Quantus MPRT)
=============================  ==================  =============================================================

:data:`METRICS` maps each name to a :class:`Metric` (``fn``, ``needs``, ``higher_is_better``, ``output``);
:func:`compute` runs one by name and returns its per-sample values (``camfn eval`` uses it).

Example:
    >>> import torch, camfn
    >>> from camfn import metrics
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
    ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> p, x = camfn.params(model), torch.rand(2, 3, 16, 16)
    >>> maps = camfn.gradcam(model, p, x, "0")
    >>> metrics.deletion(model, p, x, maps, steps=8).auc.shape
    torch.Size([2])
    >>> metrics.METRICS["deletion"].higher_is_better, sorted(metrics.METRICS["deletion"].needs)
    (False, ['maps', 'model'])
"""

from __future__ import annotations

from .common import Curve
from .complexity import complexity, sparseness
from .confidence import average_drop, confidence, increase_in_confidence
from .gradcam_style import (
    arcc,
    cam_mult_image_confidence_change,
    road_combined,
    road_least_relevant_first_average,
    road_most_relevant_first_average,
)
from .imputation import impute
from .localisation import (
    auc,
    energy_pointing_game,
    pointing_game,
    region_mask,
    relevance_rank_accuracy,
    top_k_intersection,
)
from .perturbation import (
    blurred,
    deletion,
    faithfulness_correlation,
    infidelity,
    insertion,
    irof,
    monotonicity_correlation,
    pixel_flipping,
    region_perturbation,
    removed,
)
from .randomisation import Sanity, flat_maps, mprt, randomized, rank_correlation, sanity_check
from .registry import METRICS, Metric, compute, per_sample
from .road import road
from .robustness import avg_sensitivity, max_sensitivity, sensitivities

__all__ = [
    "METRICS",
    "Curve",
    "Metric",
    "Sanity",
    "arcc",
    "auc",
    "average_drop",
    "avg_sensitivity",
    "blurred",
    "cam_mult_image_confidence_change",
    "complexity",
    "compute",
    "confidence",
    "deletion",
    "energy_pointing_game",
    "faithfulness_correlation",
    "flat_maps",
    "impute",
    "increase_in_confidence",
    "infidelity",
    "insertion",
    "irof",
    "max_sensitivity",
    "monotonicity_correlation",
    "mprt",
    "per_sample",
    "pixel_flipping",
    "pointing_game",
    "randomized",
    "rank_correlation",
    "region_mask",
    "region_perturbation",
    "relevance_rank_accuracy",
    "removed",
    "road",
    "road_combined",
    "road_least_relevant_first_average",
    "road_most_relevant_first_average",
    "sanity_check",
    "sensitivities",
    "sparseness",
    "top_k_intersection",
]
