r"""Robustness metrics: how much a method's map changes under small input noise (Yeh et al., NeurIPS 2019).

Any camfn method (or a function with its signature) is re-run on ``samples`` noisy copies
:math:`x + \delta`, :math:`\delta \sim U(-r, r)` elementwise (seeded), explaining the clean input's class:

.. math:: \mathrm{sens}_{b,t} = \frac{\lVert L(x_b) - L(x_b + \delta_t) \rVert_F}{\lVert L(x_b) \rVert_F}

``max_sensitivity`` takes the maximum over ``t``, ``avg_sensitivity`` the mean: Quantus 0.6
``MaxSensitivity`` / ``AvgSensitivity`` with their defaults (difference, Frobenius norms, ``lower_bound=r``,
no normalisation), given the same noise. Lower is better. An all-zero map has no relative change: refused,
or NaN with ``skip_nonfinite=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, OptionError
from ..noise import Seed, generator
from ..tracing import Params
from .common import check_maps, check_model_input, check_positive, fixed_class, refuse_nonfinite
from .registry import metric

__all__ = ["avg_sensitivity", "max_sensitivity", "sensitivities"]


def sensitivities(
    method: Callable[..., Tensor],
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Any = None,
    target: Any = None,
    *,
    maps: Tensor | None = None,
    samples: int = 10,
    radius: float = 0.2,
    seed: Seed = 0,
    perturbations: Tensor | None = None,
    **options: Any,
) -> Tensor:
    r"""Relative map changes ``(B, samples)`` under uniform input noise (see the module doc).

    ``perturbations``: explicit noise ``(n, *x.shape)`` added to ``x`` (then ``samples``, ``radius``, ``seed``
    are unused). ``maps``: the method's maps of ``x`` (computed when ``None``). ``options`` go to ``method``.

    Example:
        >>> import torch, camfn
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> s = camfn.metrics.sensitivities(camfn.gradcam, model, camfn.params(model), torch.rand(2, 1, 8, 8), "0",
        ...                                 samples=3, radius=0.0 + 1e-3)
        >>> s.shape
        torch.Size([2, 3])
    """
    check_model_input(model, x)
    if perturbations is None:
        n = check_positive("samples", samples, "noisy copies")
        if isinstance(radius, bool) or not isinstance(radius, int | float) or not radius > 0:
            raise OptionError(f"radius={radius!r}: use the half-width > 0 of the uniform input noise")
        draw = torch.rand((n, *x.shape), generator=generator(seed), dtype=torch.float64)
        perturbations = ((2 * draw - 1) * radius).to(device=x.device, dtype=x.dtype)
    elif not isinstance(perturbations, Tensor) or tuple(perturbations.shape[1:]) != tuple(x.shape):
        got = tuple(perturbations.shape) if isinstance(perturbations, Tensor) else type(perturbations).__name__
        raise InputError(f"perturbations has shape {got}; expected (n, {', '.join(map(str, x.shape))})")
    target = fixed_class(model, params, x, target, options)
    if maps is None:
        maps = method(model, params, x, layer, target, **options)
    check_maps(maps, x)
    reference = maps.flatten(1).double()
    norm = reference.norm(dim=1)
    refuse_nonfinite(norm == 0, "maps", "explain a class the model responds to", "are all zero (no relative change)")
    changes = []
    for delta in perturbations:
        other = method(model, params, x + delta.to(x.dtype), layer, target, **options).flatten(1).double()
        changes.append((reference - other).norm(dim=1) / torch.where(norm > 0, norm, torch.ones_like(norm)))
    out = torch.stack(changes, 1)
    return torch.where((norm > 0)[:, None], out, torch.full_like(out, float("nan")))


def _sensitivity(reduce: str) -> Callable[..., Tensor]:
    def sensitivity(
        method: Callable[..., Tensor],
        model: nn.Module,
        params: Params,
        x: Tensor,
        layer: Any = None,
        target: Any = None,
        *,
        maps: Tensor | None = None,
        samples: int = 10,
        radius: float = 0.2,
        seed: Seed = 0,
        perturbations: Tensor | None = None,
        **options: Any,
    ) -> Tensor:
        s = sensitivities(method, model, params, x, layer, target, maps=maps, samples=samples, radius=radius,
                          seed=seed, perturbations=perturbations, **options)  # fmt: skip
        return s.amax(1) if reduce == "max" else s.mean(1)

    sensitivity.__name__ = sensitivity.__qualname__ = f"{reduce}_sensitivity"
    return metric(needs=("model", "method"), higher_is_better=False)(sensitivity)


max_sensitivity = _sensitivity("max")
max_sensitivity.__doc__ = r"""Max-sensitivity (Yeh et al., 2019): the largest relative map change, ``(B,)``.

    :math:`\max_t \mathrm{sens}_{b,t}` of :func:`sensitivities` (same arguments; ``samples`` noisy copies,
    Quantus's default is 200). Lower is better.

    Example:
        >>> import torch, camfn
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> camfn.metrics.max_sensitivity(camfn.gradcam, model, camfn.params(model), torch.rand(2, 1, 8, 8), "0",
        ...                               samples=2).shape
        torch.Size([2])
    """
avg_sensitivity = _sensitivity("avg")
avg_sensitivity.__doc__ = r"""Average sensitivity (Yeh et al., 2019): the mean relative map change, ``(B,)``.

    :math:`\frac{1}{n}\sum_t \mathrm{sens}_{b,t}` of :func:`sensitivities` (same arguments). Lower is better.

    Example:
        >>> import torch, camfn
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> camfn.metrics.avg_sensitivity(camfn.gradcam, model, camfn.params(model), torch.rand(2, 1, 8, 8), "0",
        ...                               samples=2).shape
        torch.Size([2])
    """
