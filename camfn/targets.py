"""Targets: what score ``S`` a map explains.

A target becomes a *score function* ``output -> (B, T)``: ``T`` scores per sample, all from one forward
pass. Accepted forms:

=====================  ==========================================  ===============
``target``             score                                       map shape
=====================  ==========================================  ===============
``None``               logit of the top-1 class of each sample     ``(B, H, W)``
``int c``              ``output[:, c]``                            ``(B, H, W)``
``(B,)`` long tensor   ``output[b, t_b]``                          ``(B, H, W)``
``(B, T)`` long        ``output[b, t_bj]`` for each ``j``          ``(B, T, H, W)``
callable               ``fn(output)``, shape ``(B,)`` or ``(B, T)``  as its shape
=====================  ==========================================  ===============

Selection uses ``gather`` so it works under ``torch.func.vmap`` (no ``.item()``).

Example:
    >>> import torch
    >>> from camfn.targets import scores
    >>> fn = scores(torch.tensor([[1, 2], [0, 0]]), batch=2, num_classes=3)
    >>> fn(torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]))
    tensor([[1., 2.],
            [3., 3.]])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import TargetError

__all__ = ["Target", "classes", "concrete", "fixed", "logit", "scores"]

Target = int | Tensor | Callable[[Tensor], Tensor] | None
ScoreFn = Callable[[Tensor], Tensor]


def concrete(t: Tensor) -> bool:
    """True when ``t``'s values may be read (not under a torch.func transform or torch.compile)."""
    if torch.compiler.is_compiling():
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def logit(c: int | Tensor) -> ScoreFn:
    """Target: the raw logit of class ``c`` (an int, or one class per sample as a ``(B,)`` tensor).

    ``S_b = output[b, c_b]``.
    """

    def score(output: Tensor) -> Tensor:
        index = torch.as_tensor(c, device=output.device).expand(output.shape[0]).reshape(-1, 1)
        return output.gather(1, index).squeeze(1)

    return score


def _check_logits(output: object, what: str) -> Tensor:
    if not isinstance(output, Tensor):
        raise TargetError(
            f"the model returns a {type(output).__name__}, so a class {what} cannot pick a score; "
            "pass target=callable(output) -> (B,) scores instead"
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
    if isinstance(target, int):
        _check_range(torch.tensor([target]), num_classes)
        return (lambda out: torch.full((out.shape[0], 1), target, dtype=torch.long, device=out.device)), True
    if not isinstance(target, Tensor):
        raise TargetError(
            f"target of type {type(target).__name__} is not understood; pass None, an int, a (B,) or (B, T) "
            "long tensor, or a callable output -> (B,) scores"
        )
    if target.is_floating_point() or target.is_complex():
        raise TargetError(f"target has dtype {target.dtype}; class indices must be integers (target.long())")
    if target.ndim not in (1, 2) or target.shape[0] != batch:
        raise TargetError(
            f"target has shape {tuple(target.shape)} but the batch has {batch} sample(s); pass an int, "
            f"a ({batch},) tensor (one class per sample) or a ({batch}, T) tensor (T classes per sample)"
        )
    if target.ndim == 2 and target.shape[1] == 0:
        raise TargetError("target has shape (B, 0): at least one class per sample is needed")
    _check_range(target, num_classes)
    squeeze = target.ndim == 1
    index = target.long().reshape(batch, -1)
    return (lambda out: index.to(out.device)), squeeze


def _check_range(target: Tensor, num_classes: int | None) -> None:
    if num_classes is None or not concrete(target):
        return
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise TargetError(
            f"target class {bad} is out of range: the model has {num_classes} outputs (0..{num_classes - 1})"
        )


def scores(target: Target, batch: int, num_classes: int | None) -> ScoreFn:
    """The score function ``output -> (B,)`` or ``(B, T)`` for ``target`` (validated first).

    A ``(B,)`` result gives one map per sample, ``(B, T)`` gives ``T`` maps per sample.
    """
    if callable(target) and not isinstance(target, Tensor):
        return _checked(target, batch)
    index, squeeze = classes(target, batch, num_classes)

    def score(output: Tensor) -> Tensor:
        picked = _check_logits(output, "index").gather(1, index(output))
        return picked.squeeze(1) if squeeze else picked

    return score


def fixed(target: Target, output: Tensor, batch: int, num_classes: int | None) -> ScoreFn:
    """:func:`scores` with ``None`` resolved once, to the top-1 class of ``output``.

    Methods that score perturbed or noisy copies of ``x`` use it, so every copy explains the clean
    input's class rather than its own top-1.
    """
    if target is None:
        target = classes(None, batch, num_classes)[0](output).squeeze(1)
    return scores(target, batch, num_classes)


def _checked(fn: Callable[[Tensor], Tensor], batch: int) -> ScoreFn:
    def score(output: Tensor) -> Tensor:
        s = fn(output)
        if not isinstance(s, Tensor) or s.ndim not in (1, 2) or s.shape[0] != batch:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise TargetError(f"the target callable returned {got}; it must return ({batch},) or ({batch}, T) scores")
        return s

    return score
