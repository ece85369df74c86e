"""What every metric family shares: input checks, scoring a target, chunked perturbed forwards, curves.

``camfn.targets`` turns the target into scores (:func:`camfn.targets.fixed`): ``None`` is the clean input's
top-1 class, fixed for every perturbed copy. Non-finite maps and scores are refused by the registry's wrapper
(:mod:`camfn.metrics.registry`), which reads the scores' finiteness from :func:`scorer` through a context
variable, so each metric runs one clean forward only.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from .. import chunks as _chunks
from .. import targets as _targets
from ..checks import check_input, check_model
from ..errors import InputError, OptionError, TargetError
from ..hooks import HookPolicy
from ..tracing import Params, apply

Order = Literal["most", "least"]
ChunkSize = int | Literal["auto"] | None


class Curve(NamedTuple):
    """A perturbation curve: ``scores[b, s]`` is sample ``b``'s score at ``fractions[s]``.

    ``auc[b]`` is the trapezoid area under the curve divided by the span of ``fractions``
    (``fractions[-1] - fractions[0]``; it is 1 for deletion and insertion, whose axis is ``[0, 1]``), i.e. the
    curve's mean height. A single fraction gives its score.
    """

    fractions: Tensor
    scores: Tensor
    auc: Tensor


# -------------------------------------------------------------------------------- non-finite report
_SKIP: contextvars.ContextVar[bool | None] = contextvars.ContextVar("camfn_metrics_skip", default=None)
_BAD: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("camfn_metrics_bad", default=None)


def nonfinite_rows(t: Tensor) -> Tensor:
    """``(B,)`` bool: samples of ``t`` holding a NaN or an infinity."""
    return ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1) if t.numel() else torch.zeros(t.shape[0], dtype=bool)


def refuse_nonfinite(bad: Tensor, what: str, fix: str, problem: str = "hold NaN or inf values") -> None:
    """Raise (or, inside ``skip_nonfinite=True``, record) the samples flagged in ``bad``."""
    if not bool(bad.any()):
        return
    samples = bad.nonzero().flatten().tolist()
    if _SKIP.get():
        seen = _BAD.get()
        _BAD.set(bad.cpu() if seen is None or seen.shape != bad.shape else seen | bad.cpu())
        return
    shown = samples[:10] + (["..."] if len(samples) > 10 else [])
    raise InputError(
        f"{what} of sample(s) {shown} {problem}; {fix}, or pass skip_nonfinite=True to get NaN for "
        "those samples (reported in a warning)"
    )


# ------------------------------------------------------------------------------------------ checks
def check_maps(maps: object, x: Tensor, what: str = "maps") -> Tensor:
    """``maps`` must be float ``(B, *spatial)`` with ``x``'s batch and spatial size."""
    expected = (x.shape[0], *x.shape[2:])
    if not isinstance(maps, Tensor):
        raise InputError(f"{what} must be a tensor of shape {expected}, got {type(maps).__name__}")
    if not maps.is_floating_point():
        raise InputError(f"{what} has dtype {maps.dtype}; pass float maps (camfn's methods return them)")
    if tuple(maps.shape) != expected:
        hint = ""
        if maps.ndim == x.ndim and maps.shape[1] == 1:
            hint = " (a channel axis of 1: pass maps.squeeze(1))"
        elif maps.ndim == x.ndim:
            hint = " (several maps per sample: pass maps[:, t], one target at a time)"
        elif tuple(maps.shape[1:]) != tuple(x.shape[2:]):
            hint = " (maps at layer resolution: compute them with size='input', camfn's default)"
        raise InputError(
            f"{what} has shape {tuple(maps.shape)} but x has shape {tuple(x.shape)}: expected one map per sample "
            f"at the input's size, {expected}{hint}"
        )
    return maps


def check_model_input(model: nn.Module, x: Tensor) -> None:
    check_input(x)
    if not isinstance(model, nn.Module):
        raise OptionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_model(model)
    refuse_nonfinite(nonfinite_rows(x.detach()), "x", "clean the input")


def check_images_2d(x: Tensor, what: str) -> None:
    if x.ndim != 4:
        raise InputError(
            f"{what} works on 2-d images (B, C, H, W); x has shape {tuple(x.shape)}. For volumes use deletion, "
            "insertion, pixel_flipping or the map-only metrics"
        )


def check_fractions(fractions: Sequence[float] | Tensor) -> Tensor:
    values = torch.as_tensor(fractions, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise OptionError("fractions is empty; pass at least one fraction in [0, 1], e.g. (0.1, 0.5, 0.9)")
    if not bool(((values >= 0) & (values <= 1)).all()):
        raise OptionError(f"fractions {values.tolist()} must lie in [0, 1] (the fraction of pixels removed)")
    return values


def check_positive(name: str, value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{name}={value!r}: use a positive int ({what})")
    return value


def check_chunk(chunk_size: ChunkSize) -> None:
    """``"auto"`` (:data:`camfn.chunks.BUDGET` input elements per forward), images per forward, or ``None``."""
    _chunks.check_chunk(chunk_size)


def ranks(maps: Tensor, order: Order | str) -> Tensor:
    """``(B, N)`` rank of each position of the flattened maps: 0 for the first removed.

    ``"most"``: most salient first; ``"least"``: least salient first. Ties keep raster order (a stable sort).
    """
    if order not in ("most", "least"):
        raise OptionError(f"order={order!r}: use 'most' (most relevant first) or 'least' (least relevant first)")
    flat = maps.flatten(1)
    idx = torch.sort(flat, dim=1, descending=order == "most", stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(idx)
    return torch.empty_like(idx).scatter_(1, idx, positions)


# ------------------------------------------------------------------------------------------- scores
class Scorer(NamedTuple):
    """``score(inputs (..., B, C, *S)) -> (..., B)`` and the clean input's scores ``clean`` ``(B,)``."""

    score: Callable[[Tensor], Tensor]
    clean: Tensor


def scorer(
    model: nn.Module,
    params: Params,
    x: Tensor,
    target: Any,
    *,
    softmax: bool = True,
    hooks: HookPolicy = "error",
) -> Scorer:
    """The score each metric records: class ``target``'s softmax probability (``softmax=False``: its logit).

    ``target``: an int, a ``(B,)`` long tensor, ``None`` (the clean input's top-1 class, fixed for every
    perturbed copy) or a callable ``output -> (B,)`` (given the raw output; ``softmax`` does not apply).
    """
    if not isinstance(softmax, bool):
        raise OptionError(f"softmax={softmax!r}: use True (class probabilities) or False (raw logits)")
    if isinstance(target, Tensor) and target.ndim == 2:
        raise TargetError(
            f"target has shape {tuple(target.shape)}; metrics score one class per sample: pass target[:, t] "
            "(a (B,) tensor) for each t"
        )
    batch = x.shape[0]
    is_callable = _targets.is_callable(target)
    with torch.no_grad():
        out = apply(model, params, x, hooks=hooks)
    logits = isinstance(out, Tensor) and out.ndim == 2
    if not is_callable and not logits:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TargetError(
            f"the model returns {got}; class targets need (B, num_classes) logits. Pass a callable target "
            "output -> (B,) scores (e.g. camfn.targets.segmentation(c))"
        )
    fn = _targets.fixed(target, out, batch, out.shape[1] if logits else None)

    def of_output(o: Any) -> Tensor:
        s = fn(o.softmax(1) if softmax and not is_callable else o)
        if s.ndim != 1:
            raise TargetError(
                f"the target gives {tuple(s.shape)} scores; metrics need one score per sample, ({batch},)"
            )
        return s

    def score(inputs: Tensor) -> Tensor:
        lead = inputs.shape[: inputs.ndim - x.ndim]
        flat = inputs.reshape(-1, *x.shape[1:])
        with torch.no_grad():
            o = apply(model, params, flat, hooks=hooks)
        if not isinstance(o, Tensor):
            raise TargetError("metrics that perturb the input need a model whose output is one tensor")
        groups = o.reshape(-1, batch, *o.shape[1:])
        return torch.stack([of_output(g) for g in groups]).reshape(*lead, batch)

    clean = of_output(out)
    refuse_nonfinite(nonfinite_rows(clean.detach()), "the model's scores", "check the model and the input")
    return Scorer(score, clean)


def run_copies(
    score: Callable[[Tensor], Tensor], x: Tensor, make: Callable[[Tensor], Tensor], n: int, chunk_size: ChunkSize
) -> Tensor:
    """Scores ``(B, n)`` of ``n`` perturbed copies of the batch; ``make(steps (c,)) -> (c, B, C, *S)``.

    ``chunk_size``: ``"auto"`` sizes the copies per forward by :data:`camfn.chunks.BUDGET` elements, an int is
    images per forward (``chunk_size // B`` copies, at least one), ``None`` runs all copies at once.
    """
    if n == 0:
        return torch.zeros(x.shape[0], 0, dtype=x.dtype, device=x.device)
    per = _chunks.copies_per_forward("auto", x.shape) if chunk_size == "auto" else chunk_size
    if isinstance(per, int) and chunk_size != "auto":
        per = max(1, per // x.shape[0])
    return _chunks.chunked(lambda idx: score(make(idx)), n, per, device=x.device).T


def curve(fractions: Tensor, scores: Tensor) -> Curve:
    """A :class:`Curve` with ``auc`` = trapezoid over ``fractions`` / their span (one fraction: its score)."""
    fr = fractions.to(device=scores.device, dtype=scores.dtype)
    if fr.numel() == 1:
        return Curve(fr, scores, scores[:, 0])
    span = fr[-1] - fr[0]
    area = torch.trapezoid(scores, fr, dim=1)
    return Curve(fr, scores, area / span if float(span) != 0 else scores.mean(1))


BASELINES = ("black", "white", "mean")


def baseline(value: float | str | Tensor, x: Tensor, what: str) -> Tensor:
    """``value`` as a tensor of ``x``'s shape: a number, a tensor broadcastable to ``x``, or per sample
    ``"black"`` (its minimum, Quantus's "black"), ``"white"`` (its maximum) or ``"mean"`` (its mean)."""
    if isinstance(value, str):
        if value not in BASELINES:
            raise OptionError(f"{what}={value!r}: use a number, a tensor, or one of {BASELINES}")
        flat = x.reshape(x.shape[0], -1)
        per = {"black": flat.amin(1), "white": flat.amax(1), "mean": flat.mean(1)}[value]
        return per.reshape(-1, *[1] * (x.ndim - 1)).expand(x.shape)
    if isinstance(value, Tensor):
        try:
            return torch.broadcast_to(value.to(device=x.device, dtype=x.dtype), x.shape)
        except RuntimeError as err:
            raise InputError(
                f"{what} has shape {tuple(value.shape)}, which does not broadcast to x's {tuple(x.shape)}"
            ) from err
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(f"{what}={value!r}: use a number, a tensor broadcastable to x, or one of {BASELINES}")
    return torch.full_like(x, float(value))


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last axis; 0 where either side is constant."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    norm = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    cov = (a * b).sum(-1)
    return torch.where(norm > 0, cov / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))


def average_ranks(v: Tensor) -> Tensor:
    """1-based ranks along the last axis, ties sharing their average rank."""
    ordered = v.sort(-1).values
    low = torch.searchsorted(ordered, v, right=False)
    high = torch.searchsorted(ordered, v, right=True)
    return (low + high + 1).to(v.dtype if v.is_floating_point() else torch.float64) / 2


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation along the last axis (average ranks for ties); 0 where either side is constant."""
    return pearson(average_ranks(a.contiguous()), average_ranks(b.contiguous()))


def fixed_class(model: nn.Module, params: Params, x: Tensor, target: Any, options: dict[str, Any]) -> Any:
    """``target``, with ``None`` resolved to the clean input's top-1 class (:func:`camfn.targets.classes`).

    Metrics that re-explain changed inputs or models use it, so every map explains the same class.
    """
    if target is not None:
        return target
    with torch.no_grad():
        out = apply(model, params, x, hooks=options.get("hooks", "error"), tracer_options=options.get("tracer_options"))
    index, _ = _targets.classes(None, x.shape[0], None)
    return index(out).squeeze(1)
