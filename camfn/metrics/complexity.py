r"""Complexity metrics of a map alone: how concentrated its absolute values are.

Both read :math:`a_{b,i} = |L_{b,i}|` over all positions (any number of spatial axes). An all-zero map is
treated as uniform: sparseness 0, complexity :math:`\log N`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError
from .registry import metric

__all__ = ["complexity", "sparseness"]


def _absolute(maps: object) -> Tensor:
    if not isinstance(maps, Tensor) or maps.ndim < 2 or not maps.is_floating_point():
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise InputError(f"maps must be a float (B, H, W) tensor (or (B, D, H, W) for volumes), got {got}")
    return maps.flatten(1).abs()


@metric(needs=("maps",), higher_is_better=True)
def sparseness(maps: Tensor) -> Tensor:
    r"""Sparseness (Chalasani et al., ICML 2020): the Gini index of :math:`|L_b|`, in ``[0, 1)``; ``(B,)``.

    With :math:`a_{(1)} \le \dots \le a_{(N)}` sorted:

    .. math:: G_b = \frac{\sum_{i=1}^{N} (2i - N - 1)\, a_{(i)}}{N \sum_i a_{(i)}}

    Quantus 0.6 ``Sparseness`` adds 1e-7 to every value first (a difference below 1e-6 on maps in ``[0, 1]``).

    Example:
        >>> import torch
        >>> from camfn.metrics import sparseness
        >>> sparseness(torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]))
        tensor([0.7500, 0.0000])
    """
    a = _absolute(maps).sort(1).values
    n = a.shape[1]
    weights = 2 * torch.arange(1, n + 1, device=a.device, dtype=a.dtype) - n - 1
    total = a.sum(1)
    gini = (weights * a).sum(1) / (n * torch.where(total > 0, total, torch.ones_like(total)))
    return torch.where(total > 0, gini, torch.zeros_like(gini))


@metric(needs=("maps",), higher_is_better=False)
def complexity(maps: Tensor) -> Tensor:
    r"""Complexity (Bhatt et al., IJCAI 2020): the entropy of the map's share of absolute relevance; ``(B,)``.

    .. math:: p_{b,i} = \frac{|L_{b,i}|}{\sum_j |L_{b,j}|}, \qquad C_b = -\sum_i p_{b,i} \ln p_{b,i}

    (``0 ln 0 = 0``). Quantus 0.6 ``Complexity`` writes ``ln(p + 1e-12)`` (a difference below 1e-9).

    Example:
        >>> import torch
        >>> from camfn.metrics import complexity
        >>> complexity(torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]))
        tensor([0.0000, 1.3863])
    """
    a = _absolute(maps)
    total = a.sum(1, keepdim=True)
    p = a / torch.where(total > 0, total, torch.ones_like(total))
    safe = torch.where(p > 0, p, torch.ones_like(p))
    entropy = (p * (1 / safe).log()).sum(1)
    return torch.where(total.squeeze(1) > 0, entropy, torch.full_like(entropy, math.log(a.shape[1])))
