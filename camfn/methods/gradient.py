r"""The gradient family: maps from the activation ``A`` and the gradient ``G = dS/dA`` at a layer.

Notation per sample: ``A_k`` the ``k``-th channel (``K x H x W``), ``G_k`` its gradient, sums over
``i, j`` run over the spatial positions, ``Z = HW``. Every method here is one function on
:class:`camfn.driver.Layer` returning the contributions ``C_k`` (the map is ``sum_k C_k``); the public
function is ``method(model, params, x, layer=None, target=None, **options) -> maps`` with ``maps`` of
shape ``(B, H_in, W_in)`` (``(B, T, H_in, W_in)`` for ``(B, T)`` targets; a list for a list of layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..chunks import Chunk
from ..driver import Layer, method, weighted
from ..noise import gaussian
from ..options import Option, chunk, nonnegative, positive_int, seed

__all__ = [
    "eigengradcam",
    "gradcam",
    "gradcam_elementwise",
    "gradcampp",
    "hirescam",
    "layercam",
    "plusplus",
    "smooth_gradcampp",
    "xgradcam",
]


@method(needs="gradients")
def gradcam(at: Layer) -> Tensor:
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
    return weighted(at.g.mean(at.space, keepdim=True), at.a)


def plusplus(a: Tensor, g1: Tensor, g2: Tensor, g3: Tensor, eps: float = 1e-6) -> Tensor:
    """Grad-CAM++ contributions from the first three (possibly averaged) gradient powers."""
    space = tuple(range(3, a.ndim))
    alpha = g2 / (2 * g2 + a.sum(space, keepdim=True) * g3 + eps)
    alpha = torch.where(g2 != 0, alpha, torch.zeros_like(alpha))
    return weighted((alpha * F.relu(g1)).sum(space, keepdim=True), a)


@method(needs="gradients")
def gradcampp(at: Layer) -> Tensor:
    r"""Grad-CAM++ (Chattopadhay et al., WACV 2018), closed form of Eq. 19 with exponential scores.

    .. math:: \alpha_{k,ij} = \frac{G_{k,ij}^2}{2 G_{k,ij}^2 + \sum_{ab} A_{k,ab}\, G_{k,ij}^3 + \epsilon},
              \quad w_k = \sum_{ij} \alpha_{k,ij}\,\mathrm{ReLU}(G_{k,ij}), \quad L = \sum_k w_k A_k

    with :math:`\alpha = 0` where :math:`G = 0` and :math:`\epsilon = 10^{-6}` (as grad-cam).

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.gradcampp(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4").shape
        torch.Size([1, 64, 64])
    """
    return plusplus(at.a, at.g, at.g.pow(2), at.g.pow(3))


@method(needs="gradients")
def xgradcam(at: Layer) -> Tensor:
    r"""XGrad-CAM (Fu et al., BMVC 2020).

    .. math:: w_k = \sum_{ij} \frac{A_{k,ij}}{\sum_{ab} A_{k,ab} + \epsilon} G_{k,ij}, \qquad L = \sum_k w_k A_k

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.xgradcam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 1).shape
        torch.Size([1, 64, 64])
    """
    s = at.space
    return weighted((at.g * at.a).sum(s, keepdim=True) / (at.a.sum(s, keepdim=True) + 1e-7), at.a)


@method(needs="gradients")
def layercam(at: Layer) -> Tensor:
    r"""LayerCAM (Jiang et al., TIP 2021): element-wise positive gradients.

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
    return F.relu(at.g) * at.a


@method(needs="gradients")
def hirescam(at: Layer) -> Tensor:
    r"""HiResCAM (Draelos & Carin, 2020): gradients times activations, element-wise.

    .. math:: L = \sum_k G_k \odot A_k

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.hirescam(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 0).shape
        torch.Size([1, 64, 64])
    """
    return at.g * at.a


@method(needs="gradients")
def gradcam_elementwise(at: Layer) -> Tensor:
    r"""Element-wise Grad-CAM (grad-cam's ``GradCAMElementWise``).

    .. math:: L = \sum_k \mathrm{ReLU}(G_k \odot A_k)

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.gradcam_elementwise(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4").shape
        torch.Size([1, 64, 64])
    """
    return F.relu(at.g * at.a)


@method(needs="gradients", eigen=True)
def eigengradcam(at: Layer) -> Tensor:
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
    return at.g * at.a


@method(
    needs="forward",
    options={
        "n": Option(4, positive_int),
        "std": Option(0.3, nonnegative),
        "seed": Option(0, seed),
        "chunk_size": Option(None, chunk),
    },
)
def smooth_gradcampp(at: Layer) -> Tensor:
    r"""Smooth Grad-CAM++ (Omeiza et al., 2019): Grad-CAM++ with gradient moments averaged over noisy inputs.

    With :math:`G_i = \partial S / \partial A` at :math:`x + \epsilon_i`,
    :math:`\epsilon_i \sim \mathcal N(0, \mathrm{std}^2)` and :math:`D_p = \frac1n \sum_i G_i^p`:

    .. math:: \alpha = \frac{D_2}{2 D_2 + \sum_{ab} A_{ab}\, D_3 + \epsilon}, \quad
              w_k = \sum_{ij} \alpha_{k,ij}\, \mathrm{ReLU}(D_{1,k,ij}), \quad L = \sum_k w_k A_k

    with :math:`A` the *clean* activation and the target (``None``: the clean top-1 class) fixed across
    noisy copies (torchcam mixes the last noisy activation in; camfn does not). Options: ``n`` noisy
    copies, ``std``, ``seed`` (int or ``torch.Generator``; noise shared by the batch), ``chunk_size``
    noisy copies of the batch per pass (``None``: all ``n`` in one pass). ``std=0`` gives :func:`gradcampp`.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.smooth_gradcampp(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 3, n=2).shape
        torch.Size([1, 64, 64])
    """
    opts, x = at.options, at.x
    n: int = opts["n"]
    noise = gaussian((n, *x.shape[1:]), opts["std"], opts["seed"], dtype=x.dtype, device=x.device)

    def moments(idx: Tensor) -> Tensor:
        g = at.gradients_at(x.unsqueeze(0) + noise.index_select(0, idx).unsqueeze(1))
        return torch.stack([g.sum(0), g.pow(2).sum(0), g.pow(3).sum(0)])

    size: Chunk = opts["chunk_size"]
    sums = at.chunks(moments, n, None if size == "auto" else size, "smooth_gradcampp", combine="sum")
    return plusplus(at.a, *(sums / n).unbind(0))
