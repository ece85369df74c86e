r"""Confidence metrics: the class score on ``x`` and on ``x * map``.

``Y_b`` is sample ``b``'s score on ``x`` and ``O_b`` on ``x * map`` (the softmax probability of its class, or
the logit with ``softmax=False``; the class is ``target``, or the clean input's top-1 for ``None``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..hooks import HookPolicy
from ..tracing import Params
from .common import check_maps, check_model_input, scorer
from .registry import metric

__all__ = ["average_drop", "confidence", "increase_in_confidence", "multiplied_scores"]


@metric(needs=("model",), higher_is_better=True)
def confidence(
    model: nn.Module,
    params: Params,
    x: Tensor,
    target: Any = None,
    *,
    softmax: bool = True,
    hooks: HookPolicy = "error",
) -> Tensor:
    r"""Softmax probability of each sample's class, ``(B,)`` (``softmax=False``: its logit).

    .. math:: Y_b = \mathrm{softmax}(f(x_b))_{c_b}

    ``target``: an int, a ``(B,)`` long tensor, ``None`` for the top-1 class of each sample, or a callable
    ``output -> (B,)`` scores. ``hooks``: as in :func:`camfn.tracing.trace`.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = model[1].weight.zero_(), model[1].bias.copy_(torch.tensor([1.0, 3.0]).log())
        >>> camfn.metrics.confidence(model, camfn.params(model), torch.rand(1, 1, 2, 2))
        tensor([0.7500])
    """
    check_model_input(model, x)
    return scorer(model, params, x, target, softmax=softmax, hooks=hooks).clean


def multiplied_scores(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any,
    softmax: bool,
    hooks: HookPolicy,
    what: str,
) -> tuple[Tensor, Tensor]:
    """``(Y, O)``: the scores on ``x`` and on ``x * maps`` (maps in ``[0, 1]``)."""
    check_model_input(model, x)
    check_maps(maps, x)
    if not bool(((maps >= 0) & (maps <= 1)).all()):
        raise InputError(
            f"maps hold values in [{float(maps.min()):.3g}, {float(maps.max()):.3g}]; {what} multiplies "
            "the input by the map, which must lie in [0, 1] (camfn's default normalize=True)"
        )
    s = scorer(model, params, x, target, softmax=softmax, hooks=hooks)
    return s.clean, s.score((x * maps.unsqueeze(1).to(x.dtype))[None])[0]


@metric(needs=("model", "maps"), higher_is_better=False)
def average_drop(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    softmax: bool = True,
    hooks: HookPolicy = "error",
) -> Tensor:
    r"""Average drop (Chattopadhyay et al., Grad-CAM++), per sample ``(B,)``; its mean is the paper's number.

    .. math:: \mathrm{drop}_b = \frac{\max(0, Y_b - O_b)}{Y_b}

    with ``Y`` the class probability on ``x`` and ``O`` on ``x * map`` (maps ``(B, H, W)`` in ``[0, 1]``).
    A score that is 0 gives a drop of 0.

    Example:
        >>> import torch, camfn
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x = torch.rand(2, 1, 2, 2)
        >>> camfn.metrics.average_drop(model, camfn.params(model), x, torch.ones(2, 2, 2))
        tensor([0., 0.])
    """
    y, o = multiplied_scores(model, params, x, maps, target, softmax, hooks, "average drop")
    safe = torch.where(y != 0, y, torch.ones_like(y))
    return torch.where(y != 0, (y - o).clamp_min(0) / safe, torch.zeros_like(y))


@metric(needs=("model", "maps"), higher_is_better=True)
def increase_in_confidence(
    model: nn.Module,
    params: Params,
    x: Tensor,
    maps: Tensor,
    target: Any = None,
    *,
    softmax: bool = True,
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
    y, o = multiplied_scores(model, params, x, maps, target, softmax, hooks, "increase in confidence")
    return (o > y).to(y.dtype)
