r"""Differentiable maps: train a model with a loss on its own class activation maps.

Every camfn method is a ``torch.func`` function of the parameters, so a loss on the *raw* map (``normalize=False``)
has a gradient with respect to them (for gradient methods a second-order derivative through the ``vjp`` that
gives :math:`G = \partial S / \partial A`). The example here is attention-guided training
(e.g. Li et al., "Tell me where to look", CVPR 2018; Rieger et al., "Interpretations are useful", ICML 2020):
with :math:`L` the ReLU-ed Grad-CAM map of the true class at input resolution and :math:`M` the object mask,

.. math:: \mathcal L(\theta) = \mathrm{CE}\big(f_\theta(x), y\big)
          + \lambda\, \frac{1}{B}\sum_b \Big(1 - \frac{\sum_{ij} L_{b,ij} M_{b,ij}}{\sum_{ij} L_{b,ij} + \epsilon}\Big)

(the share of the map's mass that is not on the object; an all-zero map counts as 1, so it is no escape).
:func:`finetune` minimises it with Adam on ``torch.func.grad``; the user's model is never changed (new
parameter dicts come back).

Example:
    >>> import torch, camfn
    >>> from camfn import shapes, training
    >>> model, data = shapes.load(), shapes.make(4, size=32, seed=shapes.TRAIN_SEED)
    >>> loss = training.guided_loss(camfn.gradcam, model, camfn.params(model), data, shapes.LAYER)
    >>> loss.ndim, bool(loss > 0)
    (0, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError
from .layer_names import Layer
from .tracing import Params, apply

__all__ = ["History", "finetune", "guided_loss", "outside_share"]


def outside_share(maps: Tensor, masks: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Share of each map's mass not on its mask: :math:`1 - \sum L M / (\sum L + \epsilon)`, shape ``(B,)``.

    ``maps`` ``(B, H, W)`` non-negative, ``masks`` ``(B, H, W)`` bool or {0, 1}. 0: all mass on the object;
    1: none of it (an all-zero map also gives 1, so a loss on it cannot be minimised by erasing the map).

    Example:
        >>> import torch
        >>> from camfn.training import outside_share
        >>> outside_share(torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[True, False]]]))
        tensor([0.7500])
    """
    if maps.shape != masks.shape:
        raise InputError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must have the same shape")
    inside = masks.to(maps.dtype)
    dims = tuple(range(1, maps.ndim))
    return 1 - (maps * inside).sum(dims) / (maps.sum(dims) + eps)


def guided_loss(
    method: Callable[..., Tensor],
    model: nn.Module,
    params: Params,
    data: Any,
    layer: Layer,
    *,
    weight: float = 1.0,
    **options: Any,
) -> Tensor:
    """Cross-entropy plus ``weight`` times the mean :func:`outside_share` of ``method``'s raw maps (a scalar).

    ``data`` has ``images``, ``labels`` and ``masks`` (a :class:`camfn.shapes.Batch`). The maps explain the
    true class, with ``relu=True, normalize=False`` at input resolution (``options`` go to ``method``).
    """
    x, labels, masks = data.images, data.labels, data.masks
    ce = F.cross_entropy(apply(model, params, x), labels)
    maps = method(model, params, x, layer, labels, **{"relu": True, "normalize": False, **options})
    return ce + weight * outside_share(maps, masks).mean()


class History(NamedTuple):
    """Per step: the total loss and the parameters after the last step."""

    losses: list[float]
    params: Params


def finetune(
    method: Callable[..., Tensor],
    model: nn.Module,
    params: Params,
    batches: Iterable[Any],
    layer: Layer,
    *,
    trainable: Sequence[str] | None = None,
    lr: float = 1e-3,
    weight: float = 1.0,
    **options: Any,
) -> History:
    """Adam on :func:`guided_loss`, one step per batch; returns the losses and the new parameters.

    ``trainable``: parameter names to update (default: the model's parameters; buffers such as BatchNorm
    statistics stay fixed: camfn explains models in eval mode). ``model`` and ``params`` are not modified.
    """
    names = list(trainable) if trainable is not None else [k for k, _ in model.named_parameters()]
    missing = [k for k in names if k not in params]
    if missing:
        raise InputError(f"trainable names {missing[:3]} are not in params; use keys of camfn.params(model)")
    fixed = {k: v for k, v in params.items() if k not in names}
    leaves = {k: params[k].detach().clone() for k in names}
    optimizer = torch.optim.Adam(list(leaves.values()), lr=lr)

    def loss_of(train: Params, data: Any) -> Tensor:
        return guided_loss(method, model, {**fixed, **train}, data, layer, weight=weight, **options)

    step = torch.func.grad_and_value(loss_of)
    losses = []
    for data in batches:
        grads, loss = step(leaves, data)
        for key, tensor in leaves.items():
            tensor.grad = grads[key]
        optimizer.step()
        losses.append(float(loss))
    return History(losses, {**fixed, **{k: v.detach() for k, v in leaves.items()}})
