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
from torch.func import vmap

from ..errors import OptionError
from ..forward import Params, activations, chunked, gradients
from ..graph import Layer, engine
from ..noise import Seed, gaussian
from ..smoothing import smoothable
from ..targets import Target, fixed
from .core import Maps, Options, _options, explain, finalize, num_classes, per_target, prepare, reduce, to_maps

__all__ = [
    "eigengradcam",
    "gradcam",
    "gradcam_elementwise",
    "gradcampp",
    "hirescam",
    "layercam",
    "smooth_gradcampp",
    "xgradcam",
]

Layers = Layer | Sequence[Layer] | None


def _space(t: Tensor) -> tuple[int, ...]:
    """Spatial axes of a ``(B, T, K, *spatial)`` tensor."""
    return tuple(range(3, t.ndim))


def _weighted(w: Tensor, a: Tensor) -> Tensor:
    """Contributions ``w_k A_k`` for per-channel weights ``w`` ``(B, T, K, 1, 1)``."""
    return w * a


def _gradcam(a: Tensor, g: Tensor) -> Tensor:
    return _weighted(g.mean(_space(g), keepdim=True), a)


@smoothable
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


def _plusplus(a: Tensor, g1: Tensor, g2: Tensor, g3: Tensor, eps: float = 1e-6) -> Tensor:
    """Grad-CAM++ contributions from the first three (possibly averaged) gradient powers."""
    alpha = g2 / (2 * g2 + a.sum(_space(a), keepdim=True) * g3 + eps)
    alpha = torch.where(g2 != 0, alpha, torch.zeros_like(alpha))
    return _weighted((alpha * F.relu(g1)).sum(_space(g1), keepdim=True), a)


def _gradcampp(a: Tensor, g: Tensor) -> Tensor:
    return _plusplus(a, g, g.pow(2), g.pow(3))


@smoothable
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


@smoothable
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
    return F.relu(g) * a


@smoothable
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
    return g * a


@smoothable
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
    return F.relu(g * a)


@smoothable
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


@smoothable
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
    return explain(model, params, x, layer, target, _hirescam, **{**options, "eigen_smooth": True})


@smoothable
def smooth_gradcampp(
    model: nn.Module,
    params: Params,
    x: Tensor,
    layer: Layers = None,
    target: Target = None,
    *,
    n: int = 4,
    std: float = 0.3,
    seed: Seed = 0,
    chunk_size: int | None = None,
    progress: bool = False,
    **options: Unpack[Options],
) -> Maps:
    r"""Smooth Grad-CAM++ (Omeiza et al., 2019): Grad-CAM++ with gradient moments averaged over noisy inputs.

    With :math:`G_i = \partial S / \partial A` at :math:`x + \epsilon_i`,
    :math:`\epsilon_i \sim \mathcal N(0, \mathrm{std}^2)` and :math:`D_p = \frac1n \sum_i G_i^p`:

    .. math:: \alpha = \frac{D_2}{2 D_2 + \sum_{ab} A_{ab}\, D_3 + \epsilon}, \quad
              w_k = \sum_{ij} \alpha_{k,ij}\, \mathrm{ReLU}(D_{1,k,ij}), \quad L = \sum_k w_k A_k

    with :math:`A` the *clean* activation and the target (``None``: the clean top-1 class) fixed across
    noisy copies (torchcam mixes the last noisy activation in; camfn does not). Noise is drawn from
    ``seed`` and shared by the batch; ``std=0`` gives :func:`gradcampp` exactly. The ``n`` noisy
    forward/backward passes run as one batch of ``n * B`` noisy copies, ``chunk_size`` copies of the batch at a time.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> camfn.smooth_gradcampp(model, camfn.params(model), torch.randn(1, 3, 64, 64), "layer4", 3, n=2).shape
        torch.Size([1, 64, 64])
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise OptionError(f"n={n!r}: the number of noisy samples must be a positive int")
    opts = _options(options)
    traced, nodes, single = prepare(model, x, layer, opts)
    eng = engine(traced, nodes)
    output, acts = activations(eng, params, x)
    score = fixed(target, output, x.shape[0], num_classes(traced, x, opts["output"]), opts["output"])
    squeeze = score(output).ndim == 1
    noise = gaussian((n, *x.shape[1:]), std, seed, dtype=x.dtype, device=x.device)

    b = x.shape[0]
    info = traced.node_shapes(x)["output"]
    plain = isinstance(info, tuple) and len(info) == 2 and isinstance(info[0], torch.Size)  # a tensor output

    def flat_score(out: Tensor) -> Tensor:  # scores of c noisy copies of the batch, flattened to (c * B, ...)
        return vmap(score)(out.unflatten(0, (-1, b))).flatten(0, 1)

    def noisy_grads(eps: Tensor) -> list[Tensor]:
        """``dS/dA`` at ``x + eps_i`` for a chunk of noises ``(c, ...)``: ``(c, B, T, K, ...)`` per layer."""
        if plain:  # one batched pass over the c * B noisy copies
            noisy = (x.unsqueeze(0) + eps.unsqueeze(1)).flatten(0, 1)
            return [g.unflatten(0, (-1, b)) for g in gradients(eng, params, noisy, flat_score).grads]
        return list(vmap(lambda e: gradients(eng, params, x + e, score).grads)(eps))  # tuple/dict/object outputs

    def moments(idx: Tensor) -> tuple[Tensor, ...]:
        grads = noisy_grads(noise.index_select(0, idx))
        return tuple(torch.stack([g.sum(0), g.pow(2).sum(0), g.pow(3).sum(0)]) for g in grads)

    sums = chunked(moments, n, chunk_size, device=x.device, combine="sum", progress=progress, desc="smooth_gradcampp")
    fns = [to_maps(traced, model, node, x, opts) for node in nodes]  # the layout option (identity by default)
    raw = [
        reduce(_plusplus(fn(a).unsqueeze(1), *(per_target(fn, d) for d in (m / n).unbind(0))), opts["eigen_smooth"])
        for fn, a, m in zip(fns, acts, sums, strict=True)
    ]
    return finalize(raw, x, opts, squeeze, single)
