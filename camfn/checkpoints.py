r"""Parameter batches: maps for several checkpoints or ensemble members in one call.

A method is a pure function of its parameters, so ``torch.func.vmap`` over a *stacked* parameter dict
(every tensor with a leading axis of ``N`` members, as ``torch.func.stack_module_state`` builds)

.. math:: M_n = \mathrm{method}(f, \theta_n, x, \mathrm{layer}, t), \qquad n = 1 \ldots N

runs the ``N`` models as one batched computation: one call, maps ``(N, B, H, W)``. The model argument
only provides the architecture (traced once); its own tensors are not read for the stacked keys.
:func:`camfn.metrics.sanity_check` uses the same ``vmap`` over randomised parameter sets.

Example:
    >>> import torch, camfn
    >>> from torch import nn
    >>> members = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)) for _ in range(3)]
    >>> stacked = camfn.stack_params([camfn.params(m) for m in members])
    >>> camfn.maps_over_params(camfn.gradcam, members[0], stacked, torch.randn(2, 3, 8, 8), "1", 0).shape
    torch.Size([3, 2, 8, 8])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import InputError
from .layer_names import Layer
from .targets import Target
from .tracing import Params

__all__ = ["maps_over_params", "stack_params"]


def stack_params(members: Sequence[Params]) -> Params:
    """Stack parameter dicts with the same keys and shapes into one dict of ``(N, ...)`` tensors.

    The same as ``torch.func.stack_module_state`` (parameters and buffers merged) for dicts, e.g. the
    ``state_dict`` of several checkpoints of one architecture.
    """
    members = list(members)
    if not members:
        raise InputError("stack_params needs at least one parameter dict; pass a list of state dicts")
    keys = set(members[0])
    for i, member in enumerate(members[1:], 1):
        if set(member) != keys:
            diff = sorted(keys ^ set(member))[:3]
            raise InputError(
                f"parameter dict {i} has different keys than dict 0 (e.g. {diff}); pass dicts of one architecture"
            )
    out = {}
    for key in members[0]:
        shapes = {tuple(m[key].shape) for m in members}
        if len(shapes) > 1:
            raise InputError(f"parameter {key!r} has different shapes across members: {sorted(shapes)}")
        out[key] = torch.stack([m[key].detach() for m in members])
    return out


def maps_over_params(
    method: Callable[..., Any],
    model: nn.Module,
    stacked: Params,
    x: Tensor,
    layer: Layer | Sequence[Layer] | None = None,
    target: Target = None,
    *,
    chunk_size: int | None = None,
    **options: Any,
) -> Any:
    """``method``'s maps for every member of ``stacked``: ``(N, *maps.shape)`` (a list for several layers).

    ``stacked`` holds ``(N, ...)`` tensors (:func:`stack_params`, ``torch.func.stack_module_state``);
    keys it lacks are read from ``model``. ``chunk_size`` members run at a time (memory bound);
    ``options`` go to ``method``. Equal to a Python loop over the members.
    """
    sizes = {v.shape[0] if v.ndim else None for v in stacked.values()}
    if len(sizes) != 1 or None in sizes:
        raise InputError(
            f"stacked parameters must all have the same leading member axis, got sizes {sorted(map(str, sizes))}; "
            "build them with camfn.stack_params or torch.func.stack_module_state"
        )
    return torch.func.vmap(lambda p: method(model, p, x, layer, target, **options), chunk_size=chunk_size)(stacked)
