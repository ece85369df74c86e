"""Targets: what score ``S`` a map explains.

A target becomes a *score function* ``output -> (B, T)``: ``T`` scores per sample, all from one forward
pass. Accepted forms:

=======================  ============================================  ===============
``target``               score                                         map shape
=======================  ============================================  ===============
``None``                 logit of the top-1 class of each sample       ``(B, H, W)``
``int c``                ``output[:, c]``                              ``(B, H, W)``
``(B,)`` long tensor     ``output[b, t_b]``                            ``(B, H, W)``
``(B, T)`` long          ``output[b, t_bj]`` for each ``j``            ``(B, T, H, W)``
callable                 ``fn(output)``, shape ``(B,)`` or ``(B, T)``  as its shape
list of ``B`` callables  ``fn_b(output[b])`` (grad-cam's targets)      ``(B, H, W)``
=======================  ============================================  ===============

Selection uses ``gather`` so it works under ``torch.func.vmap`` (no ``.item()``).

Ready-made callable targets (each ``output -> (B,)``, batched and ``vmap``-safe on tensor outputs):
:func:`logit`, :func:`probability`, :func:`contrastive` (Finer-CAM), :func:`segmentation`,
:func:`detection` (torchvision detection outputs) and :func:`similarity` (embeddings). Models that return
tuples, dicts or objects with ``.logits`` are explained with the ``output`` option (see :func:`pick`),
e.g. ``camfn.gradcam(..., target=camfn.targets.segmentation(3), output="out")``.

Example:
    >>> import torch
    >>> from camfn.targets import scores
    >>> fn = scores(torch.tensor([[1, 2], [0, 0]]), batch=2, num_classes=3)
    >>> fn(torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]))
    tensor([[1., 2.],
            [3., 3.]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import OptionError, TargetError
from .runtime import concrete, peek

__all__ = [
    "Anchored",
    "Output",
    "Target",
    "best_query",
    "binary",
    "classes",
    "concrete",
    "contrastive",
    "detection",
    "fixed",
    "is_callable",
    "is_per_sample",
    "logit",
    "per_sample",
    "pick",
    "probability",
    "resolve",
    "rest",
    "scores",
    "segmentation",
    "similarity",
]

Target = int | Tensor | Callable[[Tensor], Tensor] | None
ScoreFn = Callable[[Tensor], Tensor]
Output = str | int | Callable[[Any], Any] | None
"""The ``output`` option: which part of the model's output the target reads."""


def logit(c: int | Tensor) -> ScoreFn:
    """Target: the raw logit of class ``c`` (an int, or one class per sample as a ``(B,)`` tensor).

    ``S_b = output[b, c_b]``.
    """

    def score(output: Tensor) -> Tensor:
        index = torch.as_tensor(c, device=output.device).expand(output.shape[0]).reshape(-1, 1)
        return output.gather(1, index).squeeze(1)

    return score


def _class_index(c: int | Tensor | None, output: Tensor) -> Tensor:
    """Class indices ``(B, 1)`` for ``c`` (an int, a ``(B,)`` tensor, or ``None``: the top-1 class), checked
    against the number of classes."""
    if c is None:
        return output.argmax(1, keepdim=True)
    index = _as_index(c, "class").to(output.device)
    _check_range(index, output.shape[1])
    if index.ndim > 1 or (index.ndim == 1 and index.shape[0] not in (1, output.shape[0])):
        raise TargetError(
            f"class {tuple(index.shape)} does not fit a batch of {output.shape[0]}: "
            f"pass an int or a ({output.shape[0]},) tensor"
        )
    return index.expand(output.shape[0]).reshape(-1, 1)


def _as_index(c: object, what: str) -> Tensor:
    """``c`` (an int, a sequence or a tensor of ints) as a long tensor; anything else is a TargetError."""
    if isinstance(c, bool) or (isinstance(c, Tensor) and c.dtype == torch.bool):
        raise TargetError(f"{what} {c!r} is a bool; pass a class index (int) or a long tensor of indices")
    if isinstance(c, int) and not -(2**63) <= c < 2**63:
        raise TargetError(
            f"{what} {c} is not a valid class index (out of the int64 range); pass a class index of the model"
        )
    if isinstance(c, Tensor):
        if c.is_floating_point() or c.is_complex():
            raise TargetError(f"{what} has dtype {c.dtype}; class indices must be integers: convert with .long()")
        return c.long()
    try:
        t = torch.as_tensor(c)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise TargetError(f"{what} {c!r} is not a class index or a list of them ({err})") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TargetError(f"{what} {c!r} must be integer class indices, got {t.dtype}")
    return t.long()


def _logits(output: object, what: str) -> Tensor:
    if not isinstance(output, Tensor) or output.ndim != 2:
        got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise TargetError(f"{what} needs (B, num_classes) logits, got {got}; select them with the output= option")
    return output


def probability(c: int | Tensor | None = None) -> ScoreFn:
    r"""Target: the softmax probability of class ``c`` (``None``: each sample's top-1 class).

    .. math:: S_b = \frac{\exp y_{b, c_b}}{\sum_j \exp y_{b, j}}

    Example:
        >>> import torch
        >>> from camfn.targets import probability
        >>> probability(1)(torch.tensor([[0.0, 0.0], [0.0, 2.0]]))
        tensor([0.5000, 0.8808])
    """

    def score(output: Tensor) -> Tensor:
        output = _logits(output, "probability")
        return output.softmax(1).gather(1, _class_index(c, output)).squeeze(1)

    return score


def contrastive(
    c: int | Tensor | None = None,
    others: int | Sequence[int] | Tensor | None = None,
    *,
    k: int = 1,
    gamma: float = 1.0,
) -> ScoreFn:
    r"""Target: class ``c`` against similar classes, as in Finer-CAM (Zhang et al., CVPR 2025).

    .. math:: S_b = y_{b, c_b} - \gamma \, \frac{1}{|D_b|} \sum_{d \in D_b} y_{b, d}

    ``D_b`` is ``others`` (an int, a list or ``(M,)`` tensor shared by the batch, or a ``(B, M)`` tensor per
    sample) or, with ``others=None``, the ``k`` classes with the highest logits other than ``c_b`` (the
    classes the model confuses with ``c_b``). ``c=None`` is each sample's top-1 class. ``gamma`` is the
    comparison strength: 0 gives the plain logit, 1 the full difference. The map then shows what tells
    ``c`` apart from ``D`` rather than everything that supports ``c``.

    Example:
        >>> import torch
        >>> from camfn.targets import contrastive
        >>> y = torch.tensor([[3.0, 2.0, 0.0], [1.0, 5.0, 4.0]])
        >>> contrastive(0)(y), contrastive(None, k=2)(y), contrastive(0, [1, 2], gamma=0.5)(y)
        (tensor([ 1., -4.]), tensor([2.0000, 2.5000]), tensor([ 2.5000, -1.2500]))
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TargetError(f"k={k!r}: the number of classes to contrast with must be a positive int; pass k >= 1")
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not math.isfinite(gamma) or gamma < 0:
        raise TargetError(
            f"gamma={gamma!r}: the comparison strength must be a finite number >= 0; "
            "pass e.g. gamma=1.0 (0: the plain logit)"
        )
    if others is not None and not isinstance(others, Tensor | int) and len(others) == 0:
        raise TargetError("others is empty: pass the classes to contrast with, or others=None for the k closest")
    rivals = None if others is None else _as_index(others, "others")
    if rivals is not None and rivals.numel() == 0:
        raise TargetError("others is empty: pass the classes to contrast with, or others=None for the k closest")

    def score(output: Tensor) -> Tensor:
        output = _logits(output, "contrastive")
        index = _class_index(c, output)
        if others is None:
            if output.shape[1] < 2:
                raise TargetError("contrastive needs at least two classes")
            is_c = torch.arange(output.shape[1], device=output.device) == index
            rest = torch.where(is_c, torch.full_like(output, -torch.inf), output)
            other = rest.topk(min(k, output.shape[1] - 1), 1).indices  # k capped at the classes there are
        else:
            other = rivals.to(output.device)
            _check_range(other, output.shape[1])
            other = other.reshape(1, -1) if other.ndim < 2 else other
            other = other.expand(output.shape[0], other.shape[1])
        return output.gather(1, index).squeeze(1) - gamma * output.gather(1, other).mean(1)

    return score


def segmentation(c: int | Tensor, mask: Tensor | None = None) -> ScoreFn:
    r"""Target for semantic segmentation: class ``c``'s logits summed over a mask.

    For an output ``(B, C, H, W)`` (e.g. torchvision's ``model(x)["out"]``: pass ``output="out"``):

    .. math:: S_b = \sum_{ij} y_{b, c_b, ij} \, M_{b, ij}

    ``mask`` is ``(H, W)`` or ``(B, H, W)`` (bool or float); ``None`` is where ``c`` is the arg-max class,
    read from the same output (it carries no gradient). ``c`` is an int or a ``(B,)`` tensor.

    Example:
        >>> import torch
        >>> from camfn.targets import segmentation
        >>> y = torch.zeros(1, 2, 2, 2)
        >>> y[0, 1] = torch.tensor([[1.0, 2.0], [-1.0, 3.0]])
        >>> segmentation(1)(y), segmentation(1, torch.ones(2, 2))(y)
        (tensor([6.]), tensor([5.]))
    """

    def score(output: Tensor) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim < 3:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise TargetError(f"segmentation needs (B, C, H, W) scores, got {got}; for a dict output pass output='out'")
        b, spatial = output.shape[0], output.shape[2:]
        index = torch.as_tensor(c, device=output.device).expand(b).reshape(b, 1, *([1] * len(spatial)))
        picked = output.gather(1, index.expand(b, 1, *spatial)).squeeze(1)
        if mask is None:
            region = (output.argmax(1) == index.squeeze(1)).to(output.dtype)
        else:
            region = torch.as_tensor(mask, device=output.device).to(output.dtype)
            if region.shape[-len(spatial) :] != spatial:
                raise TargetError(
                    f"mask has shape {tuple(region.shape)}; the output's spatial size is {tuple(spatial)}"
                )
        return (picked * region).flatten(1).sum(1)

    return score


def _box_score(
    found: Mapping[str, Tensor], boxes: Tensor, labels: Tensor, iou: float, with_iou: bool = False
) -> Tensor:
    """``sum_j`` score of the predicted box matching reference box ``j`` (same label, best IoU > ``iou``),
    plus the match's IoU when ``with_iou``."""
    from torchvision.ops import box_iou

    scores = found["scores"]
    if scores.numel() == 0 or boxes.numel() == 0:
        return scores.sum() * 0
    boxes = boxes.to(device=found["boxes"].device, dtype=found["boxes"].dtype).reshape(-1, 4)
    overlap = box_iou(boxes, found["boxes"])  # (references, predictions)
    labels = labels.to(found["labels"].device).reshape(-1, 1)
    valid = (labels == found["labels"].reshape(1, -1)) & (overlap > iou)
    best = torch.where(valid, overlap, torch.full_like(overlap, -1)).argmax(1)
    matched = scores[best] + overlap.gather(1, best.reshape(-1, 1)).squeeze(1) if with_iou else scores[best]
    return torch.where(valid.any(1), matched, torch.zeros_like(matched)).sum()


def detection(
    boxes: Tensor | Sequence[Tensor],
    labels: Tensor | Sequence[Tensor],
    iou: float = 0.5,
    *,
    score: str = "score",
) -> Callable[[Any], Tensor]:
    r"""Target for torchvision detection outputs (a list of dicts with ``boxes``, ``labels``, ``scores``).

    For each image ``b`` and reference box ``r_j`` with label ``l_j``, the *match* is the predicted box
    with label ``l_j`` and the highest IoU with ``r_j``, if that IoU exceeds ``iou``:

    .. math:: S_b = \sum_j \begin{cases} s_{\mathrm{match}(j)} & \text{if } r_j \text{ has a match} \\
              0 & \text{otherwise} \end{cases}

    ``boxes`` (``(N, 4)``, ``x1, y1, x2, y2``) and ``labels`` (``(N,)``) are shared by the batch, or lists
    with one entry per image. Differentiable through the predicted scores.

    ``score="iou+score"`` adds the match's IoU, :math:`s_{\mathrm{match}(j)} + \mathrm{IoU}(r_j, \mathrm{match}(j))`
    (pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``; differentiable through the predicted boxes too). The
    match rule stays camfn's: grad-cam takes the best IoU over boxes of *any* label and then requires the
    label, so it finds no match where a box of another label overlaps more.

    Example:
        >>> import torch
        >>> from camfn.targets import detection
        >>> found = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]),
        ...           "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.6])}]
        >>> detection(torch.tensor([[1.0, 1, 10, 10], [20, 20, 30, 30]]), torch.tensor([1, 1]))(found)
        tensor([0.9000])
        >>> detection(torch.tensor([[1.0, 1, 10, 10]]), torch.tensor([1]), score="iou+score")(found)
        tensor([1.7100])
    """
    if score not in ("score", "iou+score"):
        raise TargetError(f"score={score!r}: use 'score' (the matched box's score) or 'iou+score' (grad-cam's)")
    with_iou = score == "iou+score"

    def box_scores(output: Any) -> Tensor:
        found = [output] if isinstance(output, Mapping) else output
        if not isinstance(found, Sequence) or not all(
            isinstance(f, Mapping) and {"boxes", "labels", "scores"} <= set(f) for f in found
        ):
            raise TargetError(
                "detection needs torchvision detection outputs: a list of dicts with 'boxes', 'labels' and "
                f"'scores' (one per image), got {type(output).__name__}"
            )
        per_image = isinstance(boxes, Sequence) and not isinstance(boxes, Tensor)
        if per_image and (len(boxes) != len(found) or len(labels) != len(found)):
            raise TargetError(
                f"boxes/labels are per image lists of {len(boxes)}/{len(labels)}, the batch has {len(found)}"
            )
        ref = [(boxes[i], labels[i]) if per_image else (boxes, labels) for i in range(len(found))]
        return torch.stack(
            [
                _box_score(f, torch.as_tensor(b), torch.as_tensor(lab), iou, with_iou)
                for f, (b, lab) in zip(found, ref, strict=True)
            ]
        )

    return box_scores


def best_query(c: int | Tensor | None = None) -> ScoreFn:
    r"""Target for DETR-style detectors: logits ``(B, Q, C + 1)``, one row per object query, the last column
    "no object".

    ``c=None``: the most confident query's most likely real class,
    :math:`S_b = \max_{q,\, k < C} \mathrm{logits}_{b, q, k}`; ``c`` (an int, a ``(B,)`` or ``(B, T)`` tensor):
    class ``c``'s best query, :math:`S_b = \max_q \mathrm{logits}_{b, q, c_b}`.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[1.0, 5.0, 9.0], [3.0, 0.0, 0.0]]])  # 2 queries, 2 classes + no object
        >>> best_query()(logits), best_query(0)(logits)
        (tensor([5.]), tensor([3.]))
    """

    def score(output: Tensor) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim != 3 or output.shape[2] < 2:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise TargetError(
                f"best_query needs query logits (B, queries, classes + 1), got {got}; select them with output="
            )
        real = output[..., :-1]
        if c is None:
            return real.amax((1, 2))
        index = _as_index(c, "class")
        _check_range(index, real.shape[2])
        if index.ndim == 2:  # (B, T): T classes per sample
            return real.amax(1).gather(1, index.to(output.device))
        return real.amax(1).gather(1, index.to(output.device).expand(output.shape[0]).reshape(-1, 1)).squeeze(1)

    return score


def similarity(reference: Tensor) -> ScoreFn:
    r"""Target for embedding models: cosine similarity between the output embedding and ``reference``.

    .. math:: S_b = \frac{\langle e_b, r_b \rangle}{\max(\lVert e_b \rVert \lVert r_b \rVert, \epsilon)}

    ``reference`` is ``(D,)`` (shared) or ``(B, D)``; outputs ``(B, ...)`` are flattened to ``(B, D)``.

    Example:
        >>> import torch
        >>> from camfn.targets import similarity
        >>> similarity(torch.tensor([1.0, 0.0]))(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
        tensor([1.0000, 0.7071])
    """

    def score(output: Tensor) -> Tensor:
        if not isinstance(output, Tensor):
            raise TargetError(f"similarity needs a tensor embedding, got {type(output).__name__}; use output=")
        e = output.flatten(1)
        r = torch.as_tensor(reference, device=output.device, dtype=output.dtype)
        r = r.reshape(1, -1) if r.ndim < 2 else r.flatten(1)
        if r.shape[1] != e.shape[1]:
            raise TargetError(f"reference has {r.shape[1]} features, the model's embedding has {e.shape[1]}")
        return F.cosine_similarity(e, r.expand_as(e), dim=1)

    return score


def pick(output: Any, selector: Output) -> Any:
    """The part of a model's output that the target reads: the ``output`` option.

    ``None``: the output as it is; a ``str``: a dict key, else an attribute (``"logits"`` of Hugging Face
    outputs, ``"out"`` of torchvision segmentation models); an ``int``: an index into a tuple or list; a
    callable: ``selector(output)``.

    Example:
        >>> import torch
        >>> from camfn.targets import pick
        >>> pick({"out": torch.zeros(1, 2), "aux": None}, "out").shape, pick((1, 2), -1)
        (torch.Size([1, 2]), 2)
    """
    if selector is None:
        return output
    if isinstance(selector, str):
        if isinstance(output, Mapping):
            if selector in output:
                return output[selector]
            raise OptionError(f"output={selector!r}: the model returns a dict with keys {list(output)}; pick one")
        if hasattr(output, selector):
            return getattr(output, selector)
        raise OptionError(
            f"output={selector!r}: the model returns a {type(output).__name__} without that attribute; pass None "
            "(the output as it is), a key or attribute it has, an index or a callable"
        )
    if isinstance(selector, int) and not isinstance(selector, bool):
        if isinstance(output, tuple | list) and -len(output) <= selector < len(output):
            return output[selector]
        n = len(output) if isinstance(output, tuple | list) else None
        raise OptionError(
            f"output={selector}: the model returns a {type(output).__name__}"
            + (f" of {n} items" if n is not None else ", not a tuple or list")
        )
    if callable(selector):
        return selector(output)
    raise OptionError(f"output={selector!r}: use None, a str key or attribute, an int index or a callable")


def _check_logits(output: object, what: str) -> Tensor:
    if not isinstance(output, Tensor):
        keys = f" with keys {list(output)}" if isinstance(output, Mapping) else ""
        raise TargetError(
            f"the model returns a {type(output).__name__}{keys}, so a class {what} cannot pick a score; "
            "select the logits with the output= option (a dict key, an attribute such as 'logits', a tuple "
            "index or a callable), or pass target=callable(output) -> (B,) scores"
        )
    if output.ndim != 2:
        raise TargetError(
            f"the model's output has shape {tuple(output.shape)}; class targets need (B, num_classes) logits. "
            "Pass target=callable(output) -> (B,) scores (e.g. a segmentation or detection target)"
        )
    return output


def classes(
    target: int | Tensor | None, batch: int, num_classes: int | None
) -> tuple[Callable[[Tensor], Tensor], bool]:
    """Class indices as a function ``output -> (B, T)`` long tensor, and whether to squeeze ``T``.

    Validates the target against the batch size and (when known) the number of classes.
    """
    if target is None:
        return (lambda out: _check_logits(out, "index").argmax(1, keepdim=True)), True
    if isinstance(target, bool) or (isinstance(target, Tensor) and target.dtype == torch.bool):
        raise TargetError("target is a bool; pass a class index (int) or a long tensor of class indices")
    if is_per_sample(target):
        raise TargetError(
            "this method needs class indices (None, an int, a (B,) or (B, T) long tensor), not per-sample target "
            "callables; use a gradient method such as gradcam for those, or pass the classes as a tensor"
        )
    if isinstance(target, int):
        if not (num_classes is not None and 0 <= target < num_classes):  # else checked as a tensor
            _check_range(_as_index(target, "target class"), num_classes)
        return (lambda out: torch.full((out.shape[0], 1), target, dtype=torch.long, device=out.device)), True
    if not isinstance(target, Tensor):
        raise TargetError(
            f"target of type {type(target).__name__} is not understood; pass None, an int, a (B,) or (B, T) "
            "long tensor, or a callable output -> (B,) scores"
        )
    if target.is_floating_point() or target.is_complex():
        raise TargetError(
            f"target has dtype {target.dtype}; class indices must be integers: convert with target.long()"
        )
    if target.ndim not in (1, 2) or target.shape[0] != batch:
        raise TargetError(
            f"target has shape {tuple(target.shape)} but the batch has {batch} sample(s); pass an int, "
            f"a ({batch},) tensor (one class per sample) or a ({batch}, T) tensor (T classes per sample)"
        )
    if target.ndim == 2 and target.shape[1] == 0:
        raise TargetError("target has shape (B, 0): pass at least one class per sample")
    _check_range(target, num_classes)
    squeeze = target.ndim == 1
    index = target.long().reshape(batch, -1)
    return (lambda out: index.to(out.device)), squeeze


def _check_range(target: Tensor, num_classes: int | None) -> None:
    target = peek(target) if num_classes is not None else None
    if target is None or target.numel() == 0:
        return
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise TargetError(
            f"target class {bad} is out of range: the model has {num_classes} outputs; "
            f"pass a class in 0..{num_classes - 1}"
        )


def scores(target: Target, batch: int, num_classes: int | None, output: Output = None) -> ScoreFn:
    """The score function ``model output -> (B,)`` or ``(B, T)`` for ``target`` (validated first).

    A ``(B,)`` result gives one map per sample, ``(B, T)`` gives ``T`` maps per sample. ``output`` selects
    the part of the model's output the target reads (:func:`pick`); ``num_classes`` is that part's width
    when known in advance (class indices are also checked against it on the first call).
    """
    if is_per_sample(target):
        target = per_sample(target)
    if callable(target) and not isinstance(target, Tensor):
        checked = _checked(target, batch)
        return checked if output is None else (lambda out: checked(pick(out, output)))
    index, squeeze = classes(target, batch, num_classes)
    checked_range = num_classes is not None

    def score(out: Any) -> Tensor:
        nonlocal checked_range
        logits = _check_logits(pick(out, output), "index")
        idx = index(logits)
        if not checked_range and target is not None:
            _check_range(idx, logits.shape[1])
            checked_range = concrete(idx)
        picked = logits.gather(1, idx)
        return picked.squeeze(1) if squeeze else picked

    return score


class Anchored:
    r"""A target defined relative to the clean output itself: ``make(anchor) -> score`` (e.g. an embedding's
    length along its own clean direction, :func:`camfn.adapters.transformers.toward`).

    Called on an output, it anchors on that very output, detached:
    :math:`S(o) = \mathrm{make}(\mathrm{sg}(o))(o)`, so a gradient method needs no extra clean forward;
    :func:`resolve` pins the anchor to the clean output (``make(clean)``) for methods that score perturbed or
    noisy copies, so every copy is scored against the clean input.

    Example:
        >>> import torch
        >>> from camfn.targets import Anchored, resolve
        >>> along = Anchored(lambda r: lambda o: (o * r).sum(1))
        >>> along(torch.tensor([[1.0, 2.0]])), resolve(along, torch.tensor([[1.0, 0.0]]))(torch.tensor([[3.0, 5.0]]))
        (tensor([5.]), tensor([3.]))
    """

    def __init__(self, make: Callable[[Tensor], ScoreFn]) -> None:
        self.make = make

    def __call__(self, output: Tensor) -> Tensor:
        return self.make(output.detach())(output)


def resolve(target: Target, output: Any, selector: Output = None) -> Target:
    """``target`` with ``None`` made concrete: the top-1 class ``(B,)`` of ``output`` (after ``selector``); an
    :class:`Anchored` target anchored on ``output``.

    The one place a default target becomes a fixed class (perturbation methods, smoothing, metrics,
    evaluation and the command line all call it).

    Example:
        >>> import torch
        >>> from camfn.targets import resolve
        >>> resolve(None, torch.tensor([[0.0, 2.0], [3.0, 1.0]])).tolist(), resolve(4, None)
        ([1, 0], 4)
    """
    if isinstance(target, Anchored):
        return target.make(pick(output, selector).detach())
    if target is not None:
        return target
    logits = _check_logits(pick(output, selector), "index")
    return logits.argmax(1)


def fixed(target: Target, output: Any, batch: int, num_classes: int | None, selector: Output = None) -> ScoreFn:
    """:func:`scores` with ``None`` resolved once (:func:`resolve`) to the top-1 class of the clean ``output``.

    Methods that score perturbed or noisy copies of ``x`` use it, so every copy explains the clean
    input's class rather than its own top-1.
    """
    return scores(resolve(target, output, selector), batch, num_classes, selector)


def _checked(fn: Callable[[Tensor], Tensor], batch: int) -> ScoreFn:
    def score(output: Tensor) -> Tensor:
        s = fn(output)
        if not isinstance(s, Tensor) or s.ndim not in (1, 2) or s.shape[0] != batch:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise TargetError(f"the target callable returned {got}; it must return ({batch},) or ({batch}, T) scores")
        if not s.is_floating_point():
            raise TargetError(
                f"the target callable returned {s.dtype} scores; a score must be a float tensor that depends on the "
                "output: return e.g. output[:, c], not output.argmax(1)"
            )
        return s

    return score


def counterfactual(c: int | Tensor | None = None) -> ScoreFn:
    r"""Target: the *negated* logit of class ``c``, for counterfactual maps (Selvaraju et al. 2017, Sec. 5).

    .. math:: S_b = -y_{b, c_b}

    so ``G = dS/dA`` is the negated gradient of the logit: a gradient method then shows the regions whose
    removal would make the model more confident in ``c`` (``c=None``: each sample's top-1 class).
    ``c`` is an int or a ``(B,)`` tensor.

    Example:
        >>> import torch
        >>> from camfn.targets import counterfactual
        >>> counterfactual(1)(torch.tensor([[0.0, 2.0], [3.0, -1.0]])), counterfactual()(torch.tensor([[0.0, 2.0]]))
        (tensor([-2.,  1.]), tensor([-2.]))
    """

    def score(output: Tensor) -> Tensor:
        output = _logits(output, "counterfactual")
        return -output.gather(1, _class_index(c, output)).squeeze(1)

    return score


def _is_gradcam_target(target: object) -> bool:
    """A target object of pytorch-grad-cam (``ClassifierOutputTarget`` & co.): called on one sample's output."""
    return callable(target) and type(target).__module__.startswith("pytorch_grad_cam.")


def is_per_sample(target: object) -> bool:
    """Whether ``target`` is applied sample by sample: a list or tuple of callables (grad-cam's ``targets``),
    or one of pytorch-grad-cam's own target objects (applied to every sample)."""
    if isinstance(target, list | tuple):
        return len(target) > 0 and all(callable(t) and not isinstance(t, Tensor) for t in target)
    return _is_gradcam_target(target)


def is_callable(target: object) -> bool:
    """Whether ``target`` is a score callable (one for the batch, or per-sample ones), not class indices."""
    return (callable(target) and not isinstance(target, Tensor)) or is_per_sample(target)


def _sample(output: Any, b: int | None) -> Any:
    """Sample ``b`` of a batched output (``None``: only check that it has a batch to index)."""
    if (isinstance(output, Tensor) and output.ndim > 0) or isinstance(output, list | tuple):
        return output if b is None else output[b]
    raise TargetError(
        f"per-sample targets index the model's output by sample, but it is a {type(output).__name__}; "
        "select the batched part with the output= option (a key, an attribute such as 'logits', or an index)"
    )


def per_sample(targets: Callable[[Any], Tensor] | Sequence[Callable[[Any], Tensor]]) -> ScoreFn:
    r"""Target from per-sample callables, as pytorch-grad-cam takes them: ``S_b = f_b(\mathrm{output}[b])``.

    ``targets`` is a list of ``B`` callables, one per sample, each called on that sample's output without
    the batch axis (``output[b]``: a ``(C,)`` logit vector, a ``(C, H, W)`` segmentation map, one image's
    detection dict), e.g. ``[ClassifierOutputTarget(3), ClassifierOutputTarget(7)]``; or a single callable,
    applied to every sample. Each must return one score (a float tensor with one element). A list whose
    length is not the batch size is a :class:`~camfn.errors.TargetError` (grad-cam silently leaves the
    missing samples' maps at zero). :func:`scores` applies this to any list of callables and to
    pytorch-grad-cam's own target objects.

    Example:
        >>> import torch
        >>> from camfn.targets import per_sample
        >>> per_sample([lambda y: y[0], lambda y: y[1] * 2])(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([1., 8.])
    """
    if callable(targets) and not isinstance(targets, Tensor):
        fns: tuple | None = None
        one = targets
    elif is_per_sample(targets):
        fns, one = tuple(targets), None
    else:
        raise TargetError(
            f"per_sample takes a callable or a non-empty list of callables (one per sample), got {targets!r}"
        )

    def score(output: Any) -> Tensor:
        _sample(output, None)  # refuses an output that has no batch axis to index
        n = len(output) if isinstance(output, list | tuple) else output.shape[0]
        if fns is not None and len(fns) != n:
            raise TargetError(
                f"the target list has {len(fns)} callable(s) but the batch has {n} sample(s); pass one target per "
                "sample (e.g. [ClassifierOutputTarget(c)] * len(x)), or one callable for the whole batch"
            )
        values = []
        for b in range(n):
            fn = one if fns is None else fns[b]
            s = fn(_sample(output, b))
            if not isinstance(s, Tensor) or s.numel() != 1:
                got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise TargetError(
                    f"the target for sample {b} returned {got}; a per-sample target must return one score "
                    "(e.g. output[c] of that sample's (C,) output)"
                )
            values.append(s.reshape(()))
        if not values:
            raise TargetError("per-sample targets need a batch of at least one sample")
        return torch.stack(values)

    return score


def binary(c: int) -> ScoreFn:
    r"""Target for a binary classifier with one logit ``(B, 1)`` (grad-cam's ``BinaryClassifierOutputTarget``).

    .. math:: S_b = \begin{cases} y_b & c = 1 \\ -y_b & c = 0 \end{cases}

    Class 1 is the positive logit; class 0 flips its sign (a high logit is evidence against class 0).

    Example:
        >>> import torch
        >>> from camfn.targets import binary
        >>> y = torch.tensor([[2.0], [-1.0]])
        >>> binary(1)(y), binary(0)(y)
        (tensor([ 2., -1.]), tensor([-2.,  1.]))
    """
    if isinstance(c, bool) or c not in (0, 1):
        raise TargetError(f"binary({c!r}): the class of a single-logit classifier is 0 or 1")
    sign = 1.0 if c == 1 else -1.0

    def score(output: Tensor) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim != 2 or output.shape[1] != 1:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise TargetError(
                f"binary needs one logit per sample, (B, 1), got {got}; for (B, C) logits use an int class target"
            )
        return sign * output[:, 0]

    return score


def rest(c: int | Tensor | None = None) -> ScoreFn:
    r"""Target: grad-cam's ``ClassifierOutputReST`` (ShapleyCAM, arXiv 2501.06261), logit minus cross-entropy.

    .. math:: S_b = y_{b,c} - \mathrm{CE}(y_b, c) = 2\,y_{b,c} - \log\sum_j \exp y_{b,j}

    using both the pre-softmax and the post-softmax score (``c``: an int, a ``(B,)`` tensor or ``None``,
    each sample's top-1 class).

    Example:
        >>> import torch
        >>> from camfn.targets import rest
        >>> rest(0)(torch.tensor([[0.0, 0.0]]))
        tensor([-0.6931])
    """

    def score(output: Tensor) -> Tensor:
        output = _logits(output, "rest")
        logit_c = output.gather(1, _class_index(c, output)).squeeze(1)
        return 2 * logit_c - output.logsumexp(1)

    return score
