r"""Localisation metrics: how a map's mass and ranking fall inside the object region.

``boxes``: ``(B, 4)`` boxes ``(x0, y0, x1, y1)`` in pixels, inclusive-exclusive as in torchvision, or
``(B, N, 4)`` for several per sample (their union), or a bool region mask of the maps' shape (any number of
spatial axes, e.g. a segmentation mask or a volume's mask). Maps and regions are compared position by position.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError, OptionError
from .common import average_ranks, check_positive
from .registry import metric

__all__ = [
    "auc",
    "energy_pointing_game",
    "pointing_game",
    "region_mask",
    "relevance_rank_accuracy",
    "top_k_intersection",
]


def _check_boxes(boxes: object, maps: Tensor) -> Tensor:
    b = maps.shape[0]
    if not isinstance(boxes, Tensor):
        boxes = torch.as_tensor(boxes)
    if boxes.ndim == 2:
        boxes = boxes.unsqueeze(1)
    if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
        raise InputError(
            f"boxes has shape {tuple(boxes.shape)}; expected ({b}, 4) boxes (x0, y0, x1, y1), one per map, "
            f"or ({b}, N, 4) for N boxes per map, or a bool mask of the maps' shape {tuple(maps.shape)}"
        )
    if bool(((boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])).any()):
        raise InputError("boxes must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1 (torchvision's xyxy format)")
    return boxes.to(device=maps.device)


def _check_maps(maps: object) -> Tensor:
    if not isinstance(maps, Tensor) or maps.ndim < 2 or not maps.is_floating_point():
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise InputError(f"maps must be a float (B, H, W) tensor (or (B, D, H, W) for volumes), got {got}")
    return maps


def _inside(boxes: Tensor, h: int, w: int, grow: float = 0) -> Tensor:
    """``(B, H, W)`` bool: pixel ``(r, c)`` lies in some box, ``x0 - g <= c < x1 + g`` and same for rows."""
    rows = torch.arange(h, device=boxes.device).reshape(1, 1, h, 1)
    cols = torch.arange(w, device=boxes.device).reshape(1, 1, 1, w)
    x0, y0, x1, y1 = (boxes[..., i].reshape(*boxes.shape[:2], 1, 1) for i in range(4))
    inside = (cols >= x0 - grow) & (cols < x1 + grow) & (rows >= y0 - grow) & (rows < y1 + grow)
    return inside.any(1)


def region_mask(maps: Tensor, boxes: Tensor, grow: float = 0) -> Tensor:
    """The region as a bool mask of the maps' shape: ``boxes`` grown by ``grow`` px, or a given mask.

    Example:
        >>> import torch
        >>> from camfn.metrics import region_mask
        >>> region_mask(torch.zeros(1, 2, 3), torch.tensor([[1, 0, 3, 1]])).int()
        tensor([[[0, 1, 1],
                 [0, 0, 0]]], dtype=torch.int32)
    """
    maps = _check_maps(maps)
    if isinstance(boxes, Tensor) and boxes.dtype == torch.bool:
        if boxes.shape != maps.shape:
            raise InputError(
                f"the region mask has shape {tuple(boxes.shape)}; it must match the maps' {tuple(maps.shape)}"
            )
        if grow:
            raise OptionError("tolerance applies to boxes only; grow the mask yourself (e.g. max_pool2d)")
        return boxes.to(maps.device)
    if maps.ndim != 3:
        raise InputError(f"maps has shape {tuple(maps.shape)}; boxes need (B, H, W) maps, volumes need a bool mask")
    return _inside(_check_boxes(boxes, maps), *maps.shape[1:], grow)


def _nonempty(region: Tensor, what: str) -> Tensor:
    flat = region.flatten(1)
    empty = ~flat.any(1)
    if bool(empty.any()):
        raise InputError(f"{what}: the region of sample(s) {empty.nonzero().flatten().tolist()} is empty; pass a box "
                         "or mask covering at least one pixel")  # fmt: skip
    return flat


@metric(needs=("maps", "boxes"), higher_is_better=True)
def pointing_game(maps: Tensor, boxes: Tensor, tolerance: float = 15) -> Tensor:
    r"""Pointing game (Zhang et al., 2016): ``(B,)`` bool, True when the map's maximum hits the region.

    The maximum is the first maximal pixel in raster order, ``(r, c)``; a box ``(x0, y0, x1, y1)`` is grown by
    ``tolerance`` px on every side (a mask is used as given, ``tolerance=0``):

    .. math:: \mathrm{hit}_b = [x_0 - t \le c < x_1 + t] \wedge [y_0 - t \le r < y_1 + t]

    Example:
        >>> import torch
        >>> from camfn.metrics import pointing_game
        >>> maps = torch.zeros(2, 32, 32)
        >>> maps[0, 5, 20] = maps[1, 5, 30] = 1.0  # row 5; columns 20 and 30
        >>> pointing_game(maps, torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10]]), tolerance=15)
        tensor([ True, False])
    """
    is_mask = isinstance(boxes, Tensor) and boxes.dtype == torch.bool
    hit = region_mask(maps, boxes, 0 if is_mask else tolerance).flatten(1)
    peak = maps.flatten(1).argmax(1)
    return hit.gather(1, peak.unsqueeze(1)).squeeze(1)


@metric(needs=("maps", "boxes"), higher_is_better=True)
def energy_pointing_game(maps: Tensor, boxes: Tensor) -> Tensor:
    r"""Energy-based pointing game (Wang et al., Score-CAM, 2020): share of each map's mass inside the region.

    .. math:: E_b = \frac{\sum_{i \in \mathrm{region}} L_{b,i}}{\sum_i L_{b,i}}

    ``maps`` non-negative; equal to Quantus 0.6 ``RelevanceMassAccuracy``. A map with zero mass gives 0.

    Example:
        >>> import torch
        >>> from camfn.metrics import energy_pointing_game
        >>> maps = torch.zeros(1, 4, 4)
        >>> maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0
        >>> energy_pointing_game(maps, torch.tensor([[0, 0, 2, 2]]))
        tensor([0.7500])
    """
    inside = region_mask(maps, boxes).to(maps.dtype)
    if bool((maps < 0).any()):
        raise InputError("maps has negative values; the energy pointing game needs non-negative maps (relu=True)")
    total = maps.flatten(1).sum(1)
    part = (maps * inside).flatten(1).sum(1)
    return torch.where(total > 0, part / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


@metric(needs=("maps", "boxes"), higher_is_better=True)
def top_k_intersection(maps: Tensor, boxes: Tensor, k: int = 1000, *, concept_influence: bool = False) -> Tensor:
    r"""Top-k intersection (Theiner et al., 2021): share of the ``k`` highest map positions inside the region.

    .. math:: \mathrm{TKI}_b = \frac{1}{k} \big|\mathrm{top}_k(L_b) \cap R_b\big|
              \quad (\times \tfrac{N}{|R_b|} \text{ with } \texttt{concept\_influence})

    Ties in raster order (Quantus 0.6 ``TopKIntersection`` sorts unstably; equal on maps without ties).

    Example:
        >>> import torch
        >>> from camfn.metrics import top_k_intersection
        >>> maps = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
        >>> top_k_intersection(maps, torch.tensor([[0, 0, 1, 2]]), k=2)  # the left column
        tensor([0.5000])
    """
    region = _nonempty(region_mask(maps, boxes), "top_k_intersection")
    n = region.shape[1]
    k = check_positive("k", k, "the number of top positions")
    if k > n:
        raise OptionError(f"k={k} exceeds the {n} positions of a map; pass k <= {n}")
    top = maps.flatten(1).sort(dim=1, descending=True, stable=True).indices[:, :k]
    share = region.gather(1, top).to(maps.dtype).mean(1)
    return share * n / region.sum(1).to(maps.dtype) if concept_influence else share


@metric(needs=("maps", "boxes"), higher_is_better=True)
def relevance_rank_accuracy(maps: Tensor, boxes: Tensor) -> Tensor:
    r"""Relevance rank accuracy (Arras et al., 2022): share of the ``|R|`` highest positions inside the region ``R``.

    .. math:: \mathrm{RRA}_b = \frac{\big|\mathrm{top}_{|R_b|}(L_b) \cap R_b\big|}{|R_b|}

    Equal to Quantus 0.6 ``RelevanceRankAccuracy`` (ties in raster order).

    Example:
        >>> import torch
        >>> from camfn.metrics import relevance_rank_accuracy
        >>> maps = torch.tensor([[[4.0, 1.0], [3.0, 2.0]]])
        >>> relevance_rank_accuracy(maps, torch.tensor([[0, 0, 1, 2]]))  # the left column holds the top 2
        tensor([1.])
    """
    region = _nonempty(region_mask(maps, boxes), "relevance_rank_accuracy")
    size = region.sum(1, keepdim=True)
    order = maps.flatten(1).sort(dim=1, descending=True, stable=True).indices
    first = torch.arange(region.shape[1], device=maps.device)[None] < size
    return (region.gather(1, order) & first).sum(1).to(maps.dtype) / size.squeeze(1).to(maps.dtype)


@metric(needs=("maps", "boxes"), higher_is_better=True)
def auc(maps: Tensor, boxes: Tensor) -> Tensor:
    r"""Localisation AUC (Fawcett, 2006): area under the ROC curve of the map as a detector of the region.

    The Mann-Whitney form, ties counted one half (sklearn's ``roc_auc_score``, Quantus 0.6 ``AUC``):

    .. math:: \mathrm{AUC}_b = \frac{\sum_{i \in R_b} \mathrm{rank}(L_{b,i}) - |R_b|(|R_b| + 1)/2}{|R_b|\,(N - |R_b|)}

    The region must hold some but not all positions.

    Example:
        >>> import torch
        >>> from camfn.metrics import auc
        >>> auc(torch.tensor([[[0.9, 0.1], [0.8, 0.2]]]), torch.tensor([[0, 0, 1, 2]]))
        tensor([1.])
    """
    region = _nonempty(region_mask(maps, boxes), "auc")
    full = region.all(1)
    if bool(full.any()):
        raise InputError(f"auc: the region of sample(s) {full.nonzero().flatten().tolist()} covers the whole map; "
                         "a ROC curve needs positions outside it too")  # fmt: skip
    r = average_ranks(maps.flatten(1).double())
    pos = region.sum(1).double()
    neg = region.shape[1] - pos
    u = (r * region).sum(1) - pos * (pos + 1) / 2
    return (u / (pos * neg)).to(maps.dtype)
