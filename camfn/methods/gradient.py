r"""The gradient family: maps from the activation ``A`` and the gradient ``G = dS/dA`` at a layer.

Notation per sample: ``A_k`` the ``k``-th channel (``K x H x W``), ``G_k`` its gradient, sums over
``i, j`` run over the spatial positions, ``Z = HW``. Every function has the signature

``method(model, params, x, layer=None, target=None, **options) -> maps``

with ``maps`` of shape ``(B, H_in, W_in)`` (``(B, T, H_in, W_in)`` for ``(B, T)`` targets; a list for a
list of layers). See :class:`camfn.methods.core.Options` for ``relu``, ``size``, ``normalize``.
Conventions: ``../shared/METHODS.md`` in the project notes and the README's method table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Unpack

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..forward import Params
from ..graph import Layer
from ..postprocess import first_component
from ..targets import Target
from .core import Maps, Options, explain

__all__ = ["eigengradcam", "gradcam", "gradcam_elementwise", "gradcampp", "hirescam", "layercam", "xgradcam"]

Layers = Layer | Sequence[Layer] | None


def _space(t: Tensor) -> tuple[int, ...]:
    """Spatial axes of a ``(B, T, K, *spatial)`` tensor."""
    return tuple(range(3, t.ndim))


def _weighted(w: Tensor, a: Tensor) -> Tensor:
    """``sum_k w_k A_k`` for per-channel weights ``w`` ``(B, T, K, 1, 1)``."""
    return (w * a).sum(2)


def _gradcam(a: Tensor, g: Tensor) -> Tensor:
    return _weighted(g.mean(_space(g), keepdim=True), a)


def gradcam(
    model: nn.Module, params: Params, x: Tensor, layer: Layers = None, target: Target = None, **options: Unpack[Options]
) -> Maps:
    r"""Grad-CAM (Selvaraju et al., 2017).

    .. math:: w_k = \frac{1}{Z}\sum_{ij} G_{k,ij}, \qquad L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> x = torch.randn(2, 3, 64, 64)
        >>> camfn.gradcam(model, camfn.params(model), x, "layer4", 281).shape
        torch.Size([2, 64, 64])
        >>> camfn.gradcam(model, camfn.params(model), x, "layer4", torch.tensor([[1, 2, 3]] * 2)).shape
        torch.Size([2, 3, 64, 64])
    """
    return explain(model, params, x, layer, target, _gradcam, **options)


def _gradcampp(a: Tensor, g: Tensor, eps: float = 1e-6) -> Tensor:
    g2 = g.pow(2)
    alpha = g2 / (2 * g2 + a.sum(_space(a), keepdim=True) * g2 * g + eps)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return _weighted((alpha * F.relu(g)).sum(_space(g), keepdim=True), a)


def gradcampp(
    model: nn.Module, params: Params, x: Tensor, layer: Layers = None, target: Target = None, **options: Unpack[Options]
) -> Maps:
    r"""Grad-CAM++ (Chattopadhay et al., 2018), closed form of Eq. 19 with exponential scores.

    .. math:: \alpha_{k,ij} = \frac{G_{k,ij}^2}{2 G_{k,ij}^2 + \sum_{ab} A_{k,ab}\, G_{k,ij}^3 + \epsilon},
              \quad w_k = \sum_{ij} \alpha_{k,ij}\,\mathrm{ReLU}(G_{k,ij}), \quad L = \sum_k w_k A_k

    with :math:`\alpha = 0` where :math:`G = 0` and :math:`\epsilon = 10^{-6}` (as grad-cam).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.gradcampp(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4").shape
        torch.Size([1, 64, 64])
    """
    return explain(model, params, x, layer, target, _gradcampp, **options)


def _xgradcam(a: Tensor, g: Tensor, eps: float = 1e-7) -> Tensor:
    s = _space(a)
    return _weighted((g * a).sum(s, keepdim=True) / (a.sum(s, keepdim=True) + eps), a)


def xgradcam(
    model: nn.Module, params: Params, x: Tensor, layer: Layers = None, target: Target = None, **options: Unpack[Options]
) -> Maps:
    r"""XGrad-CAM (Fu et al., 2020).

    .. math:: w_k = \sum_{ij} \frac{A_{k,ij}}{\sum_{ab} A_{k,ab} + \epsilon} G_{k,ij}, \qquad L = \sum_k w_k A_k

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.xgradcam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 1).shape
        torch.Size([1, 64, 64])
    """
    return explain(model, params, x, layer, target, _xgradcam, **options)


def _layercam(a: Tensor, g: Tensor) -> Tensor:
    return (F.relu(g) * a).sum(2)


def layercam(
    model: nn.Module, params: Params, x: Tensor, layer: Layers = None, target: Target = None, **options: Unpack[Options]
) -> Maps:
    r"""LayerCAM (Jiang et al., 2021): element-wise positive gradients.

    .. math:: L = \mathrm{ReLU}\Big(\sum_k \mathrm{ReLU}(G_k) \odot A_k\Big)

    For several layers pass a list and fuse the per-layer maps with :func:`camfn.fuse`
    (``tanh(2 L)`` per layer, resize, element-wise max).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> p, x = camfn.params(model), torch.randn(1, 3, 64, 64)
        >>> maps = camfn.layercam(model, p, x, ["layer2", "layer3", "layer4"], 7, size=None)
        >>> [m.shape[-1] for m in maps], camfn.fuse(maps, size=(64, 64)).shape
        ([8, 4, 2], torch.Size([1, 64, 64]))
    """
    return explain(model, params, x, layer, target, _layercam, **options)


def _hirescam(a: Tensor, g: Tensor) -> Tensor:
    return (g * a).sum(2)


def hirescam(
    model: nn.Module, params: Params, x: Tensor, layer: Layers = None, target: Target = None, **options: Unpack[Options]
) -> Maps:
    r"""HiResCAM (Draelos & Carin, 2020): gradients times activations, element-wise.

    .. math:: L = \sum_k G_k \odot A_k

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.hirescam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 0).shape
        torch.Size([1, 64, 64])
    """
    return explain(model, params, x, layer, target, _hirescam, **options)


def _gradcam_elementwise(a: Tensor, g: Tensor) -> Tensor:
    return F.relu(g * a).sum(2)


def gradcam_elementwise(
    model: nn.Module, params: Params, x: Tensor, layer: Layers = None, target: Target = None, **options: Unpack[Options]
) -> Maps:
    r"""Element-wise Grad-CAM (grad-cam's ``GradCAMElementWise``).

    .. math:: L = \sum_k \mathrm{ReLU}(G_k \odot A_k)

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.gradcam_elementwise(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4").shape
        torch.Size([1, 64, 64])
    """
    return explain(model, params, x, layer, target, _gradcam_elementwise, **options)


def _eigengradcam(a: Tensor, g: Tensor) -> Tensor:
    return first_component(g * a, ndim=a.ndim - 3)


def eigengradcam(
    model: nn.Module, params: Params, x: Tensor, layer: Layers = None, target: Target = None, **options: Unpack[Options]
) -> Maps:
    r"""Eigen-Grad-CAM: first principal component of ``G * A`` over space.

    With :math:`X` the :math:`(HW, K)` matrix of :math:`G \odot A`, channels centred over space, and
    :math:`X = U S V^\top`: :math:`L = X v_1`, signed to correlate non-negatively with
    :math:`\sum_k G_k \odot A_k`.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.eigengradcam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4").shape
        torch.Size([1, 64, 64])
    """
    return explain(model, params, x, layer, target, _eigengradcam, **options)
