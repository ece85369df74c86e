r"""Post-processing of maps: ReLU, resize, min-max normalisation, layer fusion, principal components.

Every method ends with :func:`finish`, ``relu -> resize -> normalize``, each step an option:

.. math:: \hat L = \frac{R - \min R}{\max R - \min R}, \qquad R = \mathrm{resize}(\max(L, 0))

per map, with a constant map sent to zeros (never NaN). The division is by the range itself, not by
``range + eps``: random-weight maps can have ranges near ``1e-4``.

Example:
    >>> import torch
    >>> from camfn.postprocess import normalize
    >>> normalize(torch.tensor([[[1.0, 3.0], [2.0, 5.0]]]), ndim=2)
    tensor([[[0.0000, 0.5000],
             [0.2500, 1.0000]]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

__all__ = ["aggregate", "finish", "first_component", "fuse", "largest", "normalize", "resize"]

Size = str | tuple[int, ...] | None


def normalize(maps: Tensor, ndim: int = 2) -> Tensor:
    """Min-max normalise each map over its last ``ndim`` (spatial) axes to ``[0, 1]``; flat maps -> 0.

    A flat map has ``maps - low == 0`` exactly, so dividing it by 1 instead of its zero range gives zeros; a
    map with a NaN stays NaN (it is never disguised as a flat map)."""
    dims = tuple(range(-ndim, 0))
    low = maps.amin(dim=dims, keepdim=True)
    span = maps.amax(dim=dims, keepdim=True) - low
    return (maps - low) / torch.where(span > 0, span, 1.0)


def resize(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Resize ``(..., h, w)`` (or ``(..., d, h, w)``) maps, (tri)linear with ``align_corners=False``."""
    size = tuple(int(s) for s in size)
    ndim = len(size)
    if tuple(maps.shape[-ndim:]) == size:
        return maps
    lead = maps.shape[:-ndim]
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[ndim]
    flat = maps.reshape(-1, 1, *maps.shape[-ndim:])
    out = F.interpolate(flat, size=size, mode=mode, align_corners=False)
    return out.reshape(*lead, *size)


def finish(
    maps: Tensor,
    x: Tensor,
    *,
    relu: bool = True,
    size: Size = "input",
    normalize: bool = True,
) -> Tensor:
    """``relu -> resize -> normalize`` for maps ``(..., *spatial)`` of input ``x`` ``(B, C, *spatial)``.

    ``size``: ``"input"`` (``x``'s spatial size), ``None`` (the layer's own resolution) or a tuple.
    """
    ndim = x.ndim - 2
    if relu:
        maps = F.relu(maps)
    if size is not None:
        maps = resize(maps, x.shape[2:] if isinstance(size, str) else size)
    if normalize:
        maps = _normalize(maps, ndim)
    return maps


_normalize = normalize


def largest(maps: Sequence[Tensor], ndim: int = 2) -> tuple[int, ...]:
    """The largest spatial size along each of the last ``ndim`` axes of ``maps``."""
    return tuple(max(m.shape[-ndim + i] for m in maps) for i in range(ndim))


def fuse(maps: Sequence[Tensor], size: Sequence[int] | None = None, gamma: float = 2.0, ndim: int = 2) -> Tensor:
    r"""Fuse maps of several layers (LayerCAM, Jiang et al. 2021, Eq. 9 and Sec. 3.3).

    .. math:: F = \operatorname{normalize}\Big(\max_l \operatorname{resize}\big(\tanh(\gamma\, \hat L_l)\big)\Big)

    ``maps`` are per-layer maps ``(B, [T,] h_l, w_l)``, already in ``[0, 1]`` (the default output of every
    method with ``size=None``); ``size`` defaults to the largest map.

    Example:
        >>> import torch, torchvision, camfn
        >>> model = torchvision.models.resnet18().eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> maps = camfn.layercam(model, camfn.params(model), x, ["layer3", "layer4"], 3, size=None)
        >>> camfn.fuse(maps).shape
        torch.Size([1, 4, 4])
    """
    maps = list(maps)
    if not maps:
        raise ValueError("fuse needs at least one map")
    size = largest(maps, ndim) if size is None else size
    ndim = len(size)
    scaled = [resize(torch.tanh(gamma * m), size) for m in maps]
    return _normalize(torch.stack(scaled).amax(0), ndim)


def first_component(maps: Tensor, ndim: int = 2, reference: Tensor | None = None, sign: str = "correlation") -> Tensor:
    r"""Projection of ``(..., K, *spatial)`` onto its first principal component over space.

    Per map: ``X`` = the ``(HW, K)`` matrix, channels centred over space; ``X = U S V^T``;
    the result is ``X v_1`` reshaped to the spatial grid. The sign of a singular vector is arbitrary, so
    it is flipped where the projection correlates negatively with ``reference`` (default: ``sum_k X_k``);
    ``sign="extreme"`` instead flips it where ``|min| > |max|`` (Seg-Eigen-CAM's Eq. 13).
    """
    spatial = maps.shape[-ndim:]
    k = maps.shape[-ndim - 1]
    x = maps.reshape(*maps.shape[: -ndim - 1], k, -1).transpose(-1, -2)  # (..., HW, K)
    x = x - x.mean(dim=-2, keepdim=True)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    low = x.dtype in (torch.float16, torch.bfloat16)  # no half-precision SVD kernels: solve in float32
    _, _, vh = torch.linalg.svd(x.float() if low else x, full_matrices=False)
    proj = (x @ vh[..., 0, :].to(x.dtype).unsqueeze(-1)).squeeze(-1)  # (..., HW)
    if sign == "extreme":
        flip = proj.amin(-1, keepdim=True).abs() > proj.amax(-1, keepdim=True).abs()
        return torch.where(flip, -proj, proj).reshape(*proj.shape[:-1], *spatial)
    ref = x.sum(-1) if reference is None else reference.reshape(proj.shape)
    ref = ref - ref.mean(-1, keepdim=True)
    corr = ((proj - proj.mean(-1, keepdim=True)) * ref).sum(-1, keepdim=True)
    proj = torch.where(corr < 0, -proj, proj)
    return proj.reshape(*proj.shape[:-1], *spatial)


def aggregate(maps: Sequence[Tensor], size: Sequence[int] | None = None, ndim: int = 2) -> Tensor:
    r"""Average maps of several layers after per-layer scaling (grad-cam's ``aggregate_multi_layers``).

    .. math:: F = \operatorname{normalize}\Big(\frac{1}{n} \sum_{l=1}^{n}
              \operatorname{resize}\big(\operatorname{normalize}(\max(L_l, 0))\big)\Big)

    ``maps`` are per-layer maps ``(B, [T,] h_l, w_l)`` (e.g. a method's output for a list of layers with
    ``size=None``); ``size`` defaults to the largest map. Each layer counts the same whatever its range, as in
    grad-cam (which scales each layer's map to ``[0, 1]`` before the mean); :func:`fuse` is LayerCAM's
    ``tanh``-and-max fusion instead.

    Example:
        >>> import torch
        >>> from camfn.postprocess import aggregate
        >>> aggregate([torch.tensor([[[0.0, 2.0], [1.0, 2.0]]]), torch.tensor([[[0.0, 0.0], [0.0, 5.0]]])])
        tensor([[[0.0000, 0.5000],
                 [0.2500, 1.0000]]])
    """
    maps = list(maps)
    if not maps:
        raise InputError("aggregate needs at least one map: pass the list of per-layer maps")
    size = largest(maps, ndim) if size is None else size
    ndim = len(size)
    scaled = [resize(_normalize(F.relu(m), ndim), size) for m in maps]
    return _normalize(torch.stack(scaled).mean(0), ndim)
