r"""``aug_smooth``: test-time augmentation for any method.

.. math:: \bar L = \operatorname{normalize}\Big(\frac{1}{6} \sum_{f \in \{1, 1.1, 0.9\}}
          \sum_{h \in \{\mathrm{id}, \mathrm{flip}\}} h^{-1}\big(L(h(f\,x))\big)\Big)

Each augmented map is mapped back to the original frame (a horizontal flip is undone) before averaging;
all six variants run as one batch of ``6B`` (one forward for the gradient family). The default target
(``None``) is the top-1 class of the *clean* input, so every variant explains the same class.

Example:
    >>> import torch, torchvision, camfn
    >>> model = torchvision.models.resnet18().eval()
    >>> camfn.gradcam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 3, aug_smooth=True).shape
    torch.Size([1, 64, 64])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from .checks import check_input
from .forward import apply
from .postprocess import normalize
from .targets import pick

__all__ = ["FACTORS", "augmented", "smoothable"]

FACTORS = (1.0, 1.1, 0.9)
VARIANTS = tuple((flip, factor) for flip in (False, True) for factor in FACTORS)

F = TypeVar("F", bound=Callable[..., Any])


def augmented(method: Callable[..., Any], model: Any, params: Any, x: Tensor, layer: Any, target: Any, **options: Any):
    """``method`` with ``aug_smooth``: see the module docstring."""
    check_input(x)
    batch, n = x.shape[0], len(VARIANTS)
    if target is None:
        trace_options = {k: options[k] for k in ("hooks", "tracer_options") if k in options}
        target = pick(apply(model, params, x, **trace_options), options.get("output")).argmax(1)
    if isinstance(target, Tensor):
        target = target.repeat(n, *([1] * (target.ndim - 1)))
    xs = torch.cat([(x.flip(-1) if flip else x) * factor for flip, factor in VARIANTS])
    maps = method(model, params, xs, layer, target, **options)

    def back(m: Tensor) -> Tensor:
        m = m.reshape(n, batch, *m.shape[1:])
        m = torch.stack([m[i].flip(-1) if flip else m[i] for i, (flip, _) in enumerate(VARIANTS)]).mean(0)
        return normalize(m, x.ndim - 2) if options.get("normalize", True) else m

    return [back(m) for m in maps] if isinstance(maps, list) else back(maps)


def smoothable(method: F) -> F:
    """Give ``method`` the ``aug_smooth=False`` keyword option."""

    @functools.wraps(method)
    def wrapped(model: Any, params: Any, x: Tensor, layer: Any = None, target: Any = None, **options: Any) -> Any:
        if options.pop("aug_smooth", False):
            return augmented(method, model, params, x, layer, target, **options)
        return method(model, params, x, layer, target, **options)

    return wrapped  # type: ignore[return-value]
